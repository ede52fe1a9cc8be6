"""Task metrics of "Distill or Annotate?", in percent, as a table: metric name -> function.

A card names its metric (`metric = "..."`); `compute(metric, predictions, references, labels=...,
sources=...)` post-processes and scores (`Card.score` passes the card's label set and types). What each metric is:

- `accuracy` (FEVER, MultiPIT_Id): a prediction is stripped and matched to the label set ignoring
  case; one outside the set is counted wrong and reported as `invalid_predictions`.
- `classification_f1` (Stanceosaurus): `macro_f1` and `micro_f1` over the labels that occur in the
  references or the valid predictions (scikit-learn's `f1_score(labels=...)`); an invalid prediction
  is a miss for its gold label and a false positive for none. Also `accuracy`, `invalid_predictions`.
- `squad` (NQ): SQuAD v1.1 `exact_match` and token `f1` after the official answer normalisation
  (lower case, drop punctuation and the articles a/an/the, squeeze spaces).
- `entity_f1` (WLP): targets are `span [Type] span [Type] ...`. `f1` (with `precision`, `recall`) is
  the standard micro F1 over (entity text, type) pairs per sentence: a spurious predicted entity
  costs precision, a missed one recall. `paper_f1` / `paper_macro_f1` reproduce the paper's released
  code: it keys entities by their text with the word before each tag dropped (so every one-word
  entity becomes the empty string and entities sharing a key overwrite each other), scores once per
  gold key (a gold entity the prediction lacks gets the label AMOUNT), and takes scikit-learn's micro
  and macro F1 over those label pairs; spurious predictions cost nothing.
- `bert_ibleu` (MultiPIT_Gen): Niu et al. (2021), "Unsupervised Paraphrasing with Pretrained Language
  Models", per example, with beta = 4:
      BERT-iBLEU = ((beta * BERTScore^-1 + 1 * (1 - selfBLEU)^-1) / (beta + 1))^-1,
  a weighted harmonic mean of BERTScore(output, source) (F1, idf weights from the sources) and
  1 - BLEU(output, source); averaged over examples. As in the paper's code, an empty output is scored
  as "no prediction" and 1e-5 is added to both parts. selfBLEU is sentence BLEU (13a tokens, up to
  4-grams, no smoothing). BERTScore needs a scorer model at a local path (deberta-xlarge-mnli,
  layer 40, in the paper): without one, `self_bleu` is reported, `bert_ibleu` is null and `note`
  says why. Nothing is substituted.

Protocols (`protocol=`): `efficient` (default) scores as above. `paper` scores as the released code
(run_t5.py of jm-kang/Distill-or-Annotate) does: a classification output outside the label set is
mapped to the label the released code gives id 0 (the card's `paper_invalid_label`: FEVER REFUTES,
MultiPIT_Id NO, Stanceosaurus IRRELEVANT), so it is correct whenever gold is that label; WLP's `f1`
(`precision`, `recall`) are the released parse's micro scores (`paper_f1`), the standard span F1
moving to `span_f1` (`span_precision`, `span_recall`). The other keys are the same under both.

Per-example statistics (`compute_statistics`, `ExampleStatistics`): for the metrics that are sums over
examples (counts of correct labels, of matched entities, ...), each example's counts, so a bootstrap
resample is scored by summing rows instead of re-parsing every prediction (same numbers).

Pure Python and numpy; BERTScore imports torch/transformers only when a scorer model is given.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import string
from typing import Callable, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# Post-processing


def canonical_label(prediction: str, labels: Sequence[str]) -> str | None:
    """The label a prediction names (stripped, case-insensitive), or None when it names none."""
    lookup = {label.casefold(): label for label in labels}
    return lookup.get(prediction.strip().casefold())


PROTOCOLS = ("efficient", "paper")


def check_protocol(protocol: str) -> str:
    """`protocol` if known, else one error naming the known ones."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; protocols: {', '.join(PROTOCOLS)}")
    return protocol


def paper_label(prediction: str, labels: Sequence[str], invalid_label: str | None) -> str:
    """The released code's mapping: `pred.strip().upper()` if it names a label, else its id-0 label."""
    lookup = {label.upper(): label for label in labels}
    label = lookup.get(prediction.strip().upper())
    if label is not None:
        return label
    if invalid_label is None or invalid_label.upper() not in lookup:
        raise ValueError(f"protocol 'paper' needs the label the released code gives out-of-label outputs "
                         f"(the card's paper_invalid_label, one of {list(labels)}), got {invalid_label!r}")
    return lookup[invalid_label.upper()]


