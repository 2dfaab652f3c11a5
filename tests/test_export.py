import pytest
import torch
import yaml
from safetensors.torch import load_file

from sparqle.checkpoints import CheckpointMismatch, trainable_names
from sparqle.export import export, load_exported
from tests.helpers import make_module, one_step, save_checkpoint


def test_export_holds_trainable_weights_and_rebuilds_the_model(
    tiny_dir, synth_data, batch, tmp_path
):

    module = make_module(tiny_dir, synth_data, "stage=instruct")
    one_step(module, batch)
    save_checkpoint(module, tmp_path / "full.ckpt")
    info = export(tmp_path / "full.ckpt", tmp_path / "export")
    tensors = load_file(tmp_path / "export" / "adapter.safetensors")
    assert set(tensors) == set(trainable_names(module)) and info["tensors"] == len(tensors)
    full_bytes = (tmp_path / "full.ckpt").stat().st_size
    assert info["bytes"] < full_bytes  # no optimizer state, no frozen tensors

    rebuilt = load_exported(tmp_path / "export").eval()
    module.eval()
    for name in trainable_names(module):
        assert torch.equal(module.state_dict()[name], rebuilt.state_dict()[name])
    with torch.no_grad():
        a = module.model.embed_speech(batch.audio, batch.audio_lens)[0]
        b = rebuilt.model.embed_speech(batch.audio, batch.audio_lens)[0]
    torch.testing.assert_close(a, b)

    half = export(tmp_path / "full.ckpt", tmp_path / "bf16", dtype="bfloat16")
    assert half["bytes"] == pytest.approx(info["bytes"] / 2, rel=0.01)

    cfg = yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())
    cfg["adapter"]["num_queries"] = 3
    (tmp_path / "export" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointMismatch, match="query_tokens"):
        load_exported(tmp_path / "export")


def test_checkpoints_and_exports_from_before_the_renames_still_load(trained, tmp_path):
    """Written before 2026-12-01: llm.gradient_checkpointing (now activation_checkpointing) and
    val_decode_batches (now val_decode_clips) in their saved configs."""
    import torch
    import yaml

    from sparqle.export import load_model

    ckpt = torch.load(trained / "model.ckpt", weights_only=False)
    ckpt["hyper_parameters"]["llm"]["gradient_checkpointing"] = False
    ckpt["hyper_parameters"]["llm"].pop("activation_checkpointing", None)
    ckpt["hyper_parameters"]["val_decode_batches"] = 2
    ckpt["hyper_parameters"].pop("val_decode_clips", None)
    torch.save(ckpt, tmp_path / "old.ckpt")
    assert load_model(tmp_path / "old.ckpt").model.llm.activation_checkpointing is False

    import shutil

    shutil.copytree(trained / "export", tmp_path / "export")
    config = yaml.safe_load((tmp_path / "export" / "config.yaml").read_text())
    config["llm"]["gradient_checkpointing"] = config["llm"].pop("activation_checkpointing", False)
    config["val_decode_batches"] = config.pop("val_decode_clips", 2)
    (tmp_path / "export" / "config.yaml").write_text(yaml.safe_dump(config))
    assert load_model(tmp_path / "export").stage == "instruct"


def _card(folder):
    text = (folder / "README.md").read_text()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def test_every_export_has_a_model_card_naming_its_parts_and_data(trained, tmp_path):
    """Hugging Face's README.md format: the header the hub reads, then the model, its training
    data (from the run directory the checkpoint sits in) and how to load it."""
    import json
    import shutil

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained / "model.ckpt", run / "checkpoints" / "last.ckpt")
    index = tmp_path / "train.json"
    index.write_text(json.dumps({"hours": 1.5, "shards": [{"url": "a.tar", "samples": 7}]}))
    (run / ".hydra").mkdir()
    # as Hydra saves it: interpolations unresolved
    data = {"train": {"main": {"urls": "${paths.data_dir}/train.json"}}, "seed": "${seed}"}
    saved = {"paths": {"data_dir": str(tmp_path)}, "data": data}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    ckpt["hyper_parameters"]["llm"]["name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    ckpt["hyper_parameters"]["train_tasks"] = ["transcribe", "translate_de"]
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")

    info = export(run / "checkpoints" / "last.ckpt", tmp_path / "my-adapter")
    header, body = _card(tmp_path / "my-adapter")
    assert header["library_name"] == "sparqle" and header["language"] == ["de"]
    assert header["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]  # the tiny encoder's
    assert header["datasets"] == [str(index)]  # local path is named in the body, not as a hub id
    assert {"transcribe", "translate_de"} <= set(header["tags"]) and "model-index" not in header
    assert body.startswith("\n# my-adapter\n")
    assert f"{info['tensors']} tensors" in body and f"`{index}`: 1.50 h, 7 clips" in body
    assert "load_model(" in body and "| optimizer steps |" in body

    # moved out of its run: the card says the data is not recorded
    export(trained / "model.ckpt", tmp_path / "moved")
    assert "Data: not recorded" in _card(tmp_path / "moved")[1]
    # a report of another checkpoint is refused in one line naming the option
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"models": {"x": {"checkpoint_sha256": "0" * 64}}}))
    with pytest.raises(ValueError, match="--report .*holds no scores of this checkpoint"):
        export(trained / "model.ckpt", tmp_path / "scored", report=report)
