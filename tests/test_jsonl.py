"""Reading {"source","target"} JSON lines: every problem names the file and line."""
import json

import pytest

from doa_jax.data import jsonl


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"source": "Mix reagents.", "target": "Mix [Action] reagents [Reagent]"})


def test_reads_examples_and_ignores_blank_lines(tmp_path):
    p = _write(tmp_path / "a.jsonl", [GOOD, "", json.dumps({"source": "s", "target": "t", "extra": 1})])
    loaded = jsonl.load_examples(p)
    assert loaded.examples == [{"source": "Mix reagents.", "target": "Mix [Action] reagents [Reagent]"},
                               {"source": "s", "target": "t"}]
    assert loaded.skipped == []


def test_line_that_is_not_json_names_file_and_line(tmp_path):
    p = _write(tmp_path / "bad.jsonl", [GOOD, GOOD, '{"source": "x", "target": '])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        jsonl.load_examples(p)


def test_line_without_source_names_file_and_line(tmp_path):
    p = _write(tmp_path / "nosrc.jsonl", [GOOD, json.dumps({"text": "x", "target": "y"})])
    with pytest.raises(ValueError, match=r"nosrc\.jsonl:2: missing 'source'"):
        jsonl.load_examples(p)


def test_non_string_source_and_non_object_lines_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r":1: 'source' is not a string"):
        jsonl.load_examples(_write(tmp_path / "a.jsonl", [json.dumps({"source": 3, "target": "y"})]))
    with pytest.raises(ValueError, match=r":1: expected a JSON object, got list"):
        jsonl.load_examples(_write(tmp_path / "b.jsonl", ["[1, 2]"]))


def test_skip_bad_skips_and_counts_with_line_numbers(tmp_path):
    p = _write(tmp_path / "mixed.jsonl", [GOOD, "not json", json.dumps({"target": "y"}), GOOD])
    loaded = jsonl.load_examples(p, skip_bad=True)
    assert len(loaded.examples) == 2
    assert [line for line, _ in loaded.skipped] == [2, 3]
    assert "missing 'source'" in loaded.skipped[1][1]


def test_empty_target_policy(tmp_path):
    p = _write(tmp_path / "e.jsonl", [GOOD, json.dumps({"source": "Mix.", "target": "  "})])
    with pytest.raises(ValueError, match=r"e\.jsonl:2: empty 'target'"):
        jsonl.load_examples(p, empty_targets="error")
    skipped = jsonl.load_examples(p, empty_targets="skip")
    assert len(skipped.examples) == 1 and skipped.skipped == [(2, "empty 'target'")]
    assert len(jsonl.load_examples(p, empty_targets="keep").examples) == 2


def test_missing_target_is_an_error_unless_the_file_is_unlabeled(tmp_path):
    p = _write(tmp_path / "u.jsonl", [json.dumps({"source": "Mix."})])
    with pytest.raises(ValueError, match=r"u\.jsonl:1: missing 'target'"):
        jsonl.load_examples(p)
    assert jsonl.load_examples(p, require_target=False).examples == [{"source": "Mix.", "target": ""}]


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl: no such file"):
        jsonl.load_examples(tmp_path / "nowhere.jsonl")


def test_predictions_need_a_prediction_string(tmp_path):
    p = _write(tmp_path / "p.jsonl", [json.dumps({"prediction": "YES"}), json.dumps({"pred": "NO"})])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: missing 'prediction'"):
        jsonl.load_predictions(p)
    ok = _write(tmp_path / "ok.jsonl", [json.dumps({"inputs": {"a": 1}, "prediction": "YES"})])
    assert jsonl.load_predictions(ok) == ["YES"]


def test_bytes_that_are_not_utf8_name_the_file_line_and_column(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes((GOOD + "\n").encode() + '{"source": "caf\u00e9", "target": "t"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        jsonl.load_examples(p)


def test_a_utf8_byte_order_mark_is_dropped(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + (GOOD + "\n").encode())
    assert jsonl.load_examples(p).examples[0]["source"] == "Mix reagents."


def test_an_empty_file_is_an_error(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("\n\n")
    with pytest.raises(ValueError, match=r"train\.jsonl: no examples \(the file is empty\)"):
        jsonl.load_examples(p)
    assert jsonl.load_examples(p, allow_empty=True).examples == []


def test_a_file_whose_every_line_is_skipped_is_an_error(tmp_path):
    p = _write(tmp_path / "train.jsonl", ["[1]", "{}"])
    with pytest.raises(ValueError, match=r"train\.jsonl: no examples \(2 line\(s\) skipped\)"):
        jsonl.load_examples(p, skip_bad=True)
