"""Task metrics equal independent implementations (scikit-learn, sacrebleu, bert_score) and hand counts."""
import json
import math
import random

import pytest

from doa_jax import metrics

STANCE = ["Supporting", "Refuting", "Discussing", "Querying", "Irrelevant"]
WLP_TYPES = ["Action", "Reagent", "Amount", "Location"]


def _random_predictions(labels, n, seed):
    rng = random.Random(seed)
    refs = [rng.choice(labels) for _ in range(n)]
    noise = labels + ["maybe", ""]
    preds = [r if rng.random() < 0.5 else rng.choice(noise) for r in refs]
    # casing and spaces are post-processed away
    preds = [f"  {p.lower()} " if rng.random() < 0.2 else p for p in preds]
    return preds, refs


def _sk(preds, labels):
    """What scikit-learn should see: the canonical label, or a marker for an invalid prediction."""
    return [metrics.canonical_label(p, labels) or "<invalid>" for p in preds]


def test_accuracy_equals_sklearn_with_invalid_predictions_counted_wrong():
    from sklearn.metrics import accuracy_score

    preds, refs = _random_predictions(["SUPPORTS", "REFUTES"], 300, seed=0)
    got = metrics.accuracy(preds, refs, labels=["SUPPORTS", "REFUTES"])
    assert got["accuracy"] == pytest.approx(100 * accuracy_score(refs, _sk(preds, ["SUPPORTS", "REFUTES"])))
    assert got["invalid_predictions"] == sum(_sk(preds, ["SUPPORTS", "REFUTES"])[i] == "<invalid>" for i in range(300))
    assert got["invalid_predictions"] > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stance_macro_and_micro_f1_equal_sklearn(seed):
    from sklearn.metrics import f1_score

    preds, refs = _random_predictions(STANCE, 200, seed)
    got = metrics.classification_f1(preds, refs, labels=STANCE)
    sk_preds = _sk(preds, STANCE)
    present = [lab for lab in STANCE if lab in set(refs) | set(sk_preds)]
    assert got["macro_f1"] == pytest.approx(100 * f1_score(refs, sk_preds, labels=present, average="macro"))
    assert got["micro_f1"] == pytest.approx(100 * f1_score(refs, sk_preds, labels=present, average="micro"))


def test_micro_f1_is_accuracy_when_every_prediction_is_a_label():
    preds, refs = ["Supporting", "Refuting", "Refuting", "Querying"], ["Supporting", "Refuting", "Querying", "Querying"]
    got = metrics.classification_f1(preds, refs, labels=STANCE)
    assert got["micro_f1"] == pytest.approx(75.0) == pytest.approx(got["accuracy"])


def test_prediction_outside_label_set_is_wrong_and_reported():
    got = metrics.accuracy(["YES", "PERHAPS", "no"], ["YES", "NO", "NO"], labels=["YES", "NO"])
    assert got["accuracy"] == pytest.approx(200 / 3)
    assert got["invalid_predictions"] == 1


def test_reference_outside_label_set_is_an_error_naming_the_line():
    with pytest.raises(ValueError, match=r"reference 2: 'MAYBE' is not in the label set"):
        metrics.accuracy(["YES", "NO"], ["YES", "MAYBE"], labels=["YES", "NO"])


def test_prediction_count_must_match():
    with pytest.raises(ValueError, match="2 predictions for 3 references"):
        metrics.squad(["a", "b"], ["a", "b", "c"])


@pytest.mark.parametrize(
    "prediction, reference, em, f1",
    [
        ("The Eiffel Tower!", "eiffel tower", 1.0, 1.0),  # case, article, punctuation
        ("in Paris, France", "Paris", 0.0, 2 * (1 / 3) * 1 / (1 / 3 + 1)),  # 1 of 3 tokens, all of gold
        ("Gareth Barry", "Barry Gareth Jr", 0.0, 0.8),  # P 2/2, R 2/3
        ("an apple", "the pear", 0.0, 0.0),
        ("54 Mbit / s", "54 Mbit/s", 0.0, 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2)),  # [54 mbit s] vs [54 mbits]
    ],
)
def test_squad_known_cases(prediction, reference, em, f1):
    got = metrics.squad([prediction], [reference])
    assert got["exact_match"] == pytest.approx(100 * em)
    assert got["f1"] == pytest.approx(100 * f1)


def test_squad_normalisation_is_the_official_one():
    assert metrics.normalize_answer("  The  Cat's   'hat'. ") == "cats hat"
    assert metrics.normalize_answer("A theatre, an anthem") == "theatre anthem"


# ----------------------------------------------------------------------------------- WLP


