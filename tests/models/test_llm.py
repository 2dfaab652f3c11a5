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