def _predicted_labels(predictions, labels, protocol: str, invalid_label: str | None) -> list[str | None]:
    if check_protocol(protocol) == "paper":
        return [paper_label(p, labels, invalid_label) for p in predictions]
    return [canonical_label(p, labels) for p in predictions]


def _invalid(predictions, labels) -> int:
    return sum(canonical_label(p, labels) is None for p in predictions)


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no references to score")


def _gold_labels(references: Sequence[str], labels: Sequence[str]) -> list[str]:
    out = []
    for i, ref in enumerate(references):
        gold = canonical_label(ref, labels)
        if gold is None:
            raise ValueError(f"reference {i + 1}: {ref!r} is not in the label set {list(labels)}")
        out.append(gold)
    return out


# ---------------------------------------------------------------------------------------------
# Classification


def accuracy(predictions, references, *, labels, protocol="efficient", invalid_label=None, **_):
    _check_lengths(predictions, references)
    gold = _gold_labels(references, labels)
    pred = _predicted_labels(predictions, labels, protocol, invalid_label)
    correct = sum(p == g for p, g in zip(pred, gold))
    return {
        "accuracy": 100.0 * correct / len(gold),
        "invalid_predictions": _invalid(predictions, labels),
        "count": len(gold),
    }


def _f1(tp: int, fp: int, fn: int) -> float:
    return 0.0 if tp == 0 else 2.0 * tp / (2 * tp + fp + fn)


