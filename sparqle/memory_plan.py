"""Device memory a training step needs per GPU, from the configured model's real shapes.

Weights, gradients and optimizer state are counted from the module itself (built on the meta
device by `bench/memory_plan.py`, so an 8B LLM costs nothing to count), by role and stored
dtype. Activations are estimated per block from what autograd keeps for backward:

- frozen decoder layer (the LLM; backward runs through it to reach the adapter, but its
  weights need no gradient, so linear layers keep no inputs): per token, the two RMSNorm inputs
  and statistics in fp32 (8h + 8), q and the attention output (2 x 2h), k and v (4 kv), the
  log-sum-exp of fused attention (4 heads) and three MLP tensors (6I) in the compute dtype:
  12h + 4kv + 6I + 4 heads bytes. `tests/test_memory_plan.py` checks this against the tensors
  autograd saves in a real Llama layer;
- trained Q-Former layer: every linear keeps its input too: per position b(8h + 2I) for self-
  attention and FFN, b 5h more at cross-attention layers, whose keys and values keep b 2h per
  speech frame;
- logits: scored positions x vocabulary x (b + 4 + 4): the logits, their fp32 copy for the
  loss and its gradient (stage 2 makes logits only from the first target position on);
- stage 1 on several ranks: ITM's hard negatives come from the speech features gathered from
  the ranks of a node (`stage.pretrain.itm_negatives=node`) or of the world (`all`), held through
  the step;
- the frozen encoder runs without autograd: only its largest transient (the conv front end's
  first layer at the audio rate) counts, and it is freed before the adapter and LLM run;
- with activation checkpointing on the LLM (`llm.activation_checkpointing`, or FSDP's
  `trainer.strategy.activation_checkpointing`), a layer keeps only its input (h values a token
  in the compute dtype) and one layer's activations exist at a time, while backward recomputes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GiB = 2**30


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def frozen_decoder_layer_bytes(
    hidden: int, kv_dim: int, intermediate: int, heads: int, dtype_bytes: int = 2
) -> int:
    """Bytes autograd keeps per token in one frozen Llama-style layer (see the module doc)."""
    b = dtype_bytes
    return 8 * hidden + 8 + 2 * b * hidden + 2 * b * kv_dim + 4 * heads + 3 * b * intermediate


@dataclass
class StepShape:
    """The batch a rank processes: utterances, seconds each, and token counts per utterance."""

    batch: int
    seconds: float
    prompt_tokens: int  # chat template, system prompt and instruction around the speech
    target_tokens: int  # longest target plus the end token
    text_tokens: int  # stage 1: transcript length in the Q-Former's tokenizer


def parameter_bytes(module) -> dict[str, int]:
    """Stored bytes of frozen weights by part, and the trained parameters' count."""
    model = module.model
    frozen = {
        "encoder": _bytes(p for p in model.encoder.parameters() if not p.requires_grad),
        "adapter": _bytes(p for p in model.adapter.parameters() if not p.requires_grad),
        "llm": 0
        if model.llm is None
        else _bytes(p for p in model.llm.parameters() if not p.requires_grad),
    }
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {**frozen, "trained_params": trained}