def test_wlp_parse_spans_and_types():
    text = "Prepare [Action] stock solution [Reagent] 0.5 M [Concentration] EDTA [reagent] [6.2] x"
    types = ["Action", "Reagent", "Concentration"]
    assert metrics.parse_entities(text, types) == [
        ("Prepare", "Action"),
        ("stock solution", "Reagent"),
        ("0.5 M", "Concentration"),
        ("EDTA", "Reagent"),  # tag matched ignoring case
    ]  # "[6.2]" is not a type and trailing words without a tag are dropped


def test_wlp_f1_spurious_entity_costs_precision():
    gold = "Mix [Action] NaCl [Reagent]"
    pred = "Mix [Action] NaCl [Reagent] water [Reagent]"
    got = metrics.entity_f1([pred], [gold], entity_types=WLP_TYPES)
    assert (got["precision"], got["recall"]) == (pytest.approx(200 / 3), pytest.approx(100.0))
    assert got["f1"] == pytest.approx(80.0)  # 2PR/(P+R) with P=2/3, R=1


def test_wlp_f1_missed_and_mistyped_entities_cost_recall():
    golds = ["Mix [Action] NaCl [Reagent] tube [Location]", "Spin [Action]"]
    preds = ["Mix [Action] NaCl [Amount]", ""]
    got = metrics.entity_f1(preds, golds, entity_types=WLP_TYPES)
    # tp 1 (Mix/Action); predicted 2; gold 4
    assert got["precision"] == pytest.approx(50.0) and got["recall"] == pytest.approx(25.0)
    assert got["f1"] == pytest.approx(100 * 2 * 0.5 * 0.25 / 0.75)


def test_wlp_f1_counts_repeated_entities_as_a_multiset():
    gold = "Add [Action] water [Reagent] Add [Action]"
    got = metrics.entity_f1(["Add [Action] water [Reagent]"], [gold], entity_types=WLP_TYPES)
    assert got["precision"] == pytest.approx(100.0) and got["recall"] == pytest.approx(200 / 3)


def test_wlp_paper_mode_drops_last_word_and_overwrites_keys():
    # Released parser: "Add [Action]" -> key "" (last word dropped); "50 mL [Amount]" -> key "50";
    # "NaCl [Reagent]" -> key "" again, overwriting ACTION. Gold keys: {"": REAGENT, "50": AMOUNT}.
    gold = "Add [Action] 50 mL [Amount] NaCl [Reagent]"
    assert metrics.paper_parse_entities(gold) == {"": "REAGENT", "50": "AMOUNT"}
    pred = "Add [Action] 50 mL [Amount]"  # pred keys {"": ACTION, "50": AMOUNT}
    got = metrics.entity_f1([pred], [gold], entity_types=WLP_TYPES)
    assert got["paper_f1"] == pytest.approx(50.0)  # ("" REAGENT vs ACTION) wrong, ("50" AMOUNT) right
    assert got["f1"] == pytest.approx(80.0)  # standard: 2 of 2 predicted right, 2 of 3 gold found


def test_wlp_paper_mode_ignores_spurious_entities_and_scores_missed_amounts_right():
    gold = "Take [Action] 5 mL [Amount]"
    spurious = metrics.entity_f1(["Take [Action] 5 mL [Amount] big tube [Location]"], [gold], entity_types=WLP_TYPES)
    assert spurious["paper_f1"] == pytest.approx(100.0) and spurious["f1"] == pytest.approx(80.0)
    # A gold entity missing from the prediction gets the label AMOUNT: a missed Amount counts as right.
    missed = metrics.entity_f1(["Take [Action]"], ["Take [Action] 5 mL [Amount]"], entity_types=WLP_TYPES)
    assert missed["paper_f1"] == pytest.approx(100.0)
    assert missed["f1"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)


def test_wlp_paper_macro_f1_equals_sklearn_on_the_released_pairs():
    from sklearn.metrics import f1_score

    golds = ["Add [Action] 50 mL [Amount] NaCl [Reagent]", "Spin down [Action] at 4 C [Location]", "Mix well [Action]"]
    preds = ["Add [Action] 50 mL [Reagent]", "Spin down [Location] at 4 C [Location]", ""]
    pp, pg = metrics.paper_entity_pairs(preds, golds)
    got = metrics.entity_f1(preds, golds, entity_types=WLP_TYPES)
    assert got["paper_macro_f1"] == pytest.approx(100 * f1_score(pg, pp, average="macro"))
    assert got["paper_f1"] == pytest.approx(100 * f1_score(pg, pp, average="micro"))


# ----------------------------------------------------------------------------------- BLEU


