"""`doa data stats|download`, `doa score`, `doa vocab build`: outputs and one-line errors."""
import json

import pytest

from data_helpers import task_vocab, toy_card
from doa_jax import cli
from doa_jax.data import cards

MINE = ("data", "score", "vocab")


@pytest.fixture
def doa(monkeypatch, capsys):
    """Runs `doa ARGS` in-process (only this module's commands); returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(cli, "COMMANDS", {k: v for k, v in cli.COMMANDS.items() if k in MINE})

    def run(*args):
        code = cli.main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("task", cards.card_names())
def test_stats_show_at_most_one_percent_truncation_at_card_lengths(doa, doa_data, task):
    vocab = task_vocab(str(doa_data))
    code, out, _ = doa("data", "stats", task, "--vocab", vocab.path, "--json",
                       "--data-dir", doa_data / cards.load_card(task).subdir)
    assert code == 0
    stats = json.loads(out)
    assert stats["truncation_rate"]["either"] <= 0.01
    assert stats["feature_lengths"] == dict(cards.load_card(task).feature_lengths)
    assert sum(stats["sizes"].values()) > 0 and stats["length_percentiles"]["inputs"]["50"] > 1


def test_stats_text_report(doa, doa_data):
    vocab = task_vocab(str(doa_data))
    code, out, _ = doa("data", "stats", "fever", "--vocab", vocab.path, "--data-dir", doa_data / "fever")
    assert code == 0
    assert "labels (train): " in out and "SUPPORTS" in out
    assert "truncation at inputs=64, targets=8: inputs " in out
    assert "a perfect model's test accuracy in this vocabulary: 100.00 (0 of " in out


def test_stats_say_why_lines_were_skipped(doa, doa_data):
    # WLP's sentences without entities have empty targets, which its card skips (the paper did too).
    from doa_jax.data import pools
    skipped = pools.make_pools("wlp", data_dir=doa_data / "wlp").skipped
    vocab = task_vocab(str(doa_data))
    code, out, _ = doa("data", "stats", "wlp", "--vocab", vocab.path, "--data-dir", doa_data / "wlp")
    assert code == 0 and skipped["train"] > 0
    assert f"lines skipped: train {skipped['train']} (empty 'target' {skipped['train']})" in out


def test_stats_without_a_vocabulary_is_one_clear_error(doa, monkeypatch):
    monkeypatch.delenv("DOA_VOCAB", raising=False)
    code, _, err = doa("data", "stats", "fever")
    assert code == 2 and err.strip() == (
        "doa data: error: needs --vocab PATH (T5's spiece.model, or a model from `doa vocab build`)")


def test_score_classification(doa, tmp_path):
    refs = _jsonl(tmp_path / "r.jsonl", [{"source": "c1", "target": "SUPPORTS"}, {"source": "c2", "target": "REFUTES"},
                                         {"source": "c3", "target": "REFUTES"}])
    preds = _jsonl(tmp_path / "p.jsonl", [{"prediction": "SUPPORTS"}, {"prediction": "refutes"}, {"prediction": "?"}])
    code, out, _ = doa("score", "--task", "fever", "--predictions", preds, "--references", refs)
    got = json.loads(out)
    assert code == 0 and got["task"] == "fever"
    assert got["accuracy"] == pytest.approx(200 / 3) and got["invalid_predictions"] == 1


def test_score_each_task_prints_its_keys(doa, tmp_path, monkeypatch):
    monkeypatch.delenv("DOA_BERTSCORE_MODEL", raising=False)
    cases = {
        "stanceosaurus": ("Discussing", {"macro_f1", "micro_f1"}),
        "multipit_id": ("YES", {"accuracy"}),
        "nq": ("Gareth Barry", {"exact_match", "f1"}),
        "wlp": ("Mix [Action] reagents [Reagent]", {"f1", "paper_f1"}),
        "multipit_gen": ("Happy Thanksgiving to you all", {"self_bleu", "bert_ibleu", "note"}),
    }
    for task, (target, keys) in cases.items():
        refs = _jsonl(tmp_path / f"{task}_r.jsonl", [{"source": "Happy Thanksgiving to all", "target": target}])
        preds = _jsonl(tmp_path / f"{task}_p.jsonl", [{"prediction": target}])
        code, out, err = doa("score", "--task", task, "--predictions", preds, "--references", refs)
        assert code == 0, err
        got = json.loads(out)
        assert keys <= set(got), task
    assert got["bert_ibleu"] is None and "needs a BERTScore scorer model" in got["note"]


def test_score_bad_prediction_line_names_file_and_line(doa, tmp_path):
    refs = _jsonl(tmp_path / "r.jsonl", [{"source": "q", "target": "a"}] * 2)
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"prediction": "a"}\n{"prediction": \n')
    code, _, err = doa("score", "--task", "nq", "--predictions", preds, "--references", refs)
    assert code == 2 and f"{preds}:2: not valid JSON" in err


def test_score_reference_without_source_or_with_empty_target(doa, tmp_path):
    preds = _jsonl(tmp_path / "p.jsonl", [{"prediction": "YES"}])
    refs = _jsonl(tmp_path / "r.jsonl", [{"target": "YES"}])
    code, _, err = doa("score", "--task", "multipit_id", "--predictions", preds, "--references", refs)
    assert code == 2 and f"{refs}:1: missing 'source'" in err
    refs = _jsonl(tmp_path / "r2.jsonl", [{"source": "s", "target": ""}])
    code, _, err = doa("score", "--task", "multipit_id", "--predictions", preds, "--references", refs)
    assert code == 2 and f"{refs}:1: empty 'target'" in err


def test_score_counts_must_match_and_files_must_exist(doa, tmp_path):
    refs = _jsonl(tmp_path / "r.jsonl", [{"source": "q", "target": "a"}] * 3)
    preds = _jsonl(tmp_path / "p.jsonl", [{"prediction": "a"}] * 2)
    code, _, err = doa("score", "--task", "nq", "--predictions", preds, "--references", refs)
    assert code == 2 and "has 2 predictions but" in err and "has 3 references" in err
    code, _, err = doa("score", "--task", "nq", "--predictions", tmp_path / "none.jsonl", "--references", refs)
    assert code == 2 and err.count("\n") == 1 and "none.jsonl: no such file" in err


def test_vocab_build_writes_a_t5_style_model(doa, doa_data, tmp_path):
    out_path = tmp_path / "nq.model"
    code, out, err = doa("vocab", "build", "--tasks", "nq", "--vocab-size", "300", "--out", out_path,
                         "--data-dir", doa_data / "nq")
    assert code == 0
    spec = json.loads(out)
    assert out_path.exists() and spec["path"] == str(out_path)
    assert spec["vocab_size"] == spec["pieces"] + 100 and spec["pieces"] <= 300
    # the model vocab size it needs (its ids padded to a multiple of 128) and the gin line to pin it
    rows = -(-spec["vocab_size"] // 128) * 128
    assert spec["model_vocab_size"] == rows and f"--gin.MODEL_VOCAB_SIZE={rows}" in err


def _serve(monkeypatch, pages: dict):
    """`urllib.request.urlopen` answering from `pages` (url -> bytes); nothing reaches the network."""
    import io
    import urllib.error
    import urllib.request

    def urlopen(url, timeout=None):
        if url not in pages:
            raise urllib.error.URLError(f"404 {url}")
        return io.BytesIO(pages[url])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def test_download_fetches_a_cards_urls(doa, tmp_path, monkeypatch):
    """A user's card: download fetches its https URL and checks the file."""
    text = "".join(json.dumps({"source": f"q{i}", "target": "a"}) + "\n" for i in range(10))
    url = "https://example.org/toy_all.json"
    _serve(monkeypatch, {url: text.encode()})
    (tmp_path / "toy.toml").write_text(toy_card("toy_all.json", url))
    monkeypatch.setattr(cards, "CARDS_DIR", tmp_path)
    dest = tmp_path / "data"
    code, out, _ = doa("data", "download", "toy", "--data-dir", dest)
    assert code == 0 and (dest / "toy_all.json").read_text() == text
    assert "(10 examples)" in out
    code, out, _ = doa("data", "download", "toy", "--data-dir", dest)
    assert "is there" in out


