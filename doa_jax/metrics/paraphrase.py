"""`bert_ibleu` (MultiPIT_Gen): BERTScore against the source and self-BLEU, combined as Niu et al. (2021)."""
from __future__ import annotations

import collections
import math
import os
import re
from typing import Callable, Sequence

from doa_jax.metrics.common import _check_lengths


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


def bert_ibleu(predictions, references, *, sources=None, scorer_model=None, num_layers=None, protocol="efficient",
               **_):
    """MultiPIT_Gen: outputs are compared with the sources (references are only counted); under the paper's
    protocol with the references, as the released code compares them with its decoded labels (in its test
    file each target is its source, and the caller passes the references the released code decoded)."""
    _check_lengths(predictions, references)
    if protocol == "paper":
        sources = references
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