SENTENCE_PAIRS = [
    ("The cat sat on the mat.", "The cat is sitting on the mat."),
    ("It costs $3,000.50 - or 3-4 items!", "It costs $3,000.50, or 3-4 items."),
    ("Happy Thanksgiving to all of my Canadian friends!", "Happy Thanksgiving to you and all in Canada"),
    ("short", "short"),
    ("a b c", "a b c d e f"),  # too short for 4-grams: BLEU 0 without smoothing
    ("#BREAKING another stabbing attack in #Raanana", "Another terror act of stabbing in Raanana ."),
    ("AT&amp;T &lt;3 &quot;quotes&quot;", 'AT&T <3 "quotes"'),
]


def _sacrebleu(hyp, ref):
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="13a", smooth_method="none", effective_order=False).corpus_score([hyp], [[ref]]).score


@pytest.mark.parametrize("hyp, ref", SENTENCE_PAIRS)
def test_sentence_bleu_equals_sacrebleu(hyp, ref):
    assert 100 * metrics.sentence_bleu(hyp, ref) == pytest.approx(_sacrebleu(hyp, ref), abs=1e-9)


def test_tokenize_13a_equals_sacrebleu():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok = Tokenizer13a()
    for hyp, ref in SENTENCE_PAIRS:
        for s in (hyp, ref):
            assert metrics.tokenize_13a(s) == tok(s).split()


def test_sentence_bleu_equals_sacrebleu_on_real_paraphrase_pairs(doa_data):
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok = Tokenizer13a()
    lines = (doa_data / "multipit_id" / "multipit_id_test_all.jsonl").read_text().splitlines()[:400]
    nonzero = 0
    for line in lines:
        s1, s2 = json.loads(line)["source"][len("sentence1: "):].split(" sentence2: ")
        assert metrics.tokenize_13a(s2) == tok(s2).split()
        ours = 100 * metrics.sentence_bleu(s2, s1)
        assert ours == pytest.approx(_sacrebleu(s2, s1), abs=1e-9)
        nonzero += ours > 0
    assert nonzero > 20  # the comparison covered real n-gram matches, not only zeros


# ----------------------------------------------------------------------------------- BERT-iBLEU


def test_ibleu_formula_hand_computed():
    # beta 4, BERTScore 0.9, self-BLEU 0.2 (+1e-5 each): 4/0.90001 = 4.4443951, 1/0.79999 = 1.2500156,
    # sum 5.6944107, divided by (4+1): 1.1388821; inverse 0.8780540.
    assert metrics.ibleu(0.9, 0.2) == pytest.approx(0.878054, abs=1e-6)
    # copying the source (self-BLEU 1) is worth nothing
    assert abs(metrics.ibleu(1.0, 1.0)) < 1e-3


def test_bert_ibleu_without_scorer_reports_self_bleu_and_says_why(monkeypatch):
    monkeypatch.delenv("DOA_BERTSCORE_MODEL", raising=False)
    srcs = ["The cat sat on the mat.", "Happy Thanksgiving to all"]
    preds = ["The cat is sitting on the mat.", ""]
    got = metrics.bert_ibleu(preds, srcs, sources=srcs)
    want = 100 * (metrics.sentence_bleu(preds[0], srcs[0]) + metrics.sentence_bleu("no prediction", srcs[1])) / 2
    assert got["self_bleu"] == pytest.approx(want)
    assert got["bert_ibleu"] is None and got["bertscore_f1"] is None
    assert "needs a BERTScore scorer model" in got["note"]


def _tiny_bert(tmp_path):
    """A random 3-layer BERT with a word-level vocabulary, saved as a local model folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    words = sorted(set("the a cat dog sat is sitting on mat rug happy thanksgiving to all you and in canada "
                       "my friends . , ! ?".split()))
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"), model_max_length=64)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


CANDS = ["the cat is sitting on the mat .", "happy thanksgiving to you and all in canada !", "a dog"]
SRCS = ["the cat sat on the mat .", "happy thanksgiving to all my friends in canada !", "a cat sat on a rug ."]


def _bert_score_reference(model_dir):
    """bert_score's F1 for each pair (scored one pair at a time: no padding), idf from SRCS."""
    bert_score = pytest.importorskip("bert_score")
    from bert_score.utils import get_idf_dict
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), use_fast=False)
    idf = get_idf_dict(SRCS, tok, nthreads=0)
    idf[tok.sep_token_id] = 0
    idf[tok.cls_token_id] = 0
    out = []
    for c, s in zip(CANDS, SRCS):
        _, _, f = bert_score.score([c], [s], model_type=str(model_dir), num_layers=2, idf=idf, batch_size=1,
                                   device="cpu")
        out.append(float(f[0]))
    return out