def test_download_failure_is_one_clear_line(doa, tmp_path, monkeypatch):
    _serve(monkeypatch, {})
    (tmp_path / "toy.toml").write_text(toy_card("toy_all.json", "https://example.org/gone.json"))
    monkeypatch.setattr(cards, "CARDS_DIR", tmp_path)
    code, _, err = doa("data", "download", "toy", "--data-dir", tmp_path / "d")
    assert code == 2 and "could not download https://example.org/gone.json" in err and err.count("\n") == 1


def test_download_refuses_a_file_url(doa, tmp_path, monkeypatch):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"source": "s", "target": "t"}) + "\n")
    (tmp_path / "toy.toml").write_text(toy_card("toy_all.json", secret.as_uri()))
    monkeypatch.setattr(cards, "CARDS_DIR", tmp_path)
    code, _, err = doa("data", "download", "toy", "--data-dir", tmp_path / "d")
    assert code == 2 and err.count("\n") == 1
    assert f"[data.urls] all = '{secret.as_uri()}': only https:// URLs are downloaded" in err
    assert not (tmp_path / "d" / "toy_all.json").exists()


def test_download_refuses_a_file_name_outside_the_data_folder(doa, tmp_path, monkeypatch):
    url = "https://example.org/toy_all.json"
    _serve(monkeypatch, {url: (json.dumps({"source": "s", "target": "t"}) + "\n").encode()})
    (tmp_path / "toy.toml").write_text(toy_card("../escaped.json", url))
    monkeypatch.setattr(cards, "CARDS_DIR", tmp_path)
    code, _, err = doa("data", "download", "toy", "--data-dir", tmp_path / "d")
    assert code == 2 and "files.all: '../escaped.json' must be a relative path inside the data folder" in err
    assert not (tmp_path / "escaped.json").exists()


