"""BLIP-2's Q-Former over speech features, built from transformers' BLIP-2 classes.

Learned queries self-attend, cross-attend to the (LayerNorm-ed) speech features every
`cross_attention_frequency` layers, and come out as a fixed number of vectors. Text
positions (stage-1 losses) share the self-attention and use their own FFNs, as in BLIP-2.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM, Blip2QFormerConfig, Blip2QFormerModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool "may attend" mask -> additive float mask, which every attention backend accepts."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed.bool(), torch.finfo(dtype).min
    )


class SpeechQFormer(nn.Module):
    """With `bert` set, the architecture and weights come from that BERT checkpoint.

    The vocabulary has one slot past BERT's for the `[DEC]` token of the generation loss,
    so the parameter shapes are the same in both stages.
    """

    def __init__(
        self,
        encoder_dim: int,
        num_queries: int = 100,
        cross_attention_frequency: int = 2,
        bert: str | None = None,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        vocab_size: int = 30522,
        max_position_embeddings: int = 512,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if bert is not None:
            b = AutoConfig.from_pretrained(bert)
            hidden_size, num_layers, num_heads = (
                b.hidden_size,
                b.num_hidden_layers,
                b.num_attention_heads,
            )
            intermediate_size, vocab_size = b.intermediate_size, b.vocab_size
            max_position_embeddings = b.max_position_embeddings
        self.bert_vocab_size = vocab_size
        self.config = Blip2QFormerConfig(
            vocab_size=vocab_size + 1,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            max_position_embeddings=max_position_embeddings,
            cross_attention_frequency=cross_attention_frequency,
            encoder_hidden_size=encoder_dim,
            use_qformer_text_input=True,
        )
        self.hidden_size = hidden_size
        self.num_queries = num_queries
        self.speech_norm = nn.LayerNorm(encoder_dim)
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, hidden_size) * 0.02)
        self.embeddings = Blip2TextEmbeddings(self.config)
        self.qformer = Blip2QFormerModel(self.config)
        self.copied_from_bert: list[str] = []
        if bert is not None:
            self.copied_from_bert = self.load_bert(bert)
        with torch.no_grad():  # the [DEC] row as BERT initialises a new token (LAVIS's resize)
            self.embeddings.word_embeddings.weight[vocab_size:].normal_(
                0.0, self.config.initializer_range
            )

    def text_parameters(self) -> list[nn.Parameter]:
        """Parameters only text positions use (embeddings, text FFNs): idle in stage 2."""
        params = list(self.embeddings.parameters())
        for layer in self.qformer.encoder.layer:
            params += list(layer.intermediate.parameters()) + list(layer.output.parameters())
        return params

    @torch.no_grad()
    def load_bert(self, path: str) -> list[str]:
        """Copy BERT's embeddings and layers; the query FFNs start as copies of the text FFNs.

        Returns the names of the parameters written. Cross-attention stays randomly initialised.
        """
        bert = AutoModelForMaskedLM.from_pretrained(path).base_model
        src = bert.state_dict()
        own = dict(self.named_parameters())
        copied = []

        def put(dst: str, key: str) -> None:
            value = src[key]
            if dst.endswith("word_embeddings.weight"):
                own[dst][: value.shape[0]].copy_(value)
            else:
                own[dst].copy_(value)
            copied.append(dst)

        for p in ("weight",):
            put(f"embeddings.word_embeddings.{p}", f"embeddings.word_embeddings.{p}")
            put(f"embeddings.position_embeddings.{p}", f"embeddings.position_embeddings.{p}")
        for p in ("weight", "bias"):
            put(f"qformer.layernorm.{p}", f"embeddings.LayerNorm.{p}")
        for i in range(self.config.num_hidden_layers):
            s, d = f"encoder.layer.{i}", f"qformer.encoder.layer.{i}"
            for p in ("weight", "bias"):
                for m in ("query", "key", "value"):
                    put(f"{d}.attention.attention.{m}.{p}", f"{s}.attention.self.{m}.{p}")
                put(f"{d}.attention.output.dense.{p}", f"{s}.attention.output.dense.{p}")
                put(f"{d}.attention.output.LayerNorm.{p}", f"{s}.attention.output.LayerNorm.{p}")
                for text, query in (
                    ("intermediate", "intermediate_query"),
                    ("output", "output_query"),
                ):
                    put(f"{d}.{text}.dense.{p}", f"{s}.{text}.dense.{p}")
                    put(f"{d}.{query}.dense.{p}", f"{s}.{text}.dense.{p}")
                put(f"{d}.output.LayerNorm.{p}", f"{s}.output.LayerNorm.{p}")
                put(f"{d}.output_query.LayerNorm.{p}", f"{s}.output.LayerNorm.{p}")
        return copied

    def prepare_speech(self, features: torch.Tensor) -> torch.Tensor:
        return self.speech_norm(features)

    def forward(
        self,
        speech: torch.Tensor,
        speech_mask: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Queries (then text, if given) over LayerNorm-ed speech (B, T, D) -> (B, Nq [+ L], H).

        `attention_mask` covers queries + text: (B, Nq + L) padding mask or a (B, 1, Nq+L, Nq+L)
        bool mask of allowed positions.
        """
        attention_mask = _as_4d(attention_mask, self.query_tokens.dtype)
        speech = self.prepare_speech(speech)
        queries = self.query_tokens.expand(speech.shape[0], -1, -1)
        embeds = (
            self.embeddings(input_ids=input_ids, query_embeds=queries)
            if input_ids is not None
            else queries
        )
        out = self.qformer(
            query_embeds=embeds,
            query_length=self.num_queries,
            attention_mask=attention_mask,
            encoder_hidden_states=speech,
            # 4-D so it broadcasts over however many positions cross-attend (only the queries).
            encoder_attention_mask=additive_mask(speech_mask[:, None, None, :], speech.dtype),
        )
        return out.last_hidden_state

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text alone, bidirectional, no speech (the text side of the contrastive loss)."""
        out = self.qformer(
            query_embeds=self.embeddings(input_ids=input_ids),
            query_length=0,
            attention_mask=_as_4d(attention_mask, self.query_tokens.dtype),
        )
        return out.last_hidden_state


def _as_4d(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A padding (B, L) or allowed-positions (B, 1, L, L) mask as the additive 4-D mask
    transformers takes as it is; given a 2-D one it would read it back to the host to decide
    whether it can be skipped."""
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    return additive_mask(mask.bool(), dtype)
