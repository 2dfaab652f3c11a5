from dataclasses import replace

import pytest
import torch

from sparqle.models.llm import LLM, PAD_SLOT, SPEECH_SLOT


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny["llm"])


def _speech(lengths, dim=64):
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    return torch.randn(len(lengths), max(lengths), dim), mask


def test_chat_template_prompt_with_speech_slot(llm):
    text = llm.render_prompt("Transcribe the speech.")
    assert llm.use_chat_template
    assert text.startswith("<|begin_of_text|><|start_header_id|>user")
    assert "<Speech><|speech|></Speech> Transcribe the speech." in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_training_and_generation_prompts_identical_up_to_target(llm):
    speech, mask = _speech([5, 3])
    instr = ["Transcribe the speech.", "Translate the speech into German."]
    train = llm.build_inputs(speech, mask, instr, ["the dog sleeps", "der Hund"])
    gen = llm.build_inputs(speech, mask, instr, pad_left=True)
    for i in range(2):
        t_row = train.token_ids[i][train.token_ids[i] != PAD_SLOT].tolist()
        g_row = gen.token_ids[i][gen.token_ids[i] != PAD_SLOT].tolist()
        p = train.prompt_lengths[i]
        assert t_row[:p] == g_row
        assert g_row.count(SPEECH_SLOT) == int(mask[i].sum())
        # generation rows end exactly where the answer starts (left padding)
        assert gen.token_ids[i, -1].item() == g_row[-1]
        # the speech embeddings sit at the speech slots, in order
        slots = gen.token_ids[i] == SPEECH_SLOT
        torch.testing.assert_close(gen.inputs_embeds[i][slots], speech[i][mask[i]])


def test_labels_cover_target_and_eos_only(llm):
    speech, mask = _speech([4])
    inp = llm.build_inputs(speech, mask, ["Transcribe the speech."], ["the dog"])
    labelled = inp.labels[0][inp.labels[0] != -100].tolist()
    assert labelled == llm.tokenizer("the dog", add_special_tokens=False).input_ids + [
        llm.eos_token_id
    ]
    assert (inp.labels[0][: inp.prompt_lengths[0]] == -100).all()
    assert llm(inp).isfinite()


def test_generation_is_batched_and_stops(llm):
    speech, mask = _speech([4, 2])
    inp = llm.build_inputs(speech, mask, ["Transcribe the speech."] * 2, pad_left=True)
    out = llm.generate(inp, max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(x, str) for x in out)


