"""Every command ends a user's mistake with one line naming it and exit code 2, no traceback."""

import pytest

from tests.conftest import ROOT
from tests.helpers import run_side_by_side


@pytest.fixture()
def broken_manifest(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"id": "a", "audio": "a.wav", "text": "hi"}\n{"id": "b", "audio": \n')
    return path


def test_each_command_reports_a_user_error_in_one_line(broken_manifest, tmp_path):
    cases = [
        (
            ["-m", "data_prep.make_shards", "--manifest", str(broken_manifest)]
            + ["--out", str(tmp_path / "shards"), "--split", "train"],
            f"{broken_manifest}:2",
        ),
        (
            ["-m", "sparqle.export", "--ckpt", str(tmp_path / "no.ckpt"), "--out", str(tmp_path)],
            "no.ckpt",
        ),
        (["-m", "sparqle.transcribe", "--ckpt", str(tmp_path / "no.ckpt"), "x.wav"], "no.ckpt"),
        ([str(ROOT / "eval.py"), f"ckpt={tmp_path / 'no.ckpt'}"], "ckpt="),
        ([str(ROOT / "eval.py")], "ckpt: missing (give ckpt=...)"),  # its one mandatory value
    ]
    for (argv, named), proc in zip(cases, run_side_by_side([c for c, _ in cases]), strict=True):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (argv, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert lines[-1].startswith("error: ") and named in lines[-1], lines


def test_progress_lines_follow_stderr_when_it_is_swapped(monkeypatch):
    """An argparse command run in-process (a test's capture, a notebook) and then another one:
    the progress handler writes to the stderr of the moment, not a closed one."""
    import io
    import logging

    from sparqle.cli import say_progress

    logger = logging.getLogger("sparqle")  # as it was after the test: other tests' caplog
    for attr in ("handlers", "propagate", "level"):
        monkeypatch.setattr(logger, attr, [] if attr == "handlers" else getattr(logger, attr))
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    say_progress()
    first.close()
    monkeypatch.setattr("sys.stderr", second)
    logging.getLogger("sparqle.test").info("loaded")
    assert second.getvalue() == "loaded\n"
