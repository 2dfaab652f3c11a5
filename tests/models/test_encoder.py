import pytest
import torch

from sparqle.models.encoder import SpeechEncoder, lengths_to_mask
from sparqle.models.tiny import build_tiny_encoder


def _batch(lengths):
    audio = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        audio[i, :n] = torch.randn(n) * 0.1
    return audio, torch.tensor(lengths)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("encoders")
    paths = {"hubert": tiny["encoder"], "whisper": tiny["whisper"]}
    for name, kind, norm in [
        ("wav2vec2", "wav2vec2", "layer"),
        ("wavlm", "wavlm", "layer"),
        ("data2vec-audio", "data2vec-audio", "layer"),
        ("hubert-group-norm", "hubert", "group"),
    ]:
        build_tiny_encoder(root / name, kind, norm)
        paths[name] = str(root / name)
    return paths


@pytest.mark.parametrize(
    "name", ["hubert", "wav2vec2", "wavlm", "data2vec-audio", "hubert-group-norm", "whisper"]
)
def test_padded_batch_equals_each_utterance_alone(encoders, name):
    enc = SpeechEncoder(encoders[name])
    audio, lens = _batch([16000, 9000, 4000])
    out = enc(audio, lens)
    assert out.mask.dtype == torch.bool
    expected_frames = (lens / 16000 * 50).floor().long()
    assert (out.mask.sum(1) - expected_frames).abs().max() <= 1
    for i, n in enumerate(lens.tolist()):
        alone = enc(audio[i : i + 1, :n], lens[i : i + 1])
        t = int(alone.mask.sum())
        assert t == int(out.mask[i].sum())
        torch.testing.assert_close(out.features[i, :t], alone.features[0, :t], atol=1e-4, rtol=1e-4)
        assert out.features[i, t:].abs().sum() == 0  # padded frames are zeroed


def test_normalisation_follows_feature_extractor_and_ignores_padding(encoders):
    enc = SpeechEncoder(encoders["hubert"])
    assert enc.normalize is True
    audio, lens = _batch([8000, 3000])
    audio = audio * 7 + 0.3 * lengths_to_mask(lens, audio.shape[1])
    norm = enc.normalize_waveform(audio, lens)
    for i, n in enumerate(lens.tolist()):
        assert abs(norm[i, :n].mean().item()) < 1e-4
        assert abs(norm[i, :n].std(unbiased=False).item() - 1) < 1e-3
        assert norm[i, n:].abs().sum() == 0


def test_layer_choice_and_frozen_weights(encoders):
    audio, lens = _batch([8000, 6000])
    last = SpeechEncoder(encoders["hubert"])
    first = SpeechEncoder(encoders["hubert"], layer=0)
    weighted = SpeechEncoder(encoders["hubert"], layer="weighted")
    assert not torch.allclose(last(audio, lens).features, first(audio, lens).features)
    out = weighted(audio, lens).features
    out.sum().backward()
    assert weighted.layer_weights.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in weighted.model.parameters())
    weighted.train()
    assert not weighted.model.training  # frozen encoder never drops out
    with pytest.raises(ValueError, match="encoder.layer=9"):
        SpeechEncoder(encoders["hubert"], layer=9)


def test_unsupported_model_type_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="not a supported speech encoder"):
        SpeechEncoder(tiny["llm"])


def test_feature_cache_returns_the_same_features_without_rerunning(encoders, monkeypatch):
    plain = SpeechEncoder(encoders["hubert"])
    cached = SpeechEncoder(encoders["hubert"], cache_features=True)
    audio, lens = _batch([16000, 9000, 4000])
    first = cached(audio, lens)
    calls = []
    monkeypatch.setattr(cached, "_encode", lambda *a: calls.append(a) or plain(*a))
    again = cached(audio[[2, 0]], lens[[2, 0]])  # same clips, another batch: all from the cache
    assert calls == []
    ref = plain(audio, lens)
    for src, i in ((again, 0), (again, 1)):
        j = [2, 0][i]
        t = int(src.mask[i].sum())
        assert t == int(ref.mask[j].sum())
        torch.testing.assert_close(src.features[i, :t], ref.features[j, :t], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        first.features[0], ref.features[0][: first.features.shape[1]], atol=1e-4, rtol=1e-4
    )
    with pytest.raises(ValueError, match="cache_features needs a frozen encoder"):
        SpeechEncoder(encoders["hubert"], layer="weighted", cache_features=True)


