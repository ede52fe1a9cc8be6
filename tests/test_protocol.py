"""PROTOCOL: `doa run` under 'efficient' (default) and 'paper' (gin/protocols/paper.gin), the checks a
paper cell makes before any compute, and a report over both saying which rows compare with the paper."""
import json

import pytest

from data_helpers import task_vocab
from doa_jax import cli
from doa_jax.data import cards, vocab as vocab_lib
from doa_jax.data.demo import model_vocab_size
from doa_jax.experiment.task_setup import TaskSetup, scored_references

REQUIRED = ["--gin.TASK='wlp'", "--gin.START_LABELS=16", "--gin.EXTRA_BUDGET_USD=5.0", "--gin.STRATEGY='distill'",
            "--gin.VOCABULARY=None"]


@pytest.fixture
def doa(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", {k: v for k, v in cli.COMMANDS.items() if k in ("run", "report")})

    def run(*args):
        code = cli.main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _paper_run(doa, tmp_path, *flags):
    return doa("run", "--gin_file", "runs/experiment.gin", "--gin_file", "protocols/paper.gin",
               f"--gin.OUTPUT_DIR='{tmp_path}'", *REQUIRED, *flags)


def test_unknown_protocol_is_one_clear_error(doa, tmp_path):
    code, _, err = doa("run", "--gin_file", "runs/experiment.gin", f"--gin.OUTPUT_DIR='{tmp_path}'", *REQUIRED,
                       "--gin.PROTOCOL='exact'")
    assert code == 2 and "PROTOCOL must be one of efficient, paper, got 'exact'" in err
    assert not (tmp_path / "results.jsonl").exists()


@pytest.mark.parametrize("flag,named", [
    ("--gin.TOPK=8", "TOPK=8 (paper: None)"),
    ("--gin.SOFT_TARGETS='stored' --gin.TOPK=8", "SOFT_TARGETS='stored' (paper: 'online'); TOPK=8 (paper: None)"),
    ("--gin.cell/OptimizerConfig.schedule='constant'",
     "cell/OptimizerConfig.schedule='constant' (paper: 'constant * linear_to_zero')"),
    ("--gin.ACTIVATION_DTYPE='bfloat16'", "ACTIVATION_DTYPE (teacher)='bfloat16' (paper: 'float32')"),
    ("--gin.student/T5Size.dropout_rate=0.0", "student/T5Size.dropout_rate=0.0 (paper: 0.1)"),
])
def test_paper_protocol_with_a_setting_it_contradicts_names_the_setting(doa, tmp_path, flag, named):
    code, _, err = _paper_run(doa, tmp_path, *flag.split())
    first = err.splitlines()[0]   # (gin adds the configurable's name on a second line)
    assert code == 2 and first.startswith("doa run: error: CellConfig: PROTOCOL='paper' contradicts") and named in first
    assert not (tmp_path / "results.jsonl").exists()


def test_released_reduction_with_stored_topk_is_refused_under_either_protocol(doa, tmp_path):
    code, _, err = doa("run", "--gin_file", "runs/experiment.gin", f"--gin.OUTPUT_DIR='{tmp_path}'", *REQUIRED,
                       "--gin.KD_PAPER_EXACT=True")
    assert code == 2 and "KD_PAPER_EXACT=True needs SOFT_TARGETS='online'" in err


@pytest.fixture(scope="module")
def tiny_gin(doa_data, tmp_path_factory):
    """Tiny teacher and student on real WLP: a gin file of model and run settings."""
    vocab = task_vocab(str(doa_data), vocab_size=2000)
    v = model_vocab_size(vocab)
    path = tmp_path_factory.mktemp("gin") / "tiny.gin"
    models = "".join(f"{role}/T5Size.{k} = {val}\n" for role in ("teacher", "student") for k, val in
                     dict(vocab_size=v, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=1,
                          num_decoder_layers=1).items())
    path.write_text(models + f"VOCABULARY = '{vocab.path}'\nTASK = 'wlp'\nSTART_LABELS = 16\n"
                    "EXTRA_BUDGET_USD = 5.0\nSTRATEGY = 'distill'\nTEACHER_SIZE = 'tiny'\nSTUDENT_SIZE = 'tiny'\n"
                    "BATCH_SIZE = 8\nTEACHER_EPOCHS = 1\nDISTILL_EPOCHS = 1\nMAX_UNLABELED = 16\n"
                    "MAX_EVAL_EXAMPLES = 8\nFEATURE_LENGTHS = {'inputs': 32, 'targets': 32}\n")
    return path


@pytest.mark.slow   # two distill cells with teacher fine-tune, store, student and evaluation: ~7 min on 2 busy cores
def test_a_tiny_run_under_each_protocol_finishes_names_it_and_the_report_says_which_compare(doa, tmp_path,
                                                                                             tiny_gin):
    base = ["--gin_file", "runs/experiment.gin"]
    code, out, err = doa("run", *base, "--gin_file", tiny_gin, f"--gin.OUTPUT_DIR='{tmp_path}'")
    assert code == 0, err
    code, out, err = doa("run", *base, "--gin_file", "protocols/paper.gin", "--gin_file", tiny_gin,
                         f"--gin.OUTPUT_DIR='{tmp_path}'")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["protocol"], r["status"]) for r in rows] == [("efficient", "ok"), ("paper", "ok")]
    assert rows[0]["cell_key"] != rows[1]["cell_key"]
    # the paper cell scored the targets as the released code's tokenizer writes them, cut at 32 tokens (EOS
    # included); its predictions keep the data's as raw_target; the efficient cell scored the data's own
    vocab = vocab_lib.Vocabulary(next(line.split("'")[1] for line in tiny_gin.read_text().splitlines()
                                      if line.startswith("VOCABULARY")))
    efficient, paper = ([json.loads(line) for line in (tmp_path / "cells" / r["cell_key"] / "predictions.jsonl")
                         .read_text().splitlines()] for r in rows)
    assert not any("raw_target" in e for e in efficient)
    assert sum("raw_target" in e for e in paper) >= 1
    raw = [e.get("raw_target", e["target"]) for e in paper]
    assert raw == [e["target"] for e in efficient]
    assert [e["target"] for e in paper] == scored_references(vocab, raw, {"targets": 32}, "paper")
    # and the row's metric is the paper scoring of those outputs against those references
    card = cards.load_card("wlp")
    assert rows[1]["value"] == pytest.approx(card.score([e["prediction"] for e in paper], [e["target"] for e in paper],
                                                        protocol="paper")[card.primary_metric])
    code, _, err = doa("report", tmp_path)
    assert code == 0, err
    md = (tmp_path / "report.md").read_text()
    # WLP is not among the tasks the paper profile was fitted to: its price says it is an extrapolation.
    assert "| wlp | 16 | 5 | Dist. | efficient | mfu (ASSUMED) | f1 |" in md
    assert "| wlp | 16 | 5 | Dist. | paper | paper (extrapolated, ±" in md
    # The paper has no 16-label cell: nothing to compare; the comparison logic is checked in
    # test_report.py on rows at the paper's cells.
    assert "## Comparison with the paper" not in md


