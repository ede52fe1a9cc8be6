"""`doa score --protocol paper` scores real data as the released code (run_t5.py) does.

Each case takes the first lines of the paper's file in ../shared, writes predictions with about 10%
outside the label set, and checks the numbers derived by hand from the released `postprocess_text`:
`pred.strip().upper()` if it names a label, else label id 0 (FEVER REFUTES, MultiPIT_Id NO,
Stanceosaurus IRRELEVANT); scikit-learn accuracy / F1 over the ids.
"""
import json

import pytest

from doa_jax import cli, metrics
from doa_jax.data import cards
from doa_jax.experiment.task_setup import scored_references


@pytest.fixture
def score(monkeypatch, capsys):
    """`doa score` in-process on the first len(predictions) lines of a real file; (code, JSON, stderr)."""
    monkeypatch.setattr(cli, "COMMANDS", {k: v for k, v in cli.COMMANDS.items() if k == "score"})

    def run(tmp_path, task, data_file, predictions, *extra):
        lines = data_file.read_text().splitlines()[: len(predictions)]
        (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
        (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prediction": p}) + "\n" for p in predictions))
        code = cli.main(["score", "--task", task, "--predictions", str(tmp_path / "p.jsonl"),
                         "--references", str(tmp_path / "r.jsonl"), *extra])
        out = capsys.readouterr()
        return code, (json.loads(out.out) if code == 0 else None), out.err

    return run


def _golds(data_file, n):
    return [json.loads(line)["target"] for line in data_file.read_text().splitlines()[:n]]


def test_fever_invalid_output_counts_as_refutes(score, doa_data, tmp_path):
    data = doa_data / "fever" / "fever_dev_all.jsonl"
    assert _golds(data, 10) == ["SUPPORTS", "REFUTES", "REFUTES", "SUPPORTS", "SUPPORTS", "REFUTES", "REFUTES",
                                "SUPPORTS", "SUPPORTS", "SUPPORTS"]
    # 0: valid after strip/upper; 1: invalid, gold REFUTES (right under the released code);
    # 3: a wrong valid label. Efficient: 8/10 right. Paper: 9/10.
    preds = [" supports ", "it is refuted", "REFUTES", "REFUTES", "SUPPORTS", "REFUTES", "REFUTES", "SUPPORTS",
             "SUPPORTS", "SUPPORTS"]
    code, eff, _ = score(tmp_path, "fever", data, preds)
    assert code == 0 and eff["accuracy"] == pytest.approx(80.0) and eff["invalid_predictions"] == 1
    code, paper, _ = score(tmp_path, "fever", data, preds, "--protocol", "paper")
    assert code == 0 and paper["protocol"] == "paper"
    assert paper["accuracy"] == pytest.approx(90.0) and paper["invalid_predictions"] == 1
    assert set(paper) == set(eff)  # the same keys under both protocols


def test_multipit_id_invalid_output_counts_as_no(score, doa_data, tmp_path):
    data = doa_data / "multipit_id" / "multipit_id_test_all.jsonl"
    assert _golds(data, 20) == ["YES"] * 17 + ["NO", "YES", "YES"]
    preds = ["YES"] * 20
    preds[17] = ""        # invalid, gold NO: right under the released code
    preds[2] = "maybe"    # invalid, gold YES: wrong either way
    preds[5] = "NO"       # valid, wrong
    code, eff, _ = score(tmp_path, "multipit_id", data, preds)
    assert eff["accuracy"] == pytest.approx(85.0) and eff["invalid_predictions"] == 2
    code, paper, _ = score(tmp_path, "multipit_id", data, preds, "--protocol", "paper")
    assert code == 0 and paper["accuracy"] == pytest.approx(90.0)


def test_stanceosaurus_invalid_output_counts_as_irrelevant(score, doa_data, tmp_path):
    data = doa_data / "stanceosaurus" / "stanceosaurus_test_all.jsonl"
    golds = ["Discussing", "Supporting", "Discussing", "Supporting", "Refuting", "Discussing", "Refuting",
             "Discussing", "Discussing", "Supporting", "Irrelevant"]
    assert _golds(data, 11) == golds
    preds = list(golds)
    preds[4] = "Supporting"   # gold Refuting
    preds[10] = "off-topic"   # invalid, gold Irrelevant
    # Efficient (invalid = a miss, no false positive): D 5/0/0 -> 1; S tp3 fp1 -> 6/7; R tp1 fn1 -> 2/3;
    # I tp0 -> 0. Macro (1 + 6/7 + 2/3 + 0) / 4; micro 2*9 / (18 + 1 + 2) = 18/21.
    code, eff, _ = score(tmp_path, "stanceosaurus", data, preds)
    assert eff["macro_f1"] == pytest.approx(100 * (1 + 6 / 7 + 2 / 3 + 0) / 4)
    assert eff["micro_f1"] == pytest.approx(100 * 18 / 21)
    # Paper: the invalid output is IRRELEVANT (right here): I -> 1; macro (1 + 6/7 + 2/3 + 1) / 4;
    # micro F1 over single labels = accuracy 10/11.
    code, paper, _ = score(tmp_path, "stanceosaurus", data, preds, "--protocol", "paper")
    assert paper["macro_f1"] == pytest.approx(100 * (1 + 6 / 7 + 2 / 3 + 1) / 4)
    assert paper["micro_f1"] == pytest.approx(100 * 10 / 11)
    assert paper["accuracy"] == pytest.approx(100 * 10 / 11)


def test_wlp_paper_f1_of_a_model_that_predicts_nothing_is_the_share_of_amount_keys(score, doa_data, tmp_path):
    """The released parse keys entities by their words minus the last; a gold key the prediction
    lacks gets AMOUNT (id 0), so an empty output is right on every gold AMOUNT key. First three test
    sentences, keys by hand:
      1: '' (4 tags, last Reagent) REAGENT, 'stock' REAGENT, '0.5' CONCENTRATION, 'MilliQ' REAGENT
      2: '' REAGENT, '50' AMOUNT (twice, one key), '4' CONCENTRATION, '0.5' CONCENTRATION
      3: '' MEASURE-TYPE, '500' AMOUNT, 'MilliQ' REAGENT
    11 gold keys, 2 AMOUNT: 2/11 right. This is why paper_f1 is not 0 for an empty model; kept."""
    data = doa_data / "wlp" / "wlp_test_all.jsonl"
    code, paper, _ = score(tmp_path, "wlp", data, ["", "", ""], "--protocol", "paper")
    assert code == 0
    assert paper["f1"] == pytest.approx(100 * 2 / 11) and paper["paper_f1"] == pytest.approx(100 * 2 / 11)
    assert paper["span_f1"] == 0.0
    code, eff, _ = score(tmp_path, "wlp", data, ["", "", ""])
    assert eff["f1"] == 0.0 and eff["paper_f1"] == pytest.approx(100 * 2 / 11)


def test_wlp_paper_f1_with_one_right_and_one_spurious_entity(score, doa_data, tmp_path):
    data = doa_data / "wlp" / "wlp_test_all.jsonl"
    # Sentence 1 predicted exactly (4 keys right); 2 empty (AMOUNT on '50': 1 of 4 right); 3 with a
    # spurious entity only (costs nothing in the released parse; AMOUNT on '500': 1 of 3). 6/11.
    first = data.read_text().splitlines()[0]
    preds = [json.loads(first)["target"], "", "foo bar [Device]"]
    code, paper, _ = score(tmp_path, "wlp", data, preds, "--protocol", "paper")
    assert paper["f1"] == pytest.approx(100 * 6 / 11)


def test_unknown_protocol_is_one_clear_error(score, doa_data, tmp_path, capsys):
    data = doa_data / "fever" / "fever_dev_all.jsonl"
    with pytest.raises(SystemExit) as e:
        score(tmp_path, "fever", data, ["SUPPORTS"], "--protocol", "exact")
    assert e.value.code == 2
    assert "invalid choice: 'exact'" in capsys.readouterr().err


def test_metrics_compute_rejects_an_unknown_protocol():
    with pytest.raises(ValueError, match="unknown protocol 'exact'; protocols: efficient, paper"):
        metrics.compute("accuracy", ["YES"], ["YES"], labels=["YES", "NO"], protocol="exact")


def test_paper_protocol_without_the_cards_invalid_label_is_a_clear_error():
    with pytest.raises(ValueError, match="paper_invalid_label"):
        metrics.compute("accuracy", ["maybe"], ["YES"], labels=["YES", "NO"], protocol="paper")


def test_card_invalid_label_must_be_one_of_its_labels(tmp_path):
    text = cards.load_card("fever").path.read_text().replace('paper_invalid_label = "REFUTES"',
                                                             'paper_invalid_label = "FALSE"')
    (tmp_path / "fever.toml").write_text(text)
    with pytest.raises(cards.CardError, match=r"fever.toml: paper_invalid_label 'FALSE' is not one of labels"):
        cards.load_card(tmp_path / "fever.toml")


@pytest.mark.parametrize("task,label", [("fever", "REFUTES"), ("multipit_id", "NO"),
                                        ("stanceosaurus", "Irrelevant")])
def test_cards_carry_the_released_codes_label_id_0(task, label):
    assert cards.load_card(task).paper_invalid_label == label


def test_wlp_references_through_the_vocabulary_as_the_released_code_scored_them(score, doa_data, tmp_path, capsys):
    # A vocabulary that cannot write 'µ', and the released max_target_length of 16 tokens: outputs that are the
    # references as its tokenizer writes them score 100 with --vocab (the released code's references) and less
    # against the data's own text.
    from doa_jax.data import vocab as vocab_lib

    data = doa_data / "wlp" / "wlp_test_all.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()[:60]]   # lines 50, 51 and 53 have µ
    texts = [r["target"].replace("µ", "u") for r in rows] * 2
    vocab = vocab_lib.Vocabulary(vocab_lib.build_vocab(texts, tmp_path / "v.model", vocab_size=300))
    written = scored_references(vocab, [r["target"] for r in rows], {"targets": 16}, "paper")
    assert any("µ" in r["target"] for r in rows) and written != [r["target"] for r in rows]
    code, exact, _ = score(tmp_path, "wlp", data, written, "--protocol", "paper", "--vocab", str(vocab.path),
                           "--targets-length", "16")
    assert code == 0 and exact["f1"] == exact["span_f1"] == 100.0
    code, raw, err = score(tmp_path, "wlp", data, written, "--protocol", "paper")
    assert code == 0 and raw["span_f1"] < 100.0
    assert "the released code scored them through its tokenizer: pass --vocab V" in err
    # a paper cell's predictions.jsonl (target: the scored reference; raw_target: the data's) re-scores the same,
    # with --vocab (from raw_target) or without (the targets are already written)
    cell = tmp_path / "predictions.jsonl"
    cell.write_text("".join(json.dumps({"source": r["source"], "target": w, "raw_target": r["target"],
                                        "prediction": w}) + "\n" for r, w in zip(rows, written)))
    for flags in ([], ["--vocab", str(vocab.path), "--targets-length", "16"]):
        code = cli.main(["score", "--task", "wlp", "--predictions", str(cell), "--references", str(cell),
                         "--protocol", "paper", *flags])
        out = capsys.readouterr()
        assert code == 0 and json.loads(out.out)["span_f1"] == 100.0 and "pass --vocab" not in out.err
    # under 'efficient' the same file is scored against the data's own targets (raw_target)
    code = cli.main(["score", "--task", "wlp", "--predictions", str(cell), "--references", str(cell)])
    assert code == 0 and json.loads(capsys.readouterr().out)["f1"] == pytest.approx(raw["span_f1"])


@pytest.mark.parametrize("flags,message", [
    (["--vocab", "v.model"], "--vocab and --targets-length apply to --protocol paper only"),
    (["--protocol", "paper", "--targets-length", "8"], "--targets-length needs --vocab"),
    (["--protocol", "paper", "--vocab", "v.model", "--targets-length", "0"], "--targets-length 0: the released code"),
])
def test_reference_options_outside_the_paper_protocol_are_refused(score, doa_data, tmp_path, flags, message):
    data = doa_data / "fever" / "fever_dev_all.jsonl"
    code, _, err = score(tmp_path, "fever", data, ["SUPPORTS"], *flags)
    assert code != 0 and message in err


def test_multipit_gen_outputs_are_compared_with_the_released_references_under_the_paper_protocol():
    # The released code compares each output with its decoded label (in MultiPIT_Gen's test file, the source):
    # a student copying the label as the released decode writes it ("don't", "storm.") is a perfect copy there,
    # while against the data's source ("do n't", "storm .") it is not.
    source = "I do n't think the storm will pass ."
    written = "I don't think the storm will pass."
    paper = metrics.compute("bert_ibleu", [written], [written], sources=[source], protocol="paper")
    efficient = metrics.compute("bert_ibleu", [written], [source], sources=[source])
    assert paper["self_bleu"] == pytest.approx(100.0) and efficient["self_bleu"] < 90.0