def _label_counts(pred: Sequence[str | None], gold: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Per example, [tp, fp, fn] of every label (label-major, 3 x len(labels) columns): an invalid
    prediction (None) is a miss for its gold label and a false positive for none."""
    index = {lab: i for i, lab in enumerate(labels)}
    counts = np.zeros((len(gold), len(labels), 3), np.int64)
    for row, (p, g) in enumerate(zip(pred, gold)):
        if p == g:
            counts[row, index[g], 0] = 1
        else:
            counts[row, index[g], 2] = 1
            if p is not None:
                counts[row, index[p], 1] = 1
    return counts.reshape(len(gold), 3 * len(labels))


def _classification_scores(per_label: np.ndarray, correct: int, n: int) -> dict[str, float]:
    """macro/micro F1 over the labels present (in the references or valid predictions: any tp, fp or
    fn) and accuracy, from summed [tp, fp, fn] per label."""
    per_label = per_label.reshape(-1, 3)
    present = [tuple(int(v) for v in x) for x in per_label if x.sum() > 0]
    tp, fp, fn = (sum(x[k] for x in present) for k in range(3))
    return {"macro_f1": 100.0 * sum(_f1(*x) for x in present) / len(present), "micro_f1": 100.0 * _f1(tp, fp, fn),
            "accuracy": 100.0 * correct / n}


def classification_f1(predictions, references, *, labels, protocol="efficient", invalid_label=None, **_):
    _check_lengths(predictions, references)
    gold = _gold_labels(references, labels)
    pred = _predicted_labels(predictions, labels, protocol, invalid_label)
    scores = _classification_scores(_label_counts(pred, gold, labels).sum(axis=0),
                                    sum(p == g for p, g in zip(pred, gold)), len(gold))
    return {**scores, "invalid_predictions": _invalid(predictions, labels), "count": len(gold)}


# ---------------------------------------------------------------------------------------------
# SQuAD (NQ)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lower, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_f1(prediction: str, reference: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad(predictions, references, **_):
    _check_lengths(predictions, references)
    em = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    f1 = sum(squad_f1(p, r) for p, r in zip(predictions, references))
    n = len(references)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "count": n}


# ---------------------------------------------------------------------------------------------
# WLP entities


def parse_entities(text: str, entity_types: Sequence[str]) -> list[tuple[str, str]]:
    """(entity text, type) pairs of `span [Type] span [Type] ...`; words after the last tag are dropped."""
    lookup = {t.casefold(): t for t in entity_types}
    words, out, start = text.split(), [], 0
    for i, word in enumerate(words):
        if len(word) > 2 and word[0] == "[" and word[-1] == "]" and word[1:-1].casefold() in lookup:
            if i > start:
                out.append((" ".join(words[start:i]), lookup[word[1:-1].casefold()]))
            start = i + 1
    return out


# The entity types of the paper's released parser (two more than WLP has: MISC, UNIT).
PAPER_WLP_TYPES = frozenset(
    "AMOUNT REAGENT DEVICE TIME SPEED ACTION MENTION LOCATION NUMERICAL METHOD TEMPERATURE MODIFIER "
    "CONCENTRATION SIZE GENERIC-MEASURE SEAL MEASURE-TYPE MISC PH UNIT".split()
)


def paper_parse_entities(text: str) -> dict[str, str]:
    """The released code's parse: key = words between tags minus the last one; later keys overwrite."""
    words, out, prev = text.split(), {}, -1
    for i, word in enumerate(words):
        if "[" in word and "]" in word and word[1:-1].upper() in PAPER_WLP_TYPES:
            out[" ".join(words[prev + 1 : i - 1])] = word[1:-1].upper()
            prev = i
    return out


def paper_entity_pairs(predictions, references) -> tuple[list[str], list[str]]:
    """(predicted, gold) labels, one pair per gold key, as the released code builds them."""
    pred_labels, gold_labels = [], []
    for p, r in zip(predictions, references):
        pred, gold = paper_parse_entities(p.strip()), paper_parse_entities(r.strip())
        for key, label in gold.items():
            pred_labels.append(pred.get(key, "AMOUNT"))
            gold_labels.append(label)
    return pred_labels, gold_labels


def _entity_counts(prediction: str, reference: str, entity_types: Sequence[str]) -> tuple[int, int, int]:
    """(matched, predicted, gold) (entity text, type) pairs of one sentence."""
    pred = collections.Counter(parse_entities(prediction, entity_types))
    gold = collections.Counter(parse_entities(reference, entity_types))
    return sum((pred & gold).values()), sum(pred.values()), sum(gold.values())


def _span_scores(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
    """Micro span F1, precision and recall (percent) from summed counts."""
    if n_pred == 0 and n_gold == 0:
        f1 = 1.0  # nothing to find and nothing found
    else:
        f1 = _f1(tp, n_pred - tp, n_gold - tp)
    return {"f1": 100.0 * f1, "precision": 100.0 * (tp / n_pred) if n_pred else 0.0,
            "recall": 100.0 * (tp / n_gold) if n_gold else 0.0}


def _paper_protocol_keys(result: dict, paper_f1: float) -> dict:
    """`protocol='paper'`: one label per gold key on both sides, so micro precision = recall = F1 =
    the share that agree; the standard span scores move to span_*."""
    result.update(span_f1=result["f1"], span_precision=result["precision"], span_recall=result["recall"],
                  f1=paper_f1, precision=paper_f1, recall=paper_f1)
    return result


def entity_f1(predictions, references, *, entity_types, protocol="efficient", **_):
    _check_lengths(predictions, references)
    tp, n_pred, n_gold = (sum(c) for c in zip(*(_entity_counts(p, r, entity_types)
                                                for p, r in zip(predictions, references))))
    pp, pg = paper_entity_pairs(predictions, references)
    labels = sorted(set(pp) | set(pg))
    per_label = [
        _f1(
            sum(a == lab and b == lab for a, b in zip(pp, pg)),
            sum(a == lab and b != lab for a, b in zip(pp, pg)),
            sum(a != lab and b == lab for a, b in zip(pp, pg)),
        )
        for lab in labels
    ]
    paper_f1 = 100.0 * sum(a == b for a, b in zip(pp, pg)) / len(pg) if pg else 0.0
    result = {
        **_span_scores(tp, n_pred, n_gold),
        "paper_f1": paper_f1,
        "paper_macro_f1": 100.0 * sum(per_label) / len(per_label) if per_label else 0.0,
        "predicted_entities": n_pred,
        "gold_entities": n_gold,
    }
    return _paper_protocol_keys(result, paper_f1) if check_protocol(protocol) == "paper" else result


# ---------------------------------------------------------------------------------------------
# BLEU (13a tokens) and BERT-iBLEU (MultiPIT_Gen)

_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma unless after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma unless before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
)


def tokenize_13a(line: str) -> list[str]:
    """mteval-v13a tokenisation (the default of BLEU in sacrebleu and in HF evaluate)."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return line.split()


def sentence_bleu(hypothesis: str, reference: str, max_order: int = 4) -> float:
    """BLEU in [0, 1] of one hypothesis against one reference: no smoothing, brevity penalty."""
    hyp, ref = tokenize_13a(hypothesis), tokenize_13a(reference)
    if not hyp or not ref:
        return 0.0
    log_sum = 0.0
    for n in range(1, max_order + 1):
        h = collections.Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
        r = collections.Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        matches, possible = sum((h & r).values()), max(len(hyp) - n + 1, 0)
        if matches == 0 or possible == 0:
            return 0.0
        log_sum += math.log(matches / possible)
    brevity = 1.0 if len(hyp) >= len(ref) else math.exp(1.0 - len(ref) / len(hyp))
    return brevity * math.exp(log_sum / max_order)


# BERTScore layer per scorer model (bert_score's choices); others use their last layer.
BERTSCORE_LAYERS = {"deberta-xlarge-mnli": 40, "deberta-large-mnli": 18, "roberta-large": 17}
BERT_IBLEU_NEEDS_SCORER = (
    "BERT-iBLEU needs a BERTScore scorer model at a local path (deberta-xlarge-mnli in the paper): "
    "pass --scorer-model PATH or set DOA_BERTSCORE_MODEL; only self_bleu is reported"
)


class BertScorer:
    """BERTScore F1 (Zhang et al. 2020) with idf weights, from a transformers model in a local folder.

    Token embeddings come from hidden layer `num_layers`; special tokens take part in the greedy
    cosine matching but weigh zero ([CLS]/[SEP] idf = 0); idf(w) = log((M + 1) / (df(w) + 1)) over
    the M reference sentences. No baseline rescaling (the paper used none).
    """

    def __init__(self, model_dir: str | os.PathLike, num_layers: int | None = None, batch_size: int = 32):
        import torch
        import transformers

        model_dir = os.fspath(model_dir)
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"BERTScore scorer model folder {model_dir} not found")
        self._torch = torch
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.model = transformers.AutoModel.from_pretrained(model_dir).eval()
        name = os.path.basename(os.path.normpath(model_dir))
        self.num_layers = num_layers or BERTSCORE_LAYERS.get(name, self.model.config.num_hidden_layers)
        self.batch_size = batch_size
        positions = getattr(self.model.config, "max_position_embeddings", None) or 512
        self.max_length = min(self.tokenizer.model_max_length, positions)

    def encode(self, sentence: str) -> list[int]:
        return self.tokenizer(
            sentence.strip(), add_special_tokens=True, truncation=True, max_length=self.max_length
        )["input_ids"]

    def idf(self, references: Sequence[str]) -> Callable[[int], float]:
        df = collections.Counter()
        for ref in references:
            df.update(set(self.encode(ref)))
        m = len(references)
        weights = {tok: math.log((m + 1) / (c + 1)) for tok, c in df.items()}
        special = {self.tokenizer.sep_token_id, self.tokenizer.cls_token_id}
        return lambda tok: 0.0 if tok in special else weights.get(tok, math.log(m + 1))

    def _embed(self, id_lists: list[list[int]]):
        torch = self._torch
        out = []
        for start in range(0, len(id_lists), self.batch_size):
            chunk = id_lists[start : start + self.batch_size]
            width = max(len(x) for x in chunk)
            pad = self.tokenizer.pad_token_id or 0
            ids = torch.tensor([x + [pad] * (width - len(x)) for x in chunk])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk])
            with torch.no_grad():
                hidden = self.model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
            layer = hidden[self.num_layers]
            out.extend(layer[i, : len(x)] for i, x in enumerate(chunk))
        return out

    def f1(self, candidates: Sequence[str], references: Sequence[str], idf: bool = True) -> list[float]:
        """BERTScore F1 of each candidate against its reference (idf from `references`)."""
        torch = self._torch
        special = {self.tokenizer.sep_token_id, self.tokenizer.cls_token_id}
        weight = self.idf(references) if idf else (lambda tok: 0.0 if tok in special else 1.0)
        cand_ids = [self.encode(c) for c in candidates]
        ref_ids = [self.encode(r) for r in references]
        cand_emb, ref_emb = self._embed(cand_ids), self._embed(ref_ids)
        scores = []
        for c_ids, r_ids, c, r in zip(cand_ids, ref_ids, cand_emb, ref_emb):
            c = c / c.norm(dim=-1, keepdim=True)
            r = r / r.norm(dim=-1, keepdim=True)
            sim = c @ r.T
            wc = torch.tensor([weight(t) for t in c_ids], dtype=sim.dtype)
            wr = torch.tensor([weight(t) for t in r_ids], dtype=sim.dtype)
            if wc.sum() == 0 or wr.sum() == 0:  # an empty sentence: bert_score scores 0
                scores.append(0.0)
                continue
            p = float((sim.max(dim=1).values * wc).sum() / wc.sum())
            rec = float((sim.max(dim=0).values * wr).sum() / wr.sum())
            scores.append(0.0 if p + rec == 0 or math.isnan(p + rec) else 2 * p * rec / (p + rec))
        return scores


def ibleu(bertscore: float, self_bleu: float, beta: float = 4.0) -> float:
    """Niu et al.'s BERT-iBLEU of one example, with the paper code's 1e-5 added to both parts."""
    bs, sb = bertscore + 1e-5, self_bleu + 1e-5
    return 1.0 / ((beta / bs + 1.0 / (1.0 - sb)) / (beta + 1.0))


def bert_ibleu(predictions, references, *, sources=None, scorer_model=None, num_layers=None, **_):
    """MultiPIT_Gen: outputs are compared with the sources (references are only counted)."""
    _check_lengths(predictions, references)
    if sources is None:
        raise ValueError("BERT-iBLEU compares each output with its source: the references need `source`")
    outputs = [p.strip() or "no prediction" for p in predictions]
    self_bleu = [sentence_bleu(o, s.strip()) for o, s in zip(outputs, sources)]
    result = {"self_bleu": 100.0 * sum(self_bleu) / len(self_bleu), "count": len(outputs)}
    scorer_model = scorer_model or os.environ.get("DOA_BERTSCORE_MODEL")
    if not scorer_model:
        result.update(bert_ibleu=None, bertscore_f1=None, note=BERT_IBLEU_NEEDS_SCORER)
        return result
    scorer = scorer_model if isinstance(scorer_model, BertScorer) else BertScorer(scorer_model, num_layers)
    bs = scorer.f1(outputs, [s.strip() for s in sources], idf=True)
    per_example = [ibleu(b, s) for b, s in zip(bs, self_bleu)]
    result.update(
        bert_ibleu=100.0 * sum(per_example) / len(per_example),
        bertscore_f1=100.0 * sum(bs) / len(bs),
        bertscore_layer=scorer.num_layers,
    )
    return result


# ---------------------------------------------------------------------------------------------
# Per-example statistics (bootstrap resamples)


@dataclasses.dataclass(frozen=True)
class ExampleStatistics:
    """Each example's counts (one row per example) and how summed counts become the metric's keys: a
    resample of examples (indices, repeats allowed) is scored as the sum of its rows, with the same
    numbers as scoring its predictions again, without re-parsing them. `finish` gives the keys that
    are functions of the sums (not every key of the metric: e.g. not WLP's paper_macro_f1)."""

    counts: np.ndarray                                   # [examples, statistics]
    finish: Callable[[np.ndarray], dict[str, float]]     # summed counts -> {key: percent}

    def score(self, indices: Sequence[int]) -> dict[str, float]:
        return self.finish(self.counts[np.asarray(indices, np.int64)].sum(axis=0))


def _accuracy_statistics(predictions, references, *, labels, protocol="efficient", invalid_label=None, **_):
    gold = _gold_labels(references, labels)
    pred = _predicted_labels(predictions, labels, protocol, invalid_label)
    counts = np.array([[p == g, 1] for p, g in zip(pred, gold)], np.int64)
    return ExampleStatistics(counts, lambda c: {"accuracy": 100.0 * int(c[0]) / int(c[1])})


def _classification_statistics(predictions, references, *, labels, protocol="efficient", invalid_label=None, **_):
    gold = _gold_labels(references, labels)
    pred = _predicted_labels(predictions, labels, protocol, invalid_label)
    correct = np.array([[p == g, 1] for p, g in zip(pred, gold)], np.int64)
    counts = np.concatenate([_label_counts(pred, gold, labels), correct], axis=1)
    return ExampleStatistics(counts, lambda c: _classification_scores(c[:-2], int(c[-2]), int(c[-1])))


def _squad_statistics(predictions, references, **_):
    counts = np.array([[normalize_answer(p) == normalize_answer(r), squad_f1(p, r), 1.0]
                       for p, r in zip(predictions, references)], np.float64)
    return ExampleStatistics(counts, lambda c: {"exact_match": 100.0 * c[0] / c[2], "f1": 100.0 * c[1] / c[2]})


def _entity_statistics(predictions, references, *, entity_types, protocol="efficient", **_):
    """Per sentence: matched, predicted and gold spans (micro span F1), and the released code's gold
    keys and how many of them the prediction labels alike (its micro F1, `paper_f1`)."""
    rows = []
    for p, r in zip(predictions, references):
        pp, pg = paper_entity_pairs([p], [r])
        rows.append((*_entity_counts(p, r, entity_types), sum(a == b for a, b in zip(pp, pg)), len(pg)))
    paper = check_protocol(protocol) == "paper"

    def finish(c: np.ndarray) -> dict[str, float]:
        tp, n_pred, n_gold, agree, keys = (int(v) for v in c)
        paper_f1 = 100.0 * agree / keys if keys else 0.0
        result = {**_span_scores(tp, n_pred, n_gold), "paper_f1": paper_f1}
        return _paper_protocol_keys(result, paper_f1) if paper else result

    return ExampleStatistics(np.array(rows, np.int64).reshape(len(rows), 5), finish)


# ---------------------------------------------------------------------------------------------
# The table


@dataclasses.dataclass(frozen=True)
class Metric:
    fn: Callable[..., dict]
    needs: str | None  # what the card must give: "labels" | "entity_types" | None
    # Per-example statistics (`compute_statistics`), for metrics that are functions of sums over examples.
    statistics: Callable[..., ExampleStatistics] | None = None


METRICS: dict[str, Metric] = {
    "accuracy": Metric(accuracy, "labels", _accuracy_statistics),
    "classification_f1": Metric(classification_f1, "labels", _classification_statistics),
    "squad": Metric(squad, None, _squad_statistics),
    "entity_f1": Metric(entity_f1, "entity_types", _entity_statistics),
    "bert_ibleu": Metric(bert_ibleu, None),   # a per-example BERTScore model: re-scored, no statistics
}


def compute(metric: str, predictions: Sequence[str], references: Sequence[str], *, labels: Sequence[str] = (),
            entity_types: Sequence[str] = (), sources=None, protocol: str = "efficient",
            invalid_label: str | None = None, **options) -> dict:
    """`metric` (a name in METRICS) on predictions vs reference targets, in percent.

    `labels` are the label set of classification metrics, `entity_types` WLP's types, `sources` the
    inputs (MultiPIT_Gen's self-BLEU), `protocol` 'efficient' or 'paper' (see the module docstring),
    `invalid_label` the label 'paper' gives an out-of-label output. `Card.score` passes the card's.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; metrics: {', '.join(sorted(METRICS))}")
    check_protocol(protocol)
    return METRICS[metric].fn(
        list(predictions),
        list(references),
        labels=list(labels),
        entity_types=list(entity_types),
        sources=None if sources is None else list(sources),
        protocol=protocol,
        invalid_label=invalid_label,
        **options,
    )


def compute_statistics(metric: str, predictions: Sequence[str], references: Sequence[str], *,
                       labels: Sequence[str] = (), entity_types: Sequence[str] = (), protocol: str = "efficient",
                       invalid_label: str | None = None) -> ExampleStatistics | None:
    """`metric`'s per-example statistics (see `ExampleStatistics`), or None for a metric without
    them (BERT-iBLEU: score resamples with `compute`). Same arguments and errors as `compute`."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; metrics: {', '.join(sorted(METRICS))}")
    check_protocol(protocol)
    statistics = METRICS[metric].statistics
    if statistics is None:
        return None
    _check_lengths(predictions, references)
    return statistics(list(predictions), list(references), labels=list(labels), entity_types=list(entity_types),
                      protocol=protocol, invalid_label=invalid_label)