def test_paper_decodes_one_token_less_than_the_targets_length_as_hf_max_length_does():
    lengths = {"inputs": 64, "targets": 8}
    assert TaskSetup(None, None, None, lengths, "paper").decode_length == 7
    assert TaskSetup(None, None, None, lengths).decode_length == 8


TARGETS = ["10 ml of buffer [Amount] at 37 °C [Temperature] .", "spin 5 min , then don't stop",
           "add 2 µl [Amount] of dye ☃ now", "one two three four five six seven eight nine ten eleven twelve"]


def test_paper_references_are_the_targets_as_the_released_codes_tokenizer_writes_them(tmp_path):
    # The released compute_metrics scores against tokenizer.batch_decode(labels, skip_special_tokens=True) under
    # transformers 4.22 (spaces cleaned up), the labels tokenized with truncation at max_target_length (EOS
    # included). Hugging Face's own T5 converter makes that tokenizer from the same SentencePiece model.
    transformers = pytest.importorskip("transformers")
    from test_vocab import _hf_tokenizer_json

    vocab = vocab_lib.Vocabulary(vocab_lib.build_vocab(TARGETS[:2] + TARGETS[3:] + ["spin add dye now of"] * 5,
                                                       tmp_path / "v.model", vocab_size=60))
    _hf_tokenizer_json(vocab.path, tmp_path / "tokenizer.json")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="</s>",
                                              unk_token="<unk>", pad_token="<pad>")
    for length in (6, 12, 64):
        labels = hf(text_target=TARGETS, max_length=length, truncation=True)["input_ids"]
        released = hf.batch_decode(labels, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        assert [len(x) for x in labels] == [min(len(vocab.encode(t)) + 1, length) for t in TARGETS]
        assert scored_references(vocab, TARGETS, {"targets": length}, "paper") == released
    whole = scored_references(vocab, TARGETS, {"targets": 64}, "paper")
    assert whole[1] == "spin 5 min, then don't stop" and "☃" not in whole[2] and "⁇" not in whole[2]
    assert scored_references(vocab, TARGETS, {"targets": 6}, "efficient") == TARGETS


def test_paper_outputs_are_decoded_as_the_released_code_decodes_them(tmp_path):
    # An output that differs from its reference only by an unknown piece matches it, as in the released code
    # (both sides drop it); an extra id is dropped too. Under 'efficient' the unknown piece reads ⁇.
    vocab = vocab_lib.Vocabulary(vocab_lib.build_vocab(TARGETS[:2] + ["add 2 ul of dye now"] * 5, tmp_path / "v.model",
                                                       vocab_size=50))
    ids = vocab.encode("add 2 µl of dye now")
    assert vocab.unk_id in ids
    without = [i for i in ids if i != vocab.unk_id] + [vocab.vocab_size - 1, vocab.eos_id]   # + <extra_id_0>
    paper, efficient = (TaskSetup(None, None, vocab, {"inputs": 16, "targets": 16}, p) for p in ("paper", "efficient"))
    assert paper.decode(without) == paper.references([{"target": "add 2 µl of dye now"}])[0]
    assert "⁇" in efficient.decode(ids) and "⁇" not in paper.decode(ids)
