import random

import pytest

from sparqle.data.manifest import Utterance
from sparqle.data.tasks import TaskSampler, parse_task
from sparqle.prompts import INSTRUCTIONS, instruction


def test_parse_task():
    assert parse_task("transcribe") == ("transcribe", None)
    assert parse_task("translate_de") == ("translate", "de")
    assert parse_task("translate:fr") == ("translate", "fr")
    with pytest.raises(ValueError, match="translate_LANG"):
        parse_task("summarise")


def test_translation_drawn_only_where_it_exists():
    sampler = TaskSampler({"transcribe": 1.0, "translate_de": 1.0})
    with_de = Utterance(id="a", audio="a", text="The dog.", translation={"de": "Der Hund."})
    without = Utterance(id="b", audio="b", text="The cat.")
    rng = random.Random(0)
    tasks = [sampler.choose(with_de, rng) for _ in range(200)]
    de = [t for t in tasks if t.task == "translate"]
    assert 60 < len(de) < 140
    assert all(t.target == "Der Hund." and "German" in t.instruction for t in de)
    assert all(sampler.choose(without, rng).task == "transcribe" for _ in range(50))


def test_evaluation_is_deterministic_and_canonical():
    sampler = TaskSampler({"translate_fr": 1.0})
    utt = Utterance(id="a", audio="a", text="The dog.", translation={"fr": "Le chien."})
    choice = sampler.choose(utt, None)
    assert (
        choice.instruction
        == instruction("translate", "fr")
        == INSTRUCTIONS["translate"][0].format(language="French")
    )
    assert sampler.choose(Utterance(id="b", audio="b", text="x"), None) is None


def test_the_reference_instructions_and_system_prompt():
    """djanibekov/rebooting-llm finetune_sparqle_instruct.py: 7 + 4 instructions, its system prompt."""
    from omegaconf import OmegaConf

    from sparqle.prompts import PAPER_SYSTEM_PROMPT
    from tests.conftest import ROOT

    assert len(INSTRUCTIONS["transcribe"]) == 7 and len(INSTRUCTIONS["translate"]) == 4
    assert INSTRUCTIONS["transcribe"][0] == "Can you transcribe the speech into a written format?"
    assert instruction("translate", "de") == "Can you translate the speech into German?"
    preset = OmegaConf.load(ROOT / "conf" / "experiment" / "sparqle_paper.yaml")
    assert preset.llm.system_prompt == PAPER_SYSTEM_PROMPT


def test_a_manifest_task_fixes_the_training_task():
    sampler = TaskSampler({"transcribe": 1.0})
    utt = Utterance(
        id="a", audio="a", text="The dog.", translation={"de": "Der Hund."}, task="translate_de"
    )
    rng = random.Random(0)
    assert {sampler.choose(utt, rng).target for _ in range(20)} == {"Der Hund."}
    assert sampler.choose(utt, None).target == "The dog."  # evaluation asks for its own task


def test_text_case_lower_reaches_transcripts_targets_and_references(synth_data):
    """data.text_case=lower, as the SparQLe authors' dataset: the transcript stage 1 reads, the
    target stage 2 learns and the reference evaluation scores against are all lowercase."""
    from sparqle.data.manifest_datamodule import ManifestDataModule

    utt = Utterance(id="a", audio="a", text="The Dog sleeps.", translation={"de": "Der Hund."})
    sampler = TaskSampler({"transcribe": 1.0, "translate_de": 1.0}, text_case="lower")
    choices = [sampler.choose(utt, random.Random(i)) for i in range(20)]
    assert {c.target for c in choices} == {"the dog sleeps.", "der hund."}
    assert {c.text for c in choices} == {"the dog sleeps."}
    assert TaskSampler({"transcribe": 1.0}).choose(utt, None).target == "The Dog sleeps."
    with pytest.raises(ValueError, match="data.text_case='upper'"):
        TaskSampler({"transcribe": 1.0}, text_case="upper")
    dm = ManifestDataModule(
        train_manifest=str(synth_data / "train.jsonl"),
        val_manifest=str(synth_data / "val.jsonl"),
        batch_size=4,
        num_workers=0,
        text_case="lower",
    )
    dm.setup("fit")
    for batch in (
        next(iter(dm.train_dataloader())),
        next(iter(dm.val_dataloader())),
        next(iter(dm.eval_dataloader("translate_de", batch_size=4))),
    ):
        texts = batch.target + batch.text
        assert texts and all(t == t.lower() for t in texts) and any(t[0].isalpha() for t in texts)