def test_bertscore_equals_bert_score_package(tmp_path):
    model_dir = _tiny_bert(tmp_path)
    want = _bert_score_reference(model_dir)
    got = metrics.BertScorer(model_dir, num_layers=2).f1(CANDS, SRCS, idf=True)
    assert got == pytest.approx(want, abs=1e-5)


def test_bert_ibleu_with_scorer_equals_bert_score_and_sacrebleu(tmp_path):
    model_dir = _tiny_bert(tmp_path)
    bs = _bert_score_reference(model_dir)
    preds, srcs = CANDS, SRCS
    sb = [_sacrebleu(p, s) / 100 for p, s in zip(preds, srcs)]
    want = sum(1 / ((4 / (b + 1e-5) + 1 / (1 - (s + 1e-5))) / 5) for b, s in zip(bs, sb)) / 3
    got = metrics.bert_ibleu(preds, srcs, sources=srcs, scorer_model=str(model_dir), num_layers=2)
    assert got["bert_ibleu"] == pytest.approx(100 * want, abs=1e-4)
    assert got["bertscore_f1"] == pytest.approx(100 * sum(bs) / 3, abs=1e-4)
    assert got["self_bleu"] == pytest.approx(100 * sum(sb) / 3)
    assert not math.isnan(got["bert_ibleu"])


def test_bertscore_of_an_empty_sentence_is_zero(tmp_path):
    scorer = metrics.BertScorer(_tiny_bert(tmp_path), num_layers=2)
    assert scorer.f1(["", "a dog"], ["a dog", ""]) == [0.0, 0.0]


def test_missing_scorer_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="scorer model folder .*nowhere.* not found"):
        metrics.bert_ibleu(["x"], ["x"], sources=["x"], scorer_model=str(tmp_path / "nowhere"))


def test_metrics_module_imports_without_tensorflow():
    import subprocess
    import sys

    code = "import sys, doa_jax.metrics, doa_jax.data.cards, doa_jax.data.pools, doa_jax.data.jsonl; " \
           "print('tensorflow' in sys.modules, 'seqio' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


WLP_PREDS = ["Add [Action] 5 ul [Amount] water [Reagent]", "Mix [Action] buffer [Location]", "", "Spin [Action]"]
WLP_REFS = ["Add [Action] 5 ul [Amount] water [Reagent]", "Mix [Action] buffer [Reagent]", "Wash [Action]", ""]


@pytest.mark.parametrize("metric, preds, refs, options", [
    ("accuracy", ["SUPPORTS", "maybe", "refutes ", "REFUTES"], ["SUPPORTS", "REFUTES", "REFUTES", "SUPPORTS"],
     {"labels": ["SUPPORTS", "REFUTES"]}),
    ("classification_f1", ["Supporting", "maybe", "Querying", "Refuting", "Querying"],
     ["Supporting", "Refuting", "Querying", "Discussing", "Supporting"], {"labels": STANCE}),
    ("classification_f1", ["Supporting", "maybe", "Querying", "Refuting", "Querying"],
     ["Supporting", "Refuting", "Querying", "Discussing", "Supporting"],
     {"labels": STANCE, "protocol": "paper", "invalid_label": "Irrelevant"}),
    ("squad", ["the Eiffel Tower", "Paris, France", "1889"], ["Eiffel Tower", "Paris", "in 1887"], {}),
    ("entity_f1", WLP_PREDS, WLP_REFS, {"entity_types": WLP_TYPES}),
    ("entity_f1", WLP_PREDS, WLP_REFS, {"entity_types": WLP_TYPES, "protocol": "paper"}),
])
def test_summed_example_statistics_score_a_resample_as_scoring_it_again(metric, preds, refs, options):
    # A bootstrap resample (indices with repeats, some examples left out) scored from per-example
    # counts gives every key the statistics cover exactly as re-scoring the picked predictions.
    stats = metrics.compute_statistics(metric, preds, refs, **options)
    rng = random.Random(7)
    for _ in range(20):
        idx = [rng.randrange(len(refs)) for _ in refs]
        fast = stats.score(idx)
        slow = metrics.compute(metric, [preds[i] for i in idx], [refs[i] for i in idx], **options)
        assert fast == pytest.approx({k: slow[k] for k in fast}, abs=1e-9, rel=0)
    assert {"accuracy": "accuracy", "classification_f1": "macro_f1", "squad": "f1", "entity_f1": "f1"}[metric] in fast


def test_bert_ibleu_has_no_example_statistics_so_resamples_are_rescored():
    assert metrics.compute_statistics("bert_ibleu", ["a b"], ["a b"]) is None
