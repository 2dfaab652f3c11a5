import pytest
import torch

from sparqle.models.adapters import LinearAdapter, QFormerAdapter, WindowQFormerAdapter
from sparqle.models.encoder import lengths_to_mask


def _features(lengths, dim=32):
    mask = lengths_to_mask(torch.tensor(lengths))
    return torch.randn(len(lengths), max(lengths), dim) * mask[..., None], mask


@pytest.fixture
def adapters(tiny):
    return {
        "qformer": QFormerAdapter(32, 64, num_queries=6, bert=tiny["bert"], dropout=0.0),
        "window_qformer": WindowQFormerAdapter(
            32, 64, frame_rate=50, window_seconds=0.2, bert=tiny["bert"], dropout=0.0
        ),
        "linear": LinearAdapter(32, 64, downsample=5, hidden_dim=48),
    }


@pytest.mark.parametrize("name", ["qformer", "window_qformer", "linear"])
def test_padded_batch_equals_each_utterance_alone(adapters, name):
    adapter = adapters[name].eval()
    feats, mask = _features([50, 23, 7])
    out, out_mask = adapter(feats, mask)
    assert out.shape[-1] == 64 and out_mask.dtype == torch.bool
    for i, n in enumerate([50, 23, 7]):
        alone, alone_mask = adapter(feats[i : i + 1, :n], mask[i : i + 1, :n])
        k = int(alone_mask.sum())
        assert k == int(out_mask[i].sum())
        torch.testing.assert_close(
            out[i][out_mask[i]], alone[0][alone_mask[0]], atol=1e-5, rtol=1e-5
        )


def test_output_lengths(adapters):
    feats, mask = _features([50, 20])
    q, qm = adapters["qformer"](feats, mask)
    assert q.shape[1] == 6 and qm.all()
    w, wm = adapters["window_qformer"](feats, mask)  # 10-frame windows
    assert wm.sum(1).tolist() == [5, 2]
    lin, lm = adapters["linear"](feats, mask)
    assert lm.sum(1).tolist() == [10, 4]


@pytest.mark.parametrize("name", ["qformer", "window_qformer", "linear"])
@pytest.mark.parametrize("lengths", [[50, 23, 7], [11, 10, 1], [40]])
def test_host_output_lengths_are_the_valid_prefix_of_the_mask(adapters, name, lengths):
    """The LLM layout is computed on the host from frame counts: it must be what the adapter's
    mask says on the device, a prefix of each row."""
    adapter = adapters[name].eval()
    feats, mask = _features(lengths)
    _, out_mask = adapter(feats, mask)
    host = adapter.output_lengths(torch.tensor(lengths)).tolist()
    assert host == out_mask.sum(1).tolist()
    for i, n in enumerate(host):
        assert out_mask[i, :n].all() and not out_mask[i, n:].any()


def test_window_lengths_follow_the_batch_when_windows_overlap(tiny):
    adapter = WindowQFormerAdapter(
        32,
        64,
        frame_rate=50,
        window_seconds=0.08,
        stride_seconds=0.04,
        bert=tiny["bert"],
        dropout=0.0,
    ).eval()
    for lengths in ([10, 9], [10, 3], [7]):
        feats, mask = _features(lengths)
        _, out_mask = adapter(feats, mask)
        assert adapter.output_lengths(torch.tensor(lengths)).tolist() == out_mask.sum(1).tolist()
