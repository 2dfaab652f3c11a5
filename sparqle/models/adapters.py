"""Modality adapters: speech features (B, T, D) + mask -> LLM-sized embeddings (B, N, H) + mask.

Every adapter is built as `Adapter(encoder_dim, llm_dim, frame_rate, **options)` so configs can
swap them freely; `frame_rate` (encoder frames per second) matters only to time-based ones. Each
says how many LLM positions it gives a clip (`output_lengths`) and what one forward costs
(`flops`, from sparqle/flops.py), so throughput and MFU need not know what is inside.
"""

from __future__ import annotations

import torch
from torch import nn

from sparqle import flops
from sparqle.models.qformer import SpeechQFormer


class QFormerAdapter(nn.Module):
    """SparQLe / BLIP-2: a fixed number of query outputs, projected to the LLM width."""

    forwards_to = SpeechQFormer  # the config keys it passes on (checked before building)

    def __init__(
        self, encoder_dim: int, llm_dim: int, frame_rate: float | None = None, **qformer_kwargs
    ) -> None:
        super().__init__()
        self.qformer = SpeechQFormer(encoder_dim, **qformer_kwargs)
        self.proj = nn.Linear(self.qformer.hidden_size, llm_dim)

    def flops(
        self, frames: list[int], encoder_dim: int, text_lengths: list[int] | None = None
    ) -> float:
        """One forward's FLOPs (sparqle/flops.py) for clips of `frames` encoder frames. Stage 2:
        the queries, then the projection into the LLM. Stage 1 (`text_lengths`): ITC (queries;
        text alone), ITM (3 pairs each), ITG (queries + text, LM head)."""
        cfg, nq, h = self.qformer.config, self.qformer.num_queries, self.qformer.hidden_size
        if text_lengths is None:
            proj = 2 * nq * h * self.proj.out_features
            return sum(flops.qformer_pass(cfg, nq, 0, f, encoder_dim) + proj for f in frames)
        vocab = self.qformer.embeddings.word_embeddings.weight.shape[0]
        return sum(
            flops.qformer_pass(cfg, nq, 0, f, encoder_dim)
            + flops.qformer_pass(cfg, 0, t, 0, encoder_dim)
            + 4 * flops.qformer_pass(cfg, nq, t, f, encoder_dim)
            + 2 * t * h * (h + vocab)
            for f, t in zip(frames, text_lengths, strict=True)
        )

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = self.qformer(features, mask)
        out_mask = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
        return self.proj(queries), out_mask

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """Embeddings per utterance from its encoder frames (the LLM layout, known on the host)."""
        return torch.full_like(frames, self.qformer.num_queries)


class WindowQFormerAdapter(nn.Module):
    """SALMONN's window-level Q-Former: `num_queries` per window of `window_seconds`.

    The output length grows with the audio; windows wholly in padding are masked out.
    """

    forwards_to = SpeechQFormer

    def __init__(
        self,
        encoder_dim: int,
        llm_dim: int,
        frame_rate: float,
        window_seconds: float = 0.33,
        stride_seconds: float | None = None,
        num_queries: int = 1,
        **qformer_kwargs,
    ) -> None:
        super().__init__()
        self.window = max(1, round(window_seconds * frame_rate))
        self.stride = max(1, round((stride_seconds or window_seconds) * frame_rate))
        self.qformer = SpeechQFormer(encoder_dim, num_queries=num_queries, **qformer_kwargs)
        self.proj = nn.Linear(self.qformer.hidden_size, llm_dim)

    def flops(
        self, frames: list[int], encoder_dim: int, text_lengths: list[int] | None = None
    ) -> float:
        """One Q-Former pass and projection per window that holds audio."""
        cfg, nq, h = self.qformer.config, self.qformer.num_queries, self.qformer.hidden_size
        per = (
            flops.qformer_pass(cfg, nq, 0, self.window, encoder_dim)
            + 2 * nq * h * self.proj.out_features
        )
        windows = self.output_lengths(torch.tensor(frames)).div(nq).long().tolist()
        return sum(w * per for w in windows)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = features.shape
        n_win = max(1, -(-max(t - self.window, 0) // self.stride) + 1)
        pad = (n_win - 1) * self.stride + self.window - t
        features = nn.functional.pad(features, (0, 0, 0, pad))
        mask = nn.functional.pad(mask, (0, pad))
        win = features.unfold(1, self.window, self.stride).permute(0, 1, 3, 2)  # (B, W, win, D)
        win_mask = mask.unfold(1, self.window, self.stride)  # (B, W, win)
        win_valid = win_mask.any(-1)  # (B, W)
        flat = win.reshape(b * n_win, self.window, d)
        flat_mask = win_mask.reshape(b * n_win, self.window)
        # A window of pure padding still needs one visible frame for attention to be defined.
        flat_mask = flat_mask | ~flat_mask.any(-1, keepdim=True)
        q = self.qformer(flat, flat_mask)  # (B*W, Nq, H)
        nq = q.shape[1]
        q = q.reshape(b, n_win * nq, -1)
        out_mask = win_valid.repeat_interleave(nq, dim=1)
        return self.proj(q), out_mask

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        """Windows that start inside the audio, `num_queries` each (a prefix of the batch's
        windows, whose count follows the longest utterance). Host-side: reads frames.max()."""
        t = int(frames.max()) if frames.numel() else 0
        n_win = max(1, -(-max(t - self.window, 0) // self.stride) + 1)
        windows = torch.div(frames + self.stride - 1, self.stride, rounding_mode="floor")
        return windows.clamp(max=n_win) * self.qformer.num_queries


class LinearAdapter(nn.Module):
    """SLAM-ASR: concatenate k consecutive frames, then a 2-layer MLP."""

    def __init__(
        self,
        encoder_dim: int,
        llm_dim: int,
        frame_rate: float | None = None,
        downsample: int = 5,
        hidden_dim: int = 2048,
    ) -> None:
        super().__init__()
        self.k = downsample
        self.norm = nn.LayerNorm(encoder_dim)
        self.mlp = nn.Sequential(
            nn.Linear(encoder_dim * downsample, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, llm_dim),
        )

    def flops(
        self, frames: list[int], encoder_dim: int, text_lengths: list[int] | None = None
    ) -> float:
        """The k-frame stacks through the 2-layer MLP."""
        first, second = self.mlp[0], self.mlp[2]
        per = 2 * (
            first.in_features * first.out_features + second.in_features * second.out_features
        )
        return sum(per * -(-f // self.k) for f in frames)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = features.shape
        pad = (-t) % self.k
        x = nn.functional.pad(self.norm(features) * mask[..., None], (0, 0, 0, pad))
        m = nn.functional.pad(mask, (0, pad))
        x = x.reshape(b, (t + pad) // self.k, d * self.k)
        out_mask = m.reshape(b, -1, self.k).any(-1)
        return self.mlp(x), out_mask

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        return torch.div(frames + self.k - 1, self.k, rounding_mode="floor")
