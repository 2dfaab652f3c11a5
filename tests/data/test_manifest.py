import json

import pytest

from sparqle.data.manifest import ManifestError, Utterance, read_manifest, write_manifest


def test_round_trip_and_relative_paths(tmp_path):
    utts = [
        Utterance(
            id="a", audio="audio/a.flac", text="Hello.", translation={"de": "Hallo."}, speaker="s1"
        ),
        Utterance(id="b", audio="/abs/b.wav", text="Bye."),
    ]
    write_manifest(tmp_path / "m.jsonl", utts)
    back = read_manifest(tmp_path / "m.jsonl")
    assert back[0].audio == str(tmp_path / "audio/a.flac")
    assert back[1].audio == "/abs/b.wav"
    assert back[0].translation == {"de": "Hallo."} and back[0].speaker == "s1"
    assert [u.text for u in back] == ["Hello.", "Bye."]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"audio": "x.wav"}', "m.jsonl:2: field 'text' is missing"),
        ('{"audio": "x.wav", "text": 3}', "m.jsonl:2: field 'text' must be str"),
        (
            '{"audio": "x.wav", "text": "t", "translation": {"de": 1}}',
            "field 'translation.de' must be str",
        ),
        ("{not json", "m.jsonl:2: not valid JSON"),
        ("[1, 2]", "m.jsonl:2: expected a JSON object"),
    ],
)
def test_malformed_lines_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"audio": "ok.wav", "text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(path)


def test_missing_and_empty_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ManifestError, match="no utterances"):
        read_manifest(tmp_path / "empty.jsonl")