def test_download_refuses_a_file_name_through_a_link_out_of_the_folder(doa, tmp_path, monkeypatch):
    url = "https://example.org/toy_all.json"
    _serve(monkeypatch, {url: (json.dumps({"source": "s", "target": "t"}) + "\n").encode()})
    (tmp_path / "toy.toml").write_text(toy_card("out/escaped.json", url))
    monkeypatch.setattr(cards, "CARDS_DIR", tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "d" / "out").symlink_to(tmp_path / "elsewhere")
    code, _, err = doa("data", "download", "toy", "--data-dir", tmp_path / "d")
    assert code == 2 and "[data.files] all = 'out/escaped.json' points outside the data folder" in err
    assert not (tmp_path / "elsewhere" / "escaped.json").exists()


def test_a_perfect_models_ceiling_counts_what_the_vocabulary_cannot_write_and_what_the_length_cuts(tmp_path):
    # SQuAD F1 of a perfect model's outputs written in a vocabulary without '☃': 'delta ☃' comes out 'delta ⁇'
    # (F1 50); cut after 'alpha beta', 'alpha beta gamma' scores 80 (precision 1, recall 2/3).
    from doa_jax.data import stats, vocab as vocab_lib

    (tmp_path / "toy.toml").write_text(toy_card())
    card = cards.load_card(tmp_path / "toy.toml")
    vocab = vocab_lib.Vocabulary(vocab_lib.build_vocab(["alpha beta gamma delta epsilon"] * 30, tmp_path / "v.model",
                                                       vocab_size=40))
    keep = len(vocab.encode("alpha beta"))
    assert vocab.encode("alpha beta gamma")[:keep] == vocab.encode("alpha beta")   # the cut falls between words
    examples = [{"source": "q1", "target": "alpha beta gamma"}, {"source": "q2", "target": "delta ☃"}]
    ceiling = stats.score_ceiling(card, vocab, examples, targets_length=keep + 1)
    assert ceiling["unwritable_targets"] == 1 and ceiling["lost_characters"] == {"☃": 1}
    assert ceiling["whole"] == pytest.approx((100 + 50) / 2)
    assert ceiling["at_targets_length"] == pytest.approx((80 + 50) / 2)
    assert stats.score_ceiling(cards.load_card("multipit_gen"), vocab, examples, 8) == {
        "metric": "bert_ibleu", "skipped": "BERT-iBLEU needs its BERTScore model"}
