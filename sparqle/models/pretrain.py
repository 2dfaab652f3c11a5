"""Stage 1: BLIP-2's three Q-Former losses on speech-transcript pairs.

- ITC: contrastive, 256-d projections, max over queries, learnable temperature,
  negatives gathered from every rank (each rank's rows get every rank's gradient).
- ITM: binary matching on query outputs, hard negatives drawn from the ITC similarities
  over the batch gathered from every rank, as BLIP-2 does.
- ITG: transcript generation from the queries, `[DEC]` first, causal text mask.
- Optional, not in BLIP-2 (`query_spread_weight`, default 0): VICReg's variance hinge across
  the queries of each utterance. None of the three losses needs the queries to differ, and a
  short stage 1 can let the queries' self-attention average them into one vector repeated
  Nq times, which stage 2 then has to pull apart again (docs/paper_recipe.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForMaskedLM, AutoTokenizer
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

from sparqle.distributed import exchange_sizes, gather_rows, node_group, pad_to
from sparqle.models.qformer import SpeechQFormer

DEC_TOKEN = "[DEC]"


def generation_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, Nq+L, Nq+L) bool: queries see queries; text sees all queries and earlier text."""
    b, length = text_mask.shape
    total = num_queries + length
    mask = torch.zeros(b, 1, total, total, dtype=torch.bool, device=text_mask.device)
    mask[:, :, :, :num_queries] = True
    causal = torch.ones(length, length, dtype=torch.bool, device=text_mask.device).tril()
    mask[:, 0, num_queries:, num_queries:] = causal[None] & text_mask.bool()[:, None, :]
    return mask


def query_spread(query_out: torch.Tensor) -> torch.Tensor:
    """(B, Nq, H) -> (B, H): per utterance and channel, the standard deviation across queries;
    near 0 when every query carries the same vector (collapse)."""
    return (query_out.float().var(dim=1, unbiased=False) + 1e-4).sqrt()


