"""Loading pretrained parts quietly: transformers' per-load progress bars and key-report tables
(UNEXPECTED / MISSING keys of the BERT head we do not use) read as errors to a user, so they are
held back unless HYDRA_FULL_ERROR=1 asks for everything; one line per part is said instead."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from sparqle.cli import verbose


@contextmanager
def quiet_loading() -> Iterator[None]:
    if verbose():
        yield
        return
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def describe(role: str, name: str, part: nn.Module) -> str:
    """`encoder: facebook/hubert-large-ll60k, 315.4M parameters (bfloat16), frozen`."""
    params = list(part.parameters())
    total = sum(p.numel() for p in params)
    trained = sum(p.numel() for p in params if p.requires_grad)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    state = (
        "frozen"
        if trained == 0
        else ("trained" if trained == total else f"{trained / 1e6:.1f}M trained")
    )
    return f"{role}: {name}, {total / 1e6:.1f}M parameters ({', '.join(dtypes)}), {state}"


def load_frozen(auto_class, name_or_path: str, dtype, device: str | None = None) -> nn.Module:
    """A pretrained model that will not be trained, without a private host copy per rank:

    - onto a GPU (`device` "cuda:N"): straight there, tensor by tensor (transformers'
      `device_map`), instead of whole into host memory first and then moved;
    - on the CPU: as transformers loads safetensors stored in the requested dtype, mapped from
      the file, so every rank of a node shares the one copy in the page cache (measured in
      tests/test_host_memory.py). Weights stored in another dtype (a float32 checkpoint loaded as
      bfloat16) are converted into each rank's own memory: convert the files once instead."""
    if device is not None and str(device).startswith("cuda"):
        return auto_class.from_pretrained(name_or_path, dtype=dtype, device_map={"": device})
    return auto_class.from_pretrained(name_or_path, dtype=dtype)