def test_feature_cache_memory_is_bounded_least_recently_used_first(encoders, tmp_path, monkeypatch):
    plain = SpeechEncoder(encoders["hubert"])
    audio, lens = _batch([16000, 16000, 16000, 16000])
    one_clip = plain(audio[:1], lens[:1]).features[0]
    size = one_clip.numel() * one_clip.element_size()
    cached = SpeechEncoder(
        encoders["hubert"],
        cache_features=True,
        cache_dir=str(tmp_path),
        cache_max_gb=2.5 * size / 2**30,
    )
    audio = audio + torch.arange(4.0)[:, None] * 1e-3  # four distinct clips
    cached(audio[:2], lens[:2])
    cached(audio[[0]], lens[[0]])  # clip 0 used again: clip 1 is now the oldest
    cached(audio[2:3], lens[2:3])
    assert len(cached._cache) == 2 and cached._cache_bytes <= 2.5 * size
    import hashlib

    def key(i):
        return hashlib.blake2b(audio[i, : lens[i]].numpy().tobytes(), digest_size=16).digest()

    assert set(cached._cache) == {key(0), key(2)}  # clip 1, least recently used, went first
    calls = []
    monkeypatch.setattr(cached, "_encode", lambda *a: calls.append(a) or plain(*a))
    out = cached(audio, lens)  # evicted clips come back from disk, the fourth is encoded
    assert len(calls) == 1 and calls[0][0].shape[0] == 1
    ref = plain(audio, lens)
    torch.testing.assert_close(out.features, ref.features, atol=1e-4, rtol=1e-4)
    assert len(cached._cache) == 2  # still bounded


def test_feature_cache_on_disk_serves_a_new_process(encoders, tmp_path, monkeypatch):
    audio, lens = _batch([8000, 5000])
    first = SpeechEncoder(encoders["hubert"], cache_features=True, cache_dir=str(tmp_path))(
        audio, lens
    )
    later = SpeechEncoder(encoders["hubert"], cache_features=True, cache_dir=str(tmp_path))
    monkeypatch.setattr(
        later, "_encode", lambda *a: pytest.fail("encoder ran despite the disk cache")
    )
    again = later(audio, lens)
    assert torch.equal(first.features, again.features) and torch.equal(first.mask, again.mask)
    assert len(list(tmp_path.rglob("*.pt"))) == 2

    # a bf16 copy of the encoder gives other features, so it keeps its own cache folder
    bf16 = SpeechEncoder(
        encoders["hubert"], dtype="bfloat16", cache_features=True, cache_dir=str(tmp_path)
    )
    assert bf16(audio, lens).features.dtype == torch.bfloat16
    assert len(list(tmp_path.rglob("*.pt"))) == 4


@pytest.mark.parametrize("name", ["hubert", "whisper"])
def test_bf16_encoder_runs_under_cpu_autocast(encoders, name):
    # bf16-mixed training on a CPU: Whisper's log-mel front end must still run in float32
    enc = SpeechEncoder(encoders[name], dtype="bfloat16")
    audio, lens = _batch([16000, 9000])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(audio, lens)
    ref = SpeechEncoder(encoders[name])(audio, lens)
    assert out.features.dtype == torch.bfloat16 and torch.equal(out.mask, ref.mask)
    rel = (out.features.float() - ref.features).norm() / ref.features.norm()
    assert rel < 0.05, rel  # the same features, to bf16 precision


def test_train_mode_augment_runs_the_frozen_encoder_in_its_training_mode(tiny, tmp_path):
    """The authors' stage 1: a frozen HuBERT in training mode (dropout, LayerDrop, time masking),
    without gradients; in eval (and without the option) its output is fixed."""
    import torch

    from sparqle.models.encoder import SpeechEncoder

    audio, lens = torch.randn(2, 16000) * 0.1, torch.tensor([16000, 12000])
    plain = SpeechEncoder(tiny["encoder"]).train()
    augmented = SpeechEncoder(tiny["encoder"], train_mode_augment=True).train()
    assert not plain.model.training and augmented.model.training
    assert torch.equal(plain(audio, lens).features, plain(audio, lens).features)
    a, b = augmented(audio, lens).features, augmented(audio, lens).features
    assert not torch.equal(a, b) and not a.requires_grad
    augmented.eval()
    assert torch.equal(augmented(audio, lens).features, augmented(audio, lens).features)
    with pytest.raises(ValueError, match="nothing to cache"):
        SpeechEncoder(tiny["encoder"], train_mode_augment=True, cache_features=True)