class SpeechTextPretrainer(nn.Module):
    """The stage-1 heads. The Q-Former itself is passed in, so it is owned (and saved) once."""

    def __init__(
        self,
        qformer: SpeechQFormer,
        tokenizer: str,
        embed_dim: int = 256,
        temperature: float = 0.07,
        max_text_tokens: int = 100,
        label_smoothing: float = 0.1,
        query_spread_weight: float = 0.0,
        query_spread_target: float = 0.5,
        itm_negatives: str = "node",
        temperature_clamp: tuple[float, float] | list[float] | None = (0.001, 0.5),
    ) -> None:
        """`itm_negatives`: where ITM's hard negatives are drawn from on several ranks: `all`
        (BLIP-2: the batch gathered over every rank, so every rank receives every rank's speech
        features) or `node` (the ranks of this node: their features cross no network and what a
        GPU receives stays that of one node however many nodes train). ITC's negatives are the
        whole gathered batch either way (its projections are small). `temperature_clamp`: the
        range BLIP (1) keeps its contrastive temperature in after each step; BLIP-2 and the
        SparQLe authors' stage 1 have none (null). The values' ranges are checked with the rest
        of the config (sparqle/config_check.py), before anything is built."""
        super().__init__()
        self.itm_negatives = itm_negatives
        self.temperature_clamp = tuple(temperature_clamp) if temperature_clamp else None
        self.query_spread_weight = query_spread_weight
        self.query_spread_target = query_spread_target
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
        self.dec_token_id = self.tokenizer.convert_tokens_to_ids(DEC_TOKEN)
        if self.dec_token_id != qformer.bert_vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer} has {self.dec_token_id} tokens but the Q-Former's BERT "
                f"vocabulary has {qformer.bert_vocab_size}: use the tokenizer of adapter.bert"
            )
        h = qformer.hidden_size
        self.max_text_tokens = max_text_tokens
        self.label_smoothing = label_smoothing
        self.speech_proj = nn.Linear(h, embed_dim)
        self.text_proj = nn.Linear(h, embed_dim)
        self.itm_head = nn.Linear(h, 2)
        self.temp = nn.Parameter(torch.full((1,), temperature))  # 1-D: FSDP shards no scalars
        self.lm_transform = BertPredictionHeadTransform(qformer.config)
        self.lm_bias = nn.Parameter(torch.zeros(qformer.config.vocab_size))

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        """Keep the contrastive temperature in `temperature_clamp` (BLIP's [0.001, 0.5]) if set;
        called after each optimizer step, on the master weight (under FSDP the forward only sees
        a gathered copy)."""
        if self.temperature_clamp is not None:
            self.temp.clamp_(*self.temperature_clamp)

    @torch.no_grad()
    def load_bert_lm_head(self, path: str) -> bool:
        """Initialise the ITG head from the BERT checkpoint's MLM head, if it has one."""
        mlm, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
        if any(k.startswith("cls.predictions.transform") for k in info["missing_keys"]):
            return False
        head = mlm.cls.predictions
        self.lm_transform.load_state_dict(head.transform.state_dict())
        bias = head.decoder.bias if head.decoder.bias is not None else head.bias
        self.lm_bias[: bias.shape[0]].copy_(bias)
        return True

    def tokenize(self, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_text_tokens
        )
        # lists until the copy, so the lengths (for FLOP counts) never read a tensor back
        out = {k: torch.tensor(enc[k], device=device) for k in ("input_ids", "attention_mask")}
        out["lengths"] = [sum(m) for m in enc["attention_mask"]]
        return out

    def similarities(
        self,
        speech_feat: torch.Tensor,
        text_feat: torch.Tensor,
        all_speech: torch.Tensor,
        all_text: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Speech-to-text and text-to-speech logits, max over queries, in float32 even under
        autocast: divided by a temperature near 0.01, bf16 products would be quantised by ~0.1."""
        with torch.autocast(speech_feat.device.type, enabled=False):
            s, t, temp = speech_feat.float(), text_feat.float(), self.temp.float()
            sim_s2t = torch.einsum("bqe,ge->bqg", s, all_text.float()).amax(1) / temp
            sim_t2s = torch.einsum("be,gqe->bgq", t, all_speech.float()).amax(2) / temp
        return sim_s2t, sim_t2s

    def forward(
        self,
        qformer: SpeechQFormer,
        features: torch.Tensor,
        mask: torch.Tensor,
        texts: list[str],
        contributes: bool = True,
        sample_negatives: bool = True,
    ) -> dict[str, torch.Tensor]:
        """The three losses (and what validation and logging read). `contributes=False`: a
        stand-in batch that takes part in the collectives with no rows, so no rank's figures
        count it (its own losses come out 0). `sample_negatives=False`: ITM takes each row's
        hardest negative (the most similar non-pair) instead of drawing one, so validation draws
        no random numbers and gives the same figure however the batch is split over ranks."""
        text = self.tokenize(texts, features.device)
        ids, text_mask = text["input_ids"], text["attention_mask"]
        b, nq = features.shape[0], qformer.num_queries
        n = b if contributes else 0  # rows this rank adds to the batch gathered over ranks
        # every rank's rows, frames and text length: the step's one exchange on the host
        sizes = exchange_sizes([n, features.shape[1], ids.shape[1]])
        rows = [s[0] for s in sizes]

        # ITC
        query_out = qformer(features, mask)
        speech_feat = F.normalize(self.speech_proj(query_out).float(), dim=-1)  # (B, Nq, E)
        text_out = qformer.encode_text(ids, text_mask)
        text_feat = F.normalize(self.text_proj(text_out[:, 0]).float(), dim=-1)  # (B, E)
        all_speech, offset = gather_rows(speech_feat[:n], rows=rows)
        all_text, _ = gather_rows(text_feat[:n], rows=rows)
        sim_s2t, sim_t2s = self.similarities(speech_feat[:n], text_feat[:n], all_speech, all_text)
        targets = torch.arange(n, device=features.device) + offset
        itc = (
            F.cross_entropy(sim_s2t, targets, label_smoothing=self.label_smoothing)
            + F.cross_entropy(sim_t2s, targets, label_smoothing=self.label_smoothing)
        ) / 2

        # ITM with hard negatives from the batch of every rank
        itm = self._itm(
            qformer, features, mask, ids, text_mask, sim_s2t, sim_t2s, sizes, n, sample_negatives
        )

        # ITG
        dec_ids = ids.clone()
        dec_ids[:, 0] = self.dec_token_id
        gen_mask = generation_mask(nq, text_mask)
        gen_out = qformer(features, mask, input_ids=dec_ids, attention_mask=gen_mask)[:, nq:]
        word_emb = qformer.embeddings.word_embeddings.weight
        logits = F.linear(self.lm_transform(gen_out), word_emb, self.lm_bias)
        labels = dec_ids.masked_fill(text_mask == 0, -100)
        itg = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            label_smoothing=self.label_smoothing,
        )
        spread = query_spread(query_out)
        hinge = F.relu(self.query_spread_target - spread).mean()
        loss = itc + itm + itg
        if self.query_spread_weight > 0:
            loss = loss + self.query_spread_weight * hinge
        if not contributes:  # computed for the collectives and backward's shape; counts nothing
            itc, itm, loss = itc.nan_to_num(0.0) * 0.0, itm * 0.0, loss.nan_to_num(0.0) * 0.0
        return {
            "itc": itc,
            "itm": itm,
            "itg": itg,
            "loss": loss,
            "query_spread": spread.detach().mean(),
            "query_spread_hinge": hinge.detach(),
            "sim_s2t": sim_s2t.detach(),
            "itc_targets": targets,
            "temperature": self.temp.detach().squeeze().clone(),  # FSDP frees the gathered one
            "text_lengths": text["lengths"],
            # the tokens ITG predicts (all but the first of each text): host-side, for averaging
            "itg_tokens": sum(max(0, t - 1) for t in text["lengths"]),
        }

    def _itm(
        self, qformer, features, mask, ids, text_mask, sim_s2t, sim_t2s, sizes, n, sample
    ) -> torch.Tensor:
        """Matching with a hard negative per row: for each speech a text, for each text a speech,
        drawn by similarity (`sample`) or the most similar, from the batch of the ranks in
        `itm_negatives`. Only those ranks' features are gathered."""
        b = features.shape[0]
        group, members = node_group() if self.itm_negatives == "node" else (None, None)
        members = members if members is not None else list(range(len(sizes)))
        rows = [sizes[r][0] for r in members]
        frames = max(sizes[r][1] for r in members)
        length = max(sizes[r][2] for r in members)
        start = sum(s[0] for s in sizes[: members[0]])  # the members' first column in the sims
        features = pad_to(features, [b, frames, features.shape[2]])
        mask = pad_to(mask, [b, frames])
        ids = pad_to(ids, [b, length], self.tokenizer.pad_token_id)
        text_mask = pad_to(text_mask, [b, length])
        pad_id = self.tokenizer.pad_token_id
        all_feats, offset = gather_rows(features[:n], rows=rows, group=group)
        all_mask, _ = gather_rows(mask[:n], rows=rows, group=group)
        all_ids, _ = gather_rows(ids[:n], pad_value=pad_id, rows=rows, group=group)
        all_text_mask, _ = gather_rows(text_mask[:n], rows=rows, group=group)
        total = all_feats.shape[0]
        # no negatives to draw, or nothing of this rank's to score: a zero that still reaches
        # the head keeps DDP happy
        if total < 2 or n == 0:
            return sum(p.sum() for p in self.itm_head.parameters()) * 0.0
        sim_s2t, sim_t2s = sim_s2t[:, start : start + total], sim_t2s[:, start : start + total]
        with torch.no_grad():
            rows_here = torch.arange(b, device=ids.device)
            own = rows_here + offset
            # Pairs with the same transcript are not negatives; nor is a row's own pair.
            same = (ids[:, None, :] == all_ids[None, :, :]).all(-1)
            same[rows_here, own] = True
            if sample:  # BLIP-2: drawn by similarity
                w_s2t = F.softmax(sim_s2t.float(), dim=1).masked_fill(same, 0) + 1e-9
                w_t2s = F.softmax(sim_t2s.float(), dim=1).masked_fill(same, 0) + 1e-9
                w_s2t[rows_here, own] = 0
                w_t2s[rows_here, own] = 0
                neg_text = torch.multinomial(w_s2t, 1).squeeze(1)  # per speech, a negative text
                neg_speech = torch.multinomial(w_t2s, 1).squeeze(1)  # per text, a negative speech
            else:  # the hardest: the most similar non-pair
                neg_text = sim_s2t.float().masked_fill(same, -torch.inf).argmax(1)
                neg_speech = sim_t2s.float().masked_fill(same, -torch.inf).argmax(1)
        speech_all = torch.cat([features, all_feats[neg_speech], features])
        mask_all = torch.cat([mask, all_mask[neg_speech], mask])
        ids_all = torch.cat([ids, ids, all_ids[neg_text]])
        text_mask_all = torch.cat([text_mask, text_mask, all_text_mask[neg_text]])
        query_mask = torch.ones(
            3 * b, qformer.num_queries, dtype=text_mask.dtype, device=ids.device
        )
        out = qformer(
            speech_all,
            mask_all,
            input_ids=ids_all,
            attention_mask=torch.cat([query_mask, text_mask_all], 1),
        )
        logits = self.itm_head(out[:, : qformer.num_queries]).mean(1)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(ids.device)
        return F.cross_entropy(logits.float(), labels)
