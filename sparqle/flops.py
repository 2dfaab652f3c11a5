"""FLOPs of a training step from the model's real shapes, for throughput and MFU.

Counted the way torch's FlopCounterMode counts: 2 per multiply-add of every linear layer and
convolution (each at its own output length), attention as its two matmuls over the full
positions x positions (4 P^2 h). Work is counted on real lengths, not padding: padding is
waste, and MFU should show it. Per step, a frozen module that runs without autograd (the
encoder) counts its forward once, the frozen LLM twice (forward, and backward to its inputs),
and a trained module three times (forward, backward to inputs and to weights).
`tests/test_flops.py` holds these formulas to FlopCounterMode on the tiny models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def layers(n: int, positions: int, hidden: int, intermediate: int) -> float:
    """n self-attention + MLP blocks over `positions` (Q, K, V, O; two MLP matrices)."""
    per = 2 * positions * (4 * hidden * hidden + 2 * hidden * intermediate)
    return n * (per + 4 * positions * positions * hidden)


def gated_layers(n: int, positions: int, hidden: int, kv: int, intermediate: int) -> float:
    """Llama-style blocks: grouped K/V of width `kv`, a gated MLP of three matrices."""
    per = 2 * positions * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate)
    return n * (per + 4 * positions * positions * hidden)


def conv_frontend(config, samples: int) -> tuple[float, int]:
    """wav2vec2-family feature encoder: (FLOPs, output frames) for one utterance."""
    flops, length, channels = 0.0, samples, 1
    for dim, kernel, stride in zip(
        config.conv_dim, config.conv_kernel, config.conv_stride, strict=True
    ):
        length = (length - kernel) // stride + 1
        flops += 2 * length * dim * channels * kernel
        channels = dim
    return flops, length


def ssl_encoder(config, samples: int) -> float:
    """HuBERT / wav2vec 2.0 / WavLM forward for one utterance of `samples` at 16 kHz."""
    flops, frames = conv_frontend(config, samples)
    h = config.hidden_size
    flops += 2 * frames * config.conv_dim[-1] * h  # feature projection
    k, groups = config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups
    flops += 2 * (frames + 2 * (k // 2) - k + 1) * h * (h // groups) * k  # positional conv
    return flops + layers(config.num_hidden_layers, frames, h, config.intermediate_size)


def whisper_encoder(config, mel_frames: int) -> float:
    """Whisper's encoder over its fixed window (it costs the same for 1 s as for 30 s)."""
    d = config.d_model
    positions = config.max_source_positions
    flops = 2 * mel_frames * d * config.num_mel_bins * 3 + 2 * positions * d * d * 3
    return flops + layers(config.encoder_layers, positions, d, config.encoder_ffn_dim)


def qformer_pass(
    config, queries: int, text: int, frames: int, encoder_dim: int, cross_queries: bool = True
) -> float:
    """One Q-Former pass: `queries` + `text` positions attend jointly; only the queries
    cross-attend to the `frames` speech features (K/V projected once per frame per layer)."""
    h, inter = config.hidden_size, config.intermediate_size
    flops = layers(config.num_hidden_layers, queries + text, h, inter)
    if cross_queries and queries:
        cross = sum(
            1 for i in range(config.num_hidden_layers) if i % config.cross_attention_frequency == 0
        )
        per = 2 * queries * 2 * h * h + 2 * frames * 2 * encoder_dim * h + 4 * queries * frames * h
        flops += cross * per
    return flops


def llm_forward(config, rows: Sequence[int], scored: Sequence[int]) -> float:
    """The decoder over each row's real positions, and the vocabulary projection at the
    positions logits are made for."""
    h = config.hidden_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    flops = sum(
        gated_layers(config.num_hidden_layers, n, h, kv, config.intermediate_size) for n in rows
    )
    return flops + sum(2 * n * h * config.vocab_size for n in scored)


def encoder_forward(encoder, samples: int) -> float:
    """A speech encoder's forward over one clip of `samples` (Whisper: its fixed window)."""
    config = encoder.model.config
    if hasattr(config, "conv_dim"):
        return ssl_encoder(config, samples)
    return whisper_encoder(config, encoder.feature_extractor.nb_max_frames)


def step_work(model, lengths: Sequence[int], losses: Mapping[str, Any]) -> float:
    """A training step's FLOPs from host-side counts: `lengths` are the clips' samples (or
    feature frames), `losses` what the step's loss computation returned (stage 1: the text
    lengths; stage 2: the LLM rows and where scoring starts). The encoder counts its forward
    once (nothing where it does not run: feature shards, or its output cached), the trained
    adapter three times (forward, both backwards), the frozen LLM twice (forward, backward to
    its inputs)."""
    encoder = model.encoder
    import torch

    frames = encoder.output_lengths(torch.tensor(list(lengths), dtype=torch.long)).tolist()
    runs = hasattr(encoder, "model") and not getattr(encoder, "cache_features", False)
    total = sum(encoder_forward(encoder, n) for n in lengths) if runs else 0.0
    total += 3 * model.adapter.flops(frames, encoder.hidden_size, losses.get("text_lengths"))
    if model.llm is not None and losses.get("llm_rows"):
        rows, start = losses["llm_rows"], losses["llm_scored_from"]
        total += 2 * llm_forward(model.llm.model.config, rows, [n - start for n in rows])
    return total
