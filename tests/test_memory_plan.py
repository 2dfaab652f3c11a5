import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from sparqle.memory_plan import StepShape, frozen_decoder_layer_bytes, parameter_bytes, plan
from tests.helpers import make_module


def _saved_bytes(layer, params, tokens: int, hidden: int, rotary) -> int:
    x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(tokens)[None]
    cos, sin = rotary(x, pos)
    saved = {}

    def keep(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:  # a frozen weight kept for backward is no activation
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        layer(x, position_embeddings=(cos.to(x.dtype), sin.to(x.dtype)), attention_mask=None)
    return sum(saved.values())


def test_frozen_decoder_layer_formula_matches_what_autograd_keeps():
    h, inter, heads, kv_heads = 512, 1376, 8, 2
    cfg = LlamaConfig(
        hidden_size=h,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        attn_implementation="sdpa",
    )
    layer = LlamaDecoderLayer(cfg, 0).to(torch.bfloat16).requires_grad_(False)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    rotary = LlamaRotaryEmbedding(cfg)
    per_token = (
        _saved_bytes(layer, params, 512, h, rotary) - _saved_bytes(layer, params, 256, h, rotary)
    ) / 256
    formula = frozen_decoder_layer_bytes(h, kv_heads * h // heads, inter, heads)
    # what is left over is the rotary cos/sin of each position (4 x head_dim bytes)
    assert abs(per_token - formula) / formula < 0.05, (per_token, formula)


def test_weights_counted_exactly_and_sharded_by_fsdp(tiny_dir, synth_data):
    module = make_module(tiny_dir, synth_data, "stage=instruct", "llm.dtype=bfloat16")
    params = parameter_bytes(module)
    llm = module.model.llm.model
    assert params["llm"] == sum(p.numel() * 2 for p in llm.parameters())  # bf16, frozen
    assert params["trained_params"] == sum(
        p.numel() for p in module.parameters() if p.requires_grad
    )
    shape = StepShape(batch=4, seconds=4.0, prompt_tokens=30, target_tokens=20, text_tokens=16)
    one, fsdp = plan(module, shape, "single"), plan(module, shape, "fsdp", world=4)
    assert fsdp["frozen weights"] == one["frozen weights"] / 4
    assert fsdp["optimizer state (AdamW, fp32)"] == 8 * params["trained_params"] / 4
    assert fsdp["activations"] == one["activations"] > 0
    assert fsdp["peak"] < one["peak"]


def test_checkpointed_layers_keep_only_their_inputs():
    """Four frozen bf16 Llama layers recomputed in backward keep ~h values a token each (their
    inputs), as the plan counts, against 12h + 4kv + 6I bytes without."""
    from torch.distributed._composable import checkpoint

    h, inter, heads, kv_heads = 256, 688, 4, 2
    cfg = LlamaConfig(
        hidden_size=h,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        attn_implementation="sdpa",
    )
    layers = torch.nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(4))
    layers = layers.to(torch.bfloat16).requires_grad_(False)
    for layer in layers:
        checkpoint(layer)

    class Stack(torch.nn.Module):
        def forward(self, x, position_embeddings, attention_mask=None):
            for layer in layers:
                x = layer(x, position_embeddings=position_embeddings, attention_mask=None)
            return x

    params = {p.untyped_storage().data_ptr() for p in layers.parameters()}
    rotary = LlamaRotaryEmbedding(cfg)
    per_token = (
        _saved_bytes(Stack(), params, 512, h, rotary)
        - _saved_bytes(Stack(), params, 256, h, rotary)
    ) / 256
    assert abs(per_token - 4 * 2 * h) / (4 * 2 * h) < 0.1, per_token
    assert per_token * 5 < 4 * frozen_decoder_layer_bytes(h, kv_heads * h // heads, inter, heads)


def test_the_plan_counts_checkpointing_on_the_llm(tiny_dir, synth_data):
    module = make_module(tiny_dir, synth_data, "stage=instruct")
    shape = StepShape(batch=4, seconds=4.0, prompt_tokens=30, target_tokens=20, text_tokens=16)
    kept = plan(module, shape, "single")["breakdown"]["llm"]
    recomputed = plan(module, shape, "single", checkpointed=True)["breakdown"]["llm"]
    # the tiny LLM has 2 layers: their inputs kept, one layer live while recomputed
    assert recomputed < kept


def test_communication_per_strategy_and_hybrid_keeps_the_llm_inside_a_node(tiny_dir, synth_data):
    from sparqle.memory_plan import communication
    from sparqle.strategies import resolve_sharding

    module = make_module(tiny_dir, synth_data, "stage=instruct", "llm.dtype=bfloat16")
    grads = 4 * parameter_bytes(module)["trained_params"]
    ddp = communication(module, "ddp", world=32, per_node=8)
    assert ddp["total"] == 2 * 31 / 32 * grads
    full = communication(module, "fsdp", world=32, per_node=8)
    hybrid = communication(module, "hybrid", world=32, per_node=8)
    assert full["total"] > ddp["total"] and full["across nodes"] == full["total"] * 3 / 4
    assert hybrid["across nodes"] == 2 * 3 / 4 * grads / 8  # gradient shards only
    assert communication(module, "fsdp", world=8, per_node=8)["across nodes"] == 0
    assert resolve_sharding("auto", 1) == "full" and resolve_sharding("auto", 4) == "hybrid"
    assert resolve_sharding("full", 4) == "full"
