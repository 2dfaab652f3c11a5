"""Published models by their architecture alone: a config-only directory (with a small stand-in
tokenizer) and random weights instead of loading, so a plan or a benchmark of HuBERT-large,
Llama-3-8B or Qwen2.5-7B needs no download; on the meta device they cost no memory either."""

from __future__ import annotations

import contextlib
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
)

from sparqle.models.tiny import ensure_tiny

ARCHITECTURES = {
    "facebook/hubert-large-ll60k": (
        "hubert",
        dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            feat_extract_norm="layer",
            do_stable_layer_norm=True,
            conv_bias=True,
        ),
    ),
    "facebook/hubert-base-ls960": ("hubert", {}),
    "microsoft/wavlm-large": (
        "wavlm",
        dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            feat_extract_norm="layer",
            do_stable_layer_norm=True,
            conv_bias=False,
        ),
    ),
    "google-bert/bert-base-uncased": ("bert", {}),
    "meta-llama/Meta-Llama-3-8B-Instruct": (
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            rope_theta=500000.0,
            max_position_embeddings=8192,
        ),
    ),
    "Qwen/Qwen2.5-7B-Instruct": (
        "qwen2",
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
        ),
    ),
}


def architecture_dir(name: str, cache: Path) -> str:
    """A config-only directory for a published model (plus a small stand-in tokenizer)."""
    model_type, kwargs = ARCHITECTURES[name]
    out = cache / "bench-architectures" / name.replace("/", "--")
    if not (out / "config.json").is_file():
        AutoConfig.for_model(model_type, **kwargs).save_pretrained(out)
        donor = {"hubert": "encoder", "wavlm": "encoder", "bert": "bert"}.get(model_type, "llm")
        src = Path(ensure_tiny(donor, cache))
        for f in src.iterdir():  # tokenizer / feature-extractor files only
            if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
                (out / f.name).write_bytes(f.read_bytes())
        if model_type == "bert":  # the Q-Former checks its tokenizer against BERT's vocabulary
            tok = AutoTokenizer.from_pretrained(out)
            size = AutoConfig.from_pretrained(out).vocab_size
            tok.add_tokens([f"[unused{i}]" for i in range(size - len(tok))])
            tok.save_pretrained(out)
    return str(out)


@contextlib.contextmanager
def random_weights():
    """from_pretrained builds from the directory's config with random weights instead of loading."""
    saved = {c: c.from_pretrained for c in (AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM)}

    def make(cls):
        def load(path, *args, output_loading_info=False, dtype=None, **kwargs):
            model = cls.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
            return (
                (model, {"missing_keys": ["cls.predictions.transform.dense.weight"]})
                if output_loading_info
                else model
            )

        return load

    try:
        for c in saved:
            c.from_pretrained = make(c)
        yield
    finally:
        for c, f in saved.items():
            c.from_pretrained = f