def test_frozen_and_lora_trainable_counts(tiny):
    frozen = LLM(tiny["llm"])
    assert sum(p.numel() for p in frozen.parameters() if p.requires_grad) == 0
    lora = LLM(tiny["llm"], lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    trainable = {n: p.numel() for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    cfg = lora.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q_out, v_out = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    per_layer = 4 * (cfg.hidden_size + q_out) + 4 * (cfg.hidden_size + v_out)
    assert sum(trainable.values()) == cfg.num_hidden_layers * per_layer


def test_targets_cut_at_max_target_tokens(tiny):
    llm = LLM(tiny["llm"], max_target_tokens=3)
    speech, mask = _speech([4])
    text = "the dog sleeps under the old green tree"
    ids = llm.tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > 3
    inp = llm.build_inputs(speech, mask, ["Transcribe the speech."], [text])
    labelled = inp.labels[0][inp.labels[0] != -100].tolist()
    assert labelled == ids[:3] + [llm.eos_token_id]  # cut before the end token, never the end


def test_loss_from_logits_at_target_positions_only_equals_the_full_path(llm):
    """No attention mask (right padding under causal attention hides itself) and logits only
    from the first scored position: the same loss as full logits with the mask, to 1e-5."""
    torch.manual_seed(0)
    speech, mask = _speech([6, 3, 5])
    instr = ["Transcribe the speech.", "Translate the speech into German.", "Say it."]
    targets = ["the dog sleeps", "der Hund schläft heute im alten Haus", "a"]
    inp = llm.build_inputs(speech, mask, instr, targets)
    seen = []
    hook = llm.model.get_output_embeddings().register_forward_hook(
        lambda m, a, out: seen.append(out.shape)
    )
    try:
        loss = llm(inp)
    finally:
        hook.remove()
    full = llm.model(inputs_embeds=inp.inputs_embeds, attention_mask=inp.attention_mask).logits
    labels = inp.labels[:, 1:]
    ref = torch.nn.functional.cross_entropy(
        full[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100
    )
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    width = inp.inputs_embeds.shape[1]
    longest_target = max(len(t) for t in llm.target_ids(targets))
    kept = seen[0][1]
    assert kept == width - min(inp.prompt_lengths) + 1 < width
    assert kept <= longest_target + 1 + max(inp.prompt_lengths) - min(inp.prompt_lengths)


def test_host_layout_and_index_splicing_match_the_mask(llm):
    speech, mask = _speech([4, 2])
    instr = ["Transcribe the speech."] * 2
    a = llm.build_inputs(speech, mask, instr, ["the dog", "a cat"])
    b = llm.build_inputs(speech, mask, instr, ["the dog", "a cat"], speech_lengths=[4, 2])
    torch.testing.assert_close(a.inputs_embeds, b.inputs_embeds)
    for i in range(2):
        slots = b.token_ids[i] == SPEECH_SLOT
        torch.testing.assert_close(b.inputs_embeds[i][slots], speech[i][mask[i]])


def test_token_overhead_is_the_longest_prompt_plus_the_queries(tiny_dir, synth_data):
    """The bucketing token budget's per-utterance overhead equals the longest prompt a training
    batch really builds (template, instruction, the Q-Former's speech positions)."""
    from sparqle.prompts import INSTRUCTIONS
    from tests.helpers import make_module

    module = make_module(tiny_dir, synth_data, "stage=instruct")
    llm, nq = module.model.llm, module.model.adapter.qformer.num_queries
    texts = [
        *INSTRUCTIONS["transcribe"],
        *(t.format(language="German") for t in INSTRUCTIONS["translate"]),
    ]
    built = [
        llm.build_inputs(
            torch.zeros(1, nq, llm.hidden_size), torch.ones(1, nq, dtype=torch.bool), [t], ["a"]
        ).prompt_lengths[0]
        for t in texts
    ]
    assert module.model.token_overhead(languages=["de"]) == max(built)


def test_checkpointing_keeps_a_fraction_of_the_frozen_llms_activations(tiny_dir, synth_data):
    """The frozen LLM stays in eval mode, where transformers' own gradient checkpointing does
    nothing; llm.activation_checkpointing recomputes its layers anyway: >= 3x fewer elements kept
    for backward inside the LLM, the same loss and the same adapter gradients."""
    from sparqle.data.manifest_datamodule import ManifestDataModule
    from tests.helpers import make_module

    dm = ManifestDataModule(train_manifest=str(synth_data / "train.jsonl"), batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    kept, losses, grads = {}, {}, {}
    for on in (False, True):
        torch.manual_seed(0)
        module = make_module(
            tiny_dir, synth_data, "stage=instruct", f"llm.activation_checkpointing={on}"
        )
        step = module.on_before_batch_transfer(replace(batch))
        module.train()
        speech, mask = module.model.embed_speech(step.audio, step.audio_lens)
        inputs = module.model.llm.build_inputs(
            speech, mask, step.instruction, step.target, speech_lengths=step.speech_lengths
        )
        weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
        saved: dict[int, int] = {}

        def keep(t, saved=saved, weights=weights):
            if t.untyped_storage().data_ptr() not in weights:
                saved[t.untyped_storage().data_ptr()] = t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = module.model.llm(inputs)
        loss.backward()
        kept[on], losses[on] = sum(saved.values()), float(loss)
        grads[on] = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert kept[False] >= 3 * kept[True], kept
    assert losses[True] == losses[False]
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=0, atol=0, msg=name)


def test_reference_decoding_stops_at_a_newline_and_is_seeded(tiny):
    """generation=reference: sampled (seeded: the same text twice, the global random state left
    alone) and cut at the first newline, as the SparQLe authors' decoding."""
    from sparqle.models.llm import LLM, check_generation

    llm = LLM(tiny["llm"]).eval()
    speech = torch.randn(2, 4, llm.hidden_size)
    inputs = llm.build_inputs(
        speech, torch.ones(2, 4, dtype=torch.bool), ["Repeat."] * 2, pad_left=True
    )
    settings = check_generation(
        {"do_sample": True, "temperature": 5.0, "top_p": 1.0, "stop": "newline", "seed": 3}
    )
    state = torch.get_rng_state()
    first = llm.generate(inputs, max_new_tokens=40, **settings)
    assert torch.equal(torch.get_rng_state(), state)
    assert first == llm.generate(inputs, max_new_tokens=40, **settings)
    assert all("\n" not in t for t in first)
    # what each stop asks transformers to stop at: the "\n" token alone, or the end tokens
    asked = []
    real = llm.model.generate
    llm.model.generate = lambda **kw: asked.append(kw["eos_token_id"]) or real(**kw)
    for stop in ("newline", "eos"):
        llm.generate(inputs, max_new_tokens=2, **{**settings, "stop": stop})
    newline = llm.tokenizer("\n", add_special_tokens=False).input_ids
    assert asked[0] == newline and llm.eos_token_id in asked[1] and newline[0] not in asked[1]
    with pytest.raises(ValueError, match="generation.stop='tab'"):
        check_generation({"stop": "tab"})