def activation_bytes(
    module,
    shape: StepShape,
    compute_bytes: int = 2,
    checkpointed: bool | None = None,
    gathered_ranks: int = 1,
) -> dict[str, int]:
    """Estimated bytes kept for backward (and the encoder's transient peak) for one step.
    `checkpointed`: the LLM's layers are recomputed in backward (None: as the module's LLM was
    built)."""
    model, b = module.model, compute_bytes
    enc = model.encoder
    frames = int(shape.seconds * enc.frame_rate)
    samples = int(shape.seconds * enc.sample_rate)
    enc_cfg = enc.model.config
    if hasattr(
        enc_cfg, "conv_dim"
    ):  # wav2vec2 family: the first conv layer at 1/5 of the audio rate
        transient = shape.batch * enc_cfg.conv_dim[0] * (samples // enc_cfg.conv_stride[0]) * b * 2
    else:  # Whisper: the first conv over 100 mel frames a second of its window
        transient = shape.batch * enc_cfg.d_model * 3000 * b * 2
    out = {"encoder_transient": transient}
    features = shape.batch * frames * enc.hidden_size * 4  # cast to the fp32 adapter, kept
    qformer = getattr(model.adapter, "qformer", None)
    if qformer is None:
        out["adapter"] = features
    else:
        cfg = qformer.config
        h, inter = cfg.hidden_size, cfg.intermediate_size
        cross = sum(
            1 for i in range(cfg.num_hidden_layers) if i % cfg.cross_attention_frequency == 0
        )
        nq, lt = qformer.num_queries, shape.text_tokens
        if model.heads is None:  # stage 2: the queries alone, one pass
            positions, query_positions, speech_passes = nq, nq, 1
        else:  # stage 1: ITC (queries, text), ITM (3 x queries + text), ITG (queries + text)
            positions = nq + lt + 3 * (nq + lt) + (nq + lt)
            query_positions, speech_passes = 5 * nq, 5
        per_layer = b * (8 * h + 2 * inter) * positions * shape.batch
        cross_bytes = cross * b * (5 * h * query_positions + 2 * h * frames * speech_passes)
        out["adapter"] = features + cfg.num_hidden_layers * per_layer + cross_bytes * shape.batch
        if model.heads is not None:
            out["logits"] = shape.batch * lt * cfg.vocab_size * (b + 4 + 4)
            # ITM's negatives: the speech features of `gathered_ranks` ranks' batches (fp32, as
            # the adapter reads them), gathered and held through the step
            out["itm_gathered"] = (gathered_ranks - 1) * features
    if model.llm is not None:
        cfg = model.llm.model.config
        heads = cfg.num_attention_heads
        kv = cfg.num_key_value_heads * (cfg.hidden_size // heads)
        tokens = shape.batch * (
            shape.prompt_tokens + speech_slots(model, frames) + shape.target_tokens
        )
        per_token = frozen_decoder_layer_bytes(cfg.hidden_size, kv, cfg.intermediate_size, heads, b)
        if checkpointed is None:
            checkpointed = bool(getattr(model.llm, "activation_checkpointing", False))
        if checkpointed:  # each layer's input kept; one layer's activations while recomputed
            out["llm"] = (cfg.num_hidden_layers * b * cfg.hidden_size + per_token) * tokens
        else:
            out["llm"] = cfg.num_hidden_layers * per_token * tokens
        # logits only from the first scored position on (`LLM.forward`): the target and its end
        out["logits"] = shape.batch * (shape.target_tokens + 1) * cfg.vocab_size * (b + 4 + 4)
    return out


def speech_slots(model, frames: int) -> int:
    """The LLM positions the adapter fills for `frames` encoder frames."""
    qformer = getattr(model.adapter, "qformer", None)
    if qformer is not None and hasattr(model.adapter, "window"):
        return -(-frames // model.adapter.stride) * qformer.num_queries
    if qformer is not None:
        return qformer.num_queries
    return -(-frames // model.adapter.k)


def _largest_unit_bytes(module: nn.Module, compute_bytes: int) -> tuple[int, int]:
    """(largest block, LLM tail kept gathered) in the compute dtype, for FSDP's working set."""
    from sparqle.models.blocks import block_classes

    blocks = tuple(block_classes(module))
    largest = max(
        (sum(p.numel() for p in m.parameters()) for m in module.modules() if isinstance(m, blocks)),
        default=0,
    )
    tail = 0
    llm = module.model.llm
    if llm is not None:
        head = llm.model.get_output_embeddings()
        tail = head.weight.numel() if head is not None else 0
    return largest * compute_bytes, tail * compute_bytes


def plan(
    module,
    shape: StepShape,
    strategy: str,
    world: int = 1,
    shard_group: int | None = None,
    compute_bytes: int = 2,
    checkpointed: bool | None = None,
    gathered_ranks: int = 1,
) -> dict[str, float]:
    """Per-GPU bytes by component. `strategy` is single, ddp or fsdp; FSDP shards over
    `shard_group` ranks (the world, or the GPUs of a node with hybrid sharding)."""
    params = parameter_bytes(module)
    frozen = params["encoder"] + params["adapter"] + params["llm"]
    n = params["trained_params"]
    acts = activation_bytes(module, shape, compute_bytes, checkpointed, gathered_ranks)
    out = {
        "frozen weights": frozen,
        "trained weights (fp32)": 4 * n,
        "gradients (fp32)": 4 * n,
        "optimizer state (AdamW, fp32)": 8 * n,
    }
    if strategy == "fsdp":
        shards = shard_group or world
        out = {k: v / shards for k, v in out.items()}
        largest, tail = _largest_unit_bytes(module, compute_bytes)
        # two blocks gathered (one computing, one prefetched), the LLM's tail kept gathered, the
        # root (adapter weights outside the blocks) gathered through the step
        blocks = tuple(_block_types(module))  # once: it walks the whole model
        root = 4 * n - sum(
            4 * p.numel()
            for m in module.modules()
            if isinstance(m, blocks)
            for p in m.parameters()
            if p.requires_grad
        )
        out["FSDP gathered units"] = 2 * largest + tail + root * compute_bytes / 4
    activations = sum(v for k, v in acts.items() if k != "encoder_transient")
    out["activations"] = activations
    steady = sum(out.values())
    out["peak"] = max(steady, steady - activations + acts["encoder_transient"])
    out["breakdown"] = acts
    return out


def _block_types(module):
    from sparqle.models.blocks import block_classes

    return block_classes(module)


def dtype_bytes(name: str) -> int:
    return torch.finfo(getattr(torch, name)).bits // 8


def communication(
    module,
    strategy: str,
    world: int,
    per_node: int,
    compute_bytes: int = 2,
    micro_batches: int = 1,
) -> dict[str, float]:
    """Bytes each GPU receives per optimizer step (`micro_batches` forward/backward passes), and
    how many of them cross between nodes. Ring collectives: an all-gather or reduce-scatter over
    k ranks moves (k-1)/k of the whole to each rank, an all-reduce twice that.

    - ddp: the trained gradients (fp32) all-reduced once a step (accumulation skips the sync);
    - fsdp: per micro-batch, every unit all-gathered for forward and, where backward runs
      through it and it was resharded (all but the LLM's kept tail), again for backward; the
      trained gradients reduce-scattered (fp32); all over every rank, so across nodes too;
    - hybrid: the same gathers and reduce-scatters inside a node, then each node's gradient shard
      all-reduced across nodes: nothing but gradients leaves a node.
    """
    params = parameter_bytes(module)
    grads = 4 * params["trained_params"]
    nodes = max(1, world // max(1, per_node))
    ring = lambda k: (k - 1) / k if k > 1 else 0.0  # noqa: E731
    if strategy == "single":
        return {"total": 0.0, "across nodes": 0.0}
    if strategy == "ddp":
        total = 2 * ring(world) * grads
        return {"total": total, "across nodes": total * ring(nodes) if nodes > 1 else 0.0}
    trained = params["trained_params"] * compute_bytes
    _, tail = _largest_unit_bytes(module, compute_bytes)
    # encoder: forward only; LLM and adapter: forward and again for backward (tail kept)
    gathered = params["encoder"] + 2 * (params["llm"] + params["adapter"] + trained) - tail
    shard_ranks = world if strategy == "fsdp" else per_node
    inside = micro_batches * ring(shard_ranks) * (gathered + grads)
    if strategy == "fsdp":
        return {"total": inside, "across nodes": inside * ring(nodes) if nodes > 1 else 0.0}
    across = 2 * ring(nodes) * grads / per_node * micro_batches  # hybrid: gradient shards
    return {"total": inside + across, "across nodes": across}


def step_shape(module, cfg) -> StepShape:
    """The configured per-rank batch at its longest clip (data.max_seconds) and target."""
    from sparqle.prompts import TRANSCRIBE, instruction

    data = cfg.data
    batch = int(data.get("batch_size", 8))
    seconds = float(data.get("max_seconds") or 30.0)
    prompt = target = 0
    if module.model.llm is not None:
        before, after = module.model.llm.prompt_ids(instruction(TRANSCRIBE))
        prompt = len(before) + len(after)
        target = int(cfg.llm.get("max_target_tokens") or 128) + 1
    text = int(cfg.stage.get("pretrain", {}).get("max_text_tokens") or 64)
    return StepShape(batch, seconds, prompt, target, text)


def configured_strategy(strategy, world: int) -> str:
    """fsdp / hybrid / ddp / single, from `trainer.strategy` (a name or a `_target_` config)."""
    target = strategy if isinstance(strategy, str) or strategy is None else strategy.get("_target_")
    if target and "FSDP" in str(target):
        return "hybrid" if strategy.get("sharding") == "hybrid" else "fsdp"
    return "ddp" if world > 1 or (target and "ddp" in str(target).lower()) else "single"
