"""Train a small LLM on text only to follow the grammar's instructions, before it hears speech.

    python -m demo.text_llm --out DIR [--steps 1500] [--exclude val.jsonl]

The model learns to repeat English sentences and to translate them into German and French, with
the instructions SparQLe uses (the English text sits where speech will, between <Speech> tags)
and plain ones ("Translate into German: ..."). Sentences of --exclude manifests are never shown,
so translating them later is a test. Writes an ordinary transformers directory (Llama + tokenizer
with a chat template), the same kind of thing as a hub LLM.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from data_prep.grammar import Sentence, sample_sentence
from sparqle.cli import reports_user_errors
from sparqle.models.llm import LLM, SPEECH_PLACEHOLDER
from sparqle.models.tiny import save_llama, tiny_llm_tokenizer
from sparqle.prompts import INSTRUCTIONS, TRANSCRIBE, TRANSLATE, instruction

LANGS = {"de": "German", "fr": "French"}


def sentences(n: int, seed: int, exclude: set[str]) -> list[Sentence]:
    rng, out, seen = random.Random(seed), [], set(exclude)
    for _ in range(n * 20):
        s = sample_sentence(rng)
        if s.en not in seen:
            seen.add(s.en)
            out.append(s)
            if len(out) == n:
                break
    return out


def examples(llm: LLM, pool: list[Sentence], rng: random.Random) -> list[tuple[str, str]]:
    """(prompt text, target) pairs: the speech-style prompt with text in place of speech, and plain ones."""
    out = []
    for s in pool:
        task, lang = rng.choice([(TRANSCRIBE, None), (TRANSLATE, "de"), (TRANSLATE, "fr")])
        target = s.en if lang is None else getattr(s, lang)
        if rng.random() < 0.75:
            prompt = llm.render_prompt(instruction(task, lang, rng)).replace(
                SPEECH_PLACEHOLDER, s.en
            )
        else:
            plain = f"Repeat: {s.en}" if lang is None else f"Translate into {LANGS[lang]}: {s.en}"
            prompt = llm.render_prompt(plain).replace(
                f"{llm.speech_begin}{SPEECH_PLACEHOLDER}{llm.speech_end} ", ""
            )
        out.append((prompt, target))
    return out


def batch_tensors(
    llm: LLM, pairs: list[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tok = llm.tokenizer
    prompts = tok([p for p, _ in pairs], add_special_tokens=False).input_ids
    targets = llm.target_ids([t for _, t in pairs])
    rows = [p + t for p, t in zip(prompts, targets, strict=True)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (p, r) in enumerate(zip(prompts, rows, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, len(p) : len(r)] = torch.tensor(r[len(p) :])
    return ids, (ids != tok.pad_token_id) | (labels != -100), labels


def build(
    out: Path, steps: int, exclude: set[str], seed: int = 0, batch: int = 48
) -> dict[str, float]:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pool = sentences(20000, seed, exclude)
    corpus = [x for s in pool[:4000] for x in (s.en, s.de, s.fr)] + [
        " ".join(v) for v in INSTRUCTIONS.values()
    ]
    tokenizer = tiny_llm_tokenizer(vocab_size=1200, corpus=corpus)
    # built beside `out` and moved there only when trained: a killed build must not leave a
    # randomly initialised LLM where the demo's training looks for a taught one
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_llama(
        partial,
        tokenizer,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    llm = LLM(str(partial), frozen=False)
    model = llm.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        ),
    )
    train, held = pool[:-200], pool[-200:]
    start, losses = time.time(), []
    for step in range(steps):
        ids, mask, labels = batch_tensors(llm, examples(llm, rng.sample(train, batch), rng))
        loss = model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(
                f"step {step:5d} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} ({time.time() - start:.0f} s)",
                file=sys.stderr,
            )
    model.eval()
    model.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return {
        "loss": sum(losses[-50:]) / len(losses[-50:]),
        "exact_match": exact_match(llm, held[:60]),
    }


@torch.no_grad()
def exact_match(llm: LLM, pool: list[Sentence]) -> float:
    """Share of held-out sentences translated into German exactly (greedy)."""
    pairs = [
        (llm.render_prompt(instruction(TRANSLATE, "de")).replace(SPEECH_PLACEHOLDER, s.en), s.de)
        for s in pool
    ]
    tok = llm.tokenizer
    tok.padding_side = "left"
    enc = tok([p for p, _ in pairs], add_special_tokens=False, return_tensors="pt", padding=True)
    out = llm.model.generate(
        **enc,
        max_new_tokens=40,
        do_sample=False,
        eos_token_id=llm.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    hyps = tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return sum(h.strip() == t for h, (_, t) in zip(hyps, pairs, strict=True)) / len(pairs)


@reports_user_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--exclude", type=Path, nargs="*", default=[], help="manifests whose sentences stay unseen"
    )
    args = p.parse_args(argv)
    exclude = set()
    for m in args.exclude:
        for line in m.read_text().splitlines():
            exclude |= set(json.loads(line)["text"].replace(". ", ".\n").splitlines())
    result = build(args.out, args.steps, exclude, args.seed)
    print(
        f"text LLM -> {args.out}: final loss {result['loss']:.3f}, held-out German exact match {result['exact_match']:.0%}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
