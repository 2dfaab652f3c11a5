"""Tiny random models, built offline from transformers configs, for tests and CPU runs.

`ensure_tiny(kind, root)` writes an ordinary transformers directory once (atomically, so
parallel ranks agree) and returns its path; configs point at it like at a hub name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoConfig,
    AutoModel,
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Wav2Vec2FeatureExtractor,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

from sparqle.prompts import INSTRUCTIONS, LANGUAGE_NAMES

KINDS = ("encoder", "whisper", "bert", "llm")
_VERSION = "2"  # bump when a tiny architecture or its vocabulary changes, so caches rebuild

# Enough text for tokenizers to learn the common English, German and French pieces.
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a small black cat sleeps in the old house every day",
    "the young woman sees the big red car today",
    "der kleine schwarze Hund schläft heute im alten Haus",
    "die junge Frau sieht das große rote Auto jeden Tag",
    "le petit chien noir dort aujourd'hui dans la vieille maison",
    "la jeune femme voit la grande voiture rouge chaque jour",
    "speech recognition and translation with large language models",
    "hello how are you what is the capital of France Paris is the capital",
    "one two three four five six seven eight nine ten",
    *[" ".join(v) for v in INSTRUCTIONS.values()],
    " ".join(LANGUAGE_NAMES.values()),
]
_ALPHABET = list(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZäöüÄÖÜßéèêàâçîôûëïœ0123456789.,;:!?'\"-()"
)

LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _corpus() -> list[str]:
    return _CORPUS * 4


def tiny_llm_tokenizer(
    vocab_size: int = 800, corpus: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Llama-3-style chat specials and template, learnt from `corpus`."""
    specials = [
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|pad|>",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or _corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|pad|>",
        chat_template=LLAMA3_STYLE_TEMPLATE,
    )


def tiny_bert_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=[c.lower() for c in _ALPHABET],
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
    )


def build_tiny_encoder(
    out: Path, model_type: str = "hubert", feat_extract_norm: str = "layer"
) -> None:
    """A 2-layer wav2vec2-family model with the real 7-layer conv front end (320x, 50 frames/s)."""
    config = AutoConfig.for_model(
        model_type,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32,) * 7,
        feat_extract_norm=feat_extract_norm,
        do_stable_layer_norm=feat_extract_norm == "layer",
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        vocab_size=32,
    )
    AutoModel.from_config(config).save_pretrained(out)
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    ).save_pretrained(out)


def build_tiny_whisper(out: Path) -> None:
    """A 2+2-layer Whisper with the real 80-bin log-mel front end and 30-s window."""
    config = WhisperConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=64,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    WhisperModel(config).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out)


def build_tiny_bert(out: Path) -> None:
    tokenizer = tiny_bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def save_llama(out: Path, tokenizer: PreTrainedTokenizerFast, **dims) -> None:
    """A randomly initialised Llama sized by `dims`, with its tokenizer, as a transformers directory."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dims,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tiny_llm(out: Path) -> None:
    save_llama(
        out,
        tiny_llm_tokenizer(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


_BUILDERS = {
    "encoder": build_tiny_encoder,
    "whisper": build_tiny_whisper,
    "bert": build_tiny_bert,
    "llm": build_tiny_llm,
}


def ensure_tiny(kind: str, root: str | os.PathLike) -> str:
    """Path of the tiny model `kind` under root, building it (seeded, deterministic) if absent."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny model {kind!r}; expected one of {', '.join(KINDS)}")
    target = Path(root) / f"tiny-{kind}-v{_VERSION}"
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        _BUILDERS[kind](tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
