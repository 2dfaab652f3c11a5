"""Frozen (or trainable) speech encoder from any transformers speech model.

Convention used everywhere downstream: features (B, T, D) and `mask` (B, T) bool,
True = a real frame, False = padding. Waveform normalisation follows the model's own
feature-extractor config and runs here, so training and inference cannot differ.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

from sparqle.models.loading import load_frozen

WHISPER_TYPES = ("whisper",)
SSL_TYPES = (
    "hubert",
    "wav2vec2",
    "wavlm",
    "data2vec-audio",
    "wav2vec2-conformer",
    "sew",
    "unispeech",
)


def _load(auto_class, name_or_path: str, dtype) -> nn.Module:
    return auto_class.from_pretrained(name_or_path, dtype=dtype)


@dataclass
class EncoderOutput:
    features: torch.Tensor  # (B, T, D)
    mask: torch.Tensor  # (B, T) bool, True = real frame


def lengths_to_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class SpeechEncoder(nn.Module):
    """Wraps a transformers speech model; `layer` is "last", an int index, or "weighted"."""

    def __init__(
        self,
        name_or_path: str,
        layer: str | int = "last",
        frozen: bool = True,
        dtype: str = "float32",
        sample_rate: int = 16000,
        cache_features: bool = False,
        cache_dir: str | None = None,
        whisper_window_seconds: float | None = None,
        cache_max_gb: float = 4.0,
        device: str | None = None,
        train_mode_augment: bool = False,
    ) -> None:
        """`device`: where a frozen encoder's weights are loaded straight to (a rank's GPU).
        `train_mode_augment`: while the module trains, a frozen encoder runs in its own training
        mode (dropout, LayerDrop and, for the wav2vec2 family, SpecAugment-style time masking, as
        its config sets them), still without gradients: the SparQLe authors' stage 1 did this
        (their task calls model.train() every step). Its output is then not the same from one
        step to the next, so it cannot be cached or stored as feature shards."""
        super().__init__()
        self.name_or_path = name_or_path
        load = partial(load_frozen, device=device) if frozen else _load
        config = AutoConfig.from_pretrained(name_or_path)
        self.model_type = config.model_type
        torch_dtype = getattr(torch, dtype)
        if self.model_type in WHISPER_TYPES:
            full = load(AutoModel, name_or_path, torch_dtype)
            self.model = full.get_encoder()
            del full
            self.feature_extractor = AutoFeatureExtractor.from_pretrained(name_or_path)
            self.normalize = False
            if whisper_window_seconds:  # a shorter fixed window: the first positions, less padding
                frames = (
                    int(whisper_window_seconds * sample_rate) // self.feature_extractor.hop_length
                )
                positions = frames // 2
                if not 0 < positions <= self.model.config.max_source_positions:
                    raise ValueError(
                        f"encoder.whisper_window_seconds={whisper_window_seconds}: must be in (0, 30]"
                    )
                weight = self.model.embed_positions.weight[:positions].detach().clone()
                self.model.embed_positions = nn.Embedding.from_pretrained(weight, freeze=True)
                self.model.config.max_source_positions = positions
                self.feature_extractor.n_samples = frames * self.feature_extractor.hop_length
                self.feature_extractor.nb_max_frames = frames
        elif self.model_type in SSL_TYPES:
            self.model = load(AutoModel, name_or_path, torch_dtype)
            try:
                fe = AutoFeatureExtractor.from_pretrained(name_or_path)
                self.normalize = bool(getattr(fe, "do_normalize", True))
            except OSError:
                # No preprocessor_config.json: wav2vec2-family models expect normalised input.
                self.normalize = True
            self.feature_extractor = None
            # Padding leaks into real frames where the conv front end uses group norm (base
            # models normalise over time) or positional convs are stacked (data2vec-audio):
            # those models encode one utterance at a time, so a batch equals its parts.
            self.per_utterance = (
                getattr(config, "feat_extract_norm", "layer") == "group"
                or self.model_type == "data2vec-audio"
            )
        else:
            raise ValueError(
                f"encoder.name_or_path={name_or_path}: model type {self.model_type!r} is not a "
                f"supported speech encoder ({', '.join(SSL_TYPES + WHISPER_TYPES)})"
            )
        self.sample_rate = sample_rate
        expected_sr = getattr(self.feature_extractor, "sampling_rate", None)
        if expected_sr is not None and expected_sr != sample_rate:
            raise ValueError(
                f"encoder.sample_rate={sample_rate} but {name_or_path} expects {expected_sr} Hz"
            )
        self.hidden_size = (
            config.d_model if self.model_type in WHISPER_TYPES else config.hidden_size
        )
        num_states = config.num_hidden_layers + 1
        self.frozen = frozen
        self.train_mode_augment = train_mode_augment
        if layer == "last":
            self.layer: int | str = "last"
        elif layer == "weighted":
            self.layer = "weighted"
            self.layer_weights = nn.Parameter(torch.zeros(num_states))
        else:
            idx = int(layer)
            if not -num_states <= idx < num_states:
                raise ValueError(f"encoder.layer={layer}: model has {num_states} hidden states")
            self.layer = idx
        if frozen:
            self.model.requires_grad_(False)
            self.model.eval()
        if cache_features and train_mode_augment:
            raise ValueError(
                "encoder.cache_features with encoder.train_mode_augment: the encoder's output "
                "changes every step in training mode, so there is nothing to cache"
            )
        if cache_features and (not frozen or self.layer == "weighted"):
            raise ValueError(
                "encoder.cache_features needs a frozen encoder and a fixed encoder.layer"
            )
        # Frozen features of each clip, keyed by a hash of its samples: a clip seen again (next
        # epoch, validation) skips the encoder. Exact, since a frozen encoder is deterministic
        # and padding-invariant. Held in memory up to cache_max_gb, least recently used out first
        # (960 h through HuBERT-large is ~350 GB of bf16 features: for corpora past the bound,
        # or many runs over one corpus, write feature shards once with data_prep.extract_features
        # and train with data=feature_shards: streamed like audio, no encoder). With cache_dir the features
        # also go to disk (one file per clip), so later runs, the next training stage and
        # evaluation reuse them; the folder is per encoder, layer and dtype.
        self.cache_features = cache_features
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._cache_bytes, self.cache_max_bytes = 0, int(cache_max_gb * 2**30)
        self.cache_dir = None
        if cache_features and cache_dir:
            tag = hashlib.blake2b(
                f"{name_or_path}|{layer}|{whisper_window_seconds}|{dtype}".encode(), digest_size=8
            ).hexdigest()
            self.cache_dir = Path(cache_dir) / tag
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def train(self, mode: bool = True) -> SpeechEncoder:
        super().train(mode)
        if self.frozen:  # no dropout or masking in a frozen encoder, unless asked for
            self.model.train(mode and self.train_mode_augment)
        return self

    @property
    def frame_rate(self) -> float:
        if self.model_type in WHISPER_TYPES:
            return self.sample_rate / (self.feature_extractor.hop_length * 2)
        return self.sample_rate / self._total_stride()

    def _total_stride(self) -> int:
        stride = 1
        for s in self.model.config.conv_stride:
            stride *= s
        return stride

    def output_lengths(self, audio_lens: torch.Tensor) -> torch.Tensor:
        """Feature frames per utterance; pure arithmetic, so it runs on the host copy of
        audio_lens before a batch moves to the GPU."""
        if self.model_type in WHISPER_TYPES:
            hop = self.feature_extractor.hop_length
            frames = torch.div(audio_lens, hop, rounding_mode="floor")
            lengths = torch.div(frames - 1, 2, rounding_mode="floor") + 1
            return lengths.clamp(max=self.model.config.max_source_positions)  # the fixed window
        return self.model._get_feat_extract_output_lengths(audio_lens).long()

    def normalize_waveform(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> torch.Tensor:
        """Zero mean, unit variance over each utterance's real samples; padding stays 0."""
        mask = lengths_to_mask(audio_lens, audio.shape[1]).to(audio.dtype)
        n = audio_lens.clamp(min=1).to(audio.dtype)[:, None]
        mean = (audio * mask).sum(1, keepdim=True) / n
        var = (((audio - mean) * mask) ** 2).sum(1, keepdim=True) / n
        return (audio - mean) / torch.sqrt(var + 1e-7) * mask

    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> EncoderOutput:
        """audio (B, S) float at `sample_rate`, zero-padded; audio_lens (B,) in samples."""
        if self.cache_features:
            return self._cached(audio, audio_lens)
        return self._encode(audio, audio_lens)

    def _cached(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> EncoderOutput:
        lens = audio_lens.tolist()
        host = audio.detach().cpu()
        keys = [
            hashlib.blake2b(host[i, :n].numpy().tobytes(), digest_size=16).digest()
            for i, n in enumerate(lens)
        ]
        found: dict[bytes, torch.Tensor] = {}
        for k in keys:
            if k in self._cache:
                self._cache.move_to_end(k)
                found[k] = self._cache[k]
            elif self.cache_dir is not None and (self.cache_dir / f"{k.hex()}.pt").is_file():
                found[k] = self._remember(
                    k, torch.load(self.cache_dir / f"{k.hex()}.pt", weights_only=True)
                )
        todo = [i for i, k in enumerate(keys) if k not in found]
        if todo:
            longest = max(lens[i] for i in todo)
            fresh = self._encode(audio[todo, :longest], audio_lens[todo])
            for j, i in enumerate(todo):
                feat = fresh.features[j, : int(fresh.mask[j].sum())].detach().cpu().clone()
                found[keys[i]] = self._remember(keys[i], feat)
                if self.cache_dir is not None:
                    tmp = self.cache_dir / f".{keys[i].hex()}.{os.getpid()}.tmp"
                    torch.save(feat, tmp)
                    tmp.replace(self.cache_dir / f"{keys[i].hex()}.pt")
        feats = [found[k] for k in keys]
        frames = torch.tensor([f.shape[0] for f in feats], device=audio.device)
        features = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True).to(audio.device)
        return EncoderOutput(features=features, mask=lengths_to_mask(frames, features.shape[1]))

    def _remember(self, key: bytes, feat: torch.Tensor) -> torch.Tensor:
        """Into the in-memory cache; the least recently used go once it holds cache_max_gb."""
        self._cache[key] = feat
        self._cache_bytes += feat.numel() * feat.element_size()
        while self._cache_bytes > self.cache_max_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.numel() * old.element_size()
        return feat

    def _encode(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> EncoderOutput:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.model_type in WHISPER_TYPES:
                states, lengths = self._whisper(audio, audio_lens)
            else:
                states, lengths = self._ssl(audio, audio_lens)
        if self.layer == "last":
            features = states[-1]
        elif self.layer == "weighted":
            w = torch.softmax(self.layer_weights, 0).to(states[0].dtype)
            features = sum(w[i] * s for i, s in enumerate(states))
        else:
            features = states[self.layer]
        mask = lengths_to_mask(lengths, features.shape[1])
        return EncoderOutput(features=features * mask[..., None].to(features.dtype), mask=mask)

    def _run(self, **kwargs) -> tuple[torch.Tensor, ...]:
        want_all = self.layer != "last"
        out = self.model(**kwargs, output_hidden_states=want_all)
        return tuple(out.hidden_states) if want_all else (out.last_hidden_state,)

    def _ssl(self, audio: torch.Tensor, audio_lens: torch.Tensor):
        dtype = next(self.model.parameters()).dtype
        if self.normalize:
            audio = self.normalize_waveform(audio.float(), audio_lens)
        lengths = self.output_lengths(audio_lens)
        if self.per_utterance:
            per = [
                self._run(input_values=audio[i : i + 1, : audio_lens[i]].to(dtype))
                for i in range(len(audio))
            ]
            t_max = int(lengths.max())
            states = tuple(
                torch.cat([nn.functional.pad(p[k], (0, 0, 0, t_max - p[k].shape[1])) for p in per])
                for k in range(len(per[0]))
            )
            return states, lengths
        attn = lengths_to_mask(audio_lens, audio.shape[1]).long()
        states = self._run(input_values=audio.to(dtype), attention_mask=attn)
        return states, lengths

    def _whisper(self, audio: torch.Tensor, audio_lens: torch.Tensor):
        # Whisper always sees a fixed window (30 s natively), so each utterance is padded alike and
        # a batch gives the same frames as one utterance alone; longer audio is cut to the window.
        waves = [a[: int(n)].float().cpu().numpy() for a, n in zip(audio, audio_lens, strict=True)]
        fe = self.feature_extractor
        with torch.autocast("cpu", enabled=False):  # its log-mel maths must stay float32 (numpy)
            feats = fe(
                waves,
                sampling_rate=self.sample_rate,
                return_tensors="pt",
                padding="max_length",
                max_length=fe.n_samples,
                truncation=True,
            ).input_features
        dtype = next(self.model.parameters()).dtype
        states = self._run(input_features=feats.to(audio.device, dtype))
        return states, self.output_lengths(audio_lens)


class PrecomputedFeatures(nn.Module):
    """Stands where the encoder would be when batches bring its features (feature shards,
    data_prep.extract_features): nothing is loaded or run; `record` is the shards' index
    record of the encoder that made them (hidden size, frame rate, sample rate, name)."""

    encodes = False

    def __init__(self, record: dict) -> None:
        super().__init__()
        self.name_or_path = str(record["encoder"])
        self.hidden_size = int(record["hidden_size"])
        self.frame_rate = float(record["frame_rate"])
        self.sample_rate = int(record["sample_rate"])
        self.cache_features = False
        self.frozen = True

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """The inputs are frames already."""
        return lengths

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        mask = lengths_to_mask(lengths, features.shape[1])
        return EncoderOutput(features=features * mask[..., None].to(features.dtype), mask=mask)
