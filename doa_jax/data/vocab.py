"""Vocabularies: T5's SentencePiece model from a path, or one trained offline on task text.

T5's ids: pad 0, eos 1, unk 2, no bos, then the model's pieces, then 100 extra ids
(`<extra_id_0>` is the last id), as seqio's `SentencePieceVocabulary(path, extra_ids=100)` numbers
them. `build_vocab` trains a SentencePiece model with those special ids, for machines without
T5's `spiece.model`; `from_tokenizer_json` rebuilds T5's own from a Hugging Face `tokenizer.json`. A vocabulary's `spec()` (path, sha256, extra ids, size) goes into a run's
config; `check_vocab` refuses a model whose vocab_size does not fit it.

Uses the `sentencepiece` package only (no TensorFlow); `seqio_tasks.seqio_vocabulary` makes the
equivalent seqio object.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import re
from typing import Iterable, Sequence

from doa_jax import storage
from doa_jax.data import cards, jsonl
from doa_jax.model import config as model_config
from doa_jax.model.config import T5_EXTRA_IDS, VOCAB_PAD_MULTIPLE

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


class Vocabulary:
    """A SentencePiece model with T5's special ids and `extra_ids` sentinel ids on top."""

    def __init__(self, path: str | os.PathLike, extra_ids: int = T5_EXTRA_IDS):
        import sentencepiece as spm

        self.path = storage.path(path)     # a local file or a URL (gs://), read whole
        if not self.path.is_file():
            raise FileNotFoundError(f"SentencePiece model {self.path} not found")
        self.extra_ids = int(extra_ids)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self.path.read_bytes())
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: not a SentencePiece model ({e})") from None
        ids = {"pad": self._sp.pad_id(), "eos": self._sp.eos_id(), "unk": self._sp.unk_id()}
        if ids != {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID}:
            raise ValueError(f"{self.path}: special ids {ids}; T5 needs pad 0, eos 1, unk 2")

    pad_id, eos_id, unk_id = PAD_ID, EOS_ID, UNK_ID

    @property
    def base_vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + self.extra_ids

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids up to the first EOS; pads dropped, extra ids decoded as unknown (like seqio)."""
        out = []
        for i in (int(x) for x in ids):
            if i == EOS_ID:
                break
            if i == PAD_ID:
                continue
            out.append(i if i < self.base_vocab_size else UNK_ID)
        return self._sp.DecodeIds(out)

    def spec(self) -> dict:
        """What a run's config records, to check later that the same vocabulary is in use."""
        return {
            "path": str(self.path),
            "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(),
            "extra_ids": self.extra_ids,
            "vocab_size": self.vocab_size,
        }


def load_vocab(spec_or_path, extra_ids: int = T5_EXTRA_IDS) -> Vocabulary:
    """A Vocabulary from a path, a Vocabulary, or a spec dict (its sha256, if given, must match)."""
    if isinstance(spec_or_path, Vocabulary):
        return spec_or_path
    if isinstance(spec_or_path, dict):
        vocab = Vocabulary(spec_or_path["path"], spec_or_path.get("extra_ids", extra_ids))
        want = spec_or_path.get("sha256")
        if want and want != vocab.spec()["sha256"]:
            raise ValueError(f"vocabulary {vocab.path} changed since the run was configured (sha256 differs)")
        return vocab
    return Vocabulary(spec_or_path, extra_ids)


def padded_vocab_size(vocab: Vocabulary, pad_multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Embedding rows a model needs for `vocab`: its ids rounded up to a multiple (T5: 32100 -> 32128)."""
    return model_config.padded_vocab_size(vocab.vocab_size, pad_multiple)


def check_vocab(vocab: Vocabulary, model_vocab_size: int, *, pad_multiple: int = VOCAB_PAD_MULTIPLE) -> None:
    """Raises unless the model's embedding rows hold exactly this vocabulary, padded to `pad_multiple`.

    T5: 32000 pieces + 100 extra ids = 32100, padded to 32128 (`doa_jax.model.config.check_vocab_size`).
    """
    model_config.check_vocab_size(vocab.vocab_size, model_vocab_size, describe(vocab), pad_multiple)


def describe(vocab: Vocabulary) -> str:
    """'vocabulary PATH has N ids (P pieces + E extra ids)', as errors about model sizes name it."""
    return (f"vocabulary {vocab.path} has {vocab.vocab_size} ids ({vocab.base_vocab_size} pieces + "
            f"{vocab.extra_ids} extra ids)")


def within_length(ids: Sequence[int], length: int) -> list[int]:
    """The pieces a feature of `length` positions keeps: `length - 1` and the EOS after them (SeqIO's
    truncation, and Hugging Face's with `max_length`, both count the EOS)."""
    return list(ids)[: length - 1]


# What transformers 4.22, the paper's released code's, does to decoded text by default
# (`clean_up_tokenization_spaces=True`).
RELEASED_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                    (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def released_decode(vocab: Vocabulary, ids: Iterable[int]) -> str:
    """Text of `ids` as the paper's released code decodes outputs and labels (`batch_decode(
    skip_special_tokens=True)` under transformers 4.22): the unknown piece and the extra ids dropped, not
    written as ⁇, and the tokenization spaces cleaned up (`RELEASED_CLEANUP`)."""
    text = vocab.decode([i for i in (int(x) for x in ids) if i != vocab.unk_id and i < vocab.base_vocab_size])
    for before, after in RELEASED_CLEANUP:
        text = text.replace(before, after)
    return text


def released_references(vocab: Vocabulary, targets: Sequence[str], length: int) -> list[str]:
    """Targets as the paper's released code scored them: its `compute_metrics` decodes the labels
    (run_t5.py: `tokenizer.batch_decode(labels)`), tokenized with truncation at its
    `val_max_target_length` (`length`, EOS counted), so what the vocabulary cannot write is lost (T5's has
    no µ, ~ or ×) and they are decoded as its outputs are (`released_decode`)."""
    return [released_decode(vocab, within_length(vocab.encode(t), length)) for t in targets]


def build_vocab(
    texts: Iterable[str],
    model_path: str | os.PathLike,
    *,
    vocab_size: int = 32000,
    model_type: str = "unigram",
    character_coverage: float = 0.9999,
    input_sentence_size: int = 2_000_000,
) -> storage.AnyPath:
    """Trains a SentencePiece model on `texts` with T5's special ids; writes `model_path` (+ .vocab).

    `vocab_size` is the number of pieces (extra ids are added by `Vocabulary`, not stored); with a
    small corpus it is an upper bound (SentencePiece keeps what the text supports). Past
    `input_sentence_size` sentences, only the first ones are used. `model_path` may be a URL
    (gs://): SentencePiece trains into a local temporary folder, and both files are uploaded.
    """
    target = os.fspath(model_path)
    if not target.endswith(".model"):
        raise ValueError(f"{target}: the SentencePiece model path must end in .model")
    sentences: Sequence[str] = [t for t in texts if t.strip()]
    if not sentences:
        raise ValueError("no text to train a vocabulary on")
    if not storage.is_url(target):
        # Trained beside the target, then moved into place (.vocab, then .model): a kill mid-write
        # leaves no .model that a rerun would take for a finished one.
        model = pathlib.Path(target)
        with storage.local_staging(model) as local:
            _train_sentencepiece(sentences, local / model.name, vocab_size, model_type, character_coverage,
                                 input_sentence_size)
            _record_prefix(local / model.name, model.with_suffix(""))
            for suffix in (".vocab", ".model"):
                os.replace(local / model.with_suffix(suffix).name, model.with_suffix(suffix))
        return model
    folder, _, name = target.rpartition("/")
    with storage.staged(folder) as local:
        local.mkdir(parents=True, exist_ok=True)
        _train_sentencepiece(sentences, local / name, vocab_size, model_type, character_coverage,
                             input_sentence_size)
    return storage.path(target)


# What a Hugging Face `tokenizers` file says beside a Unigram model for SentencePiece to mean the same:
# T5's normalization (a precompiled NFKC charsmap; runs of spaces folded, with leading and trailing ones
# dropped: SentencePiece's remove_extra_whitespaces) and its Metaspace pre-tokenizer ("▁" before every word).
_FOLD_SPACES = {"Regex": " {2,}"}
_EXTRA_ID = re.compile(r"<extra_id_(\d+)>")
_SPECIALS = {PAD_ID: "<pad>", EOS_ID: "</s>", UNK_ID: "<unk>"}


def from_tokenizer_json(json_path: str | os.PathLike, model_path: str | os.PathLike) -> tuple[storage.AnyPath, int]:
    """Writes the SentencePiece model that a Hugging Face `tokenizer.json` of a Unigram model describes;
    returns its path and how many extra ids the json held after its pieces.

    Many copies of T5's vocabulary (Hugging Face repositories, tools that embed it) carry only the
    `tokenizers` file, not `spiece.model`. Its pieces, scores, NFKC charsmap and whitespace handling are
    SentencePiece's own, so the rebuilt model encodes as the original does (its bytes differ: the
    original also records how it was trained). The trailing `<extra_id_N>` pieces are left out
    (`Vocabulary` adds extra ids on top). Anything without a SentencePiece equivalent is refused, naming
    the field. Written whole or not at all (`storage.write_atomic`).
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    src = storage.path(json_path)
    if not src.is_file():
        raise FileNotFoundError(f"tokenizer file {src} not found")
    try:
        spec = json.loads(src.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{src}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{src}: not JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{src}: not a tokenizer.json (a JSON object with a 'model')")
    pieces, extra_ids = _pieces_from_json(spec, src)

    proto = pb.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.UNIGRAM
    trainer.vocab_size = len(pieces)
    trainer.pad_id, trainer.eos_id, trainer.unk_id, trainer.bos_id = PAD_ID, EOS_ID, UNK_ID, -1
    trainer.pad_piece, trainer.eos_piece, trainer.unk_piece = _SPECIALS[PAD_ID], _SPECIALS[EOS_ID], _SPECIALS[UNK_ID]
    kinds = {PAD_ID: pb.ModelProto.SentencePiece.CONTROL, EOS_ID: pb.ModelProto.SentencePiece.CONTROL,
             UNK_ID: pb.ModelProto.SentencePiece.UNKNOWN}
    for i, (piece, score) in enumerate(pieces):
        proto.pieces.add(piece=piece, score=score, type=kinds.get(i, pb.ModelProto.SentencePiece.NORMAL))
    _normalizer_from_json(spec, proto.normalizer_spec, src)

    target = os.fspath(model_path)
    if not target.endswith(".model"):
        raise ValueError(f"{target}: the SentencePiece model path must end in .model")
    storage.write_atomic(target, proto.SerializeToString())
    return storage.path(target), extra_ids


def _pieces_from_json(spec: dict, src) -> tuple[list[tuple[str, float]], int]:
    """(piece, score) of a tokenizer.json's Unigram model, its extra ids left out, and their count."""
    model = spec.get("model")
    if not isinstance(model, dict) or model.get("type") != "Unigram":
        got = model.get("type") if isinstance(model, dict) else model
        raise ValueError(f"{src}: model.type is {got!r}; only a Unigram model (SentencePiece's, as T5's) converts")
    entries = model.get("vocab")
    if not isinstance(entries, list):
        raise ValueError(f"{src}: model.vocab is missing or not a list")
    pieces, seen = [], {}
    for i, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool)):
            raise ValueError(f"{src}: model.vocab[{i}] is {json.dumps(entry)[:80]}; expected [piece, score]")
        if entry[0] in seen:
            raise ValueError(f"{src}: model.vocab[{i}] repeats model.vocab[{seen[entry[0]]}] ({entry[0]!r})")
        seen[entry[0]] = i
        pieces.append((entry[0], float(entry[1])))
    first_extra = len(pieces)
    while first_extra and _EXTRA_ID.fullmatch(pieces[first_extra - 1][0]):
        first_extra -= 1
    extra = len(pieces) - first_extra
    for i, (piece, _) in enumerate(pieces):   # seqio's order: <extra_id_0> is the last id
        want = f"<extra_id_{len(pieces) - 1 - i}>" if i >= first_extra else None
        if (i >= first_extra and piece != want) or (i < first_extra and _EXTRA_ID.fullmatch(piece)):
            raise ValueError(f"{src}: model.vocab[{i}] is {piece!r}; extra ids must be the last ids, from "
                             f"<extra_id_{extra - 1 if extra else 'N'}> down to <extra_id_0>")
    pieces = pieces[:first_extra]
    for i, name in _SPECIALS.items():
        if len(pieces) <= i or pieces[i][0] != name:
            got = pieces[i][0] if len(pieces) > i else "nothing"
            raise ValueError(f"{src}: model.vocab[{i}] is {got!r}; T5's ids need {name!r} there")
    if model.get("unk_id") != UNK_ID:
        raise ValueError(f"{src}: model.unk_id is {model.get('unk_id')!r}; T5's is {UNK_ID}")
    if model.get("byte_fallback"):
        raise ValueError(f"{src}: model.byte_fallback is set; T5's vocabulary has no byte pieces")
    for j, token in enumerate(spec.get("added_tokens") or ()):
        where = f"{src}: added_tokens[{j}]"
        if not isinstance(token, dict) or not isinstance(token.get("id"), int):
            raise ValueError(f"{where} is {json.dumps(token)[:80]}; expected an object with an integer id")
        i, content = token["id"], token.get("content")
        if not 0 <= i < len(entries) or entries[i][0] != content:
            raise ValueError(f"{where} is {content!r} at id {i}, which model.vocab does not hold there")
        if i < first_extra and i not in _SPECIALS:
            raise ValueError(f"{where} makes {content!r} (id {i}) a special token; only {', '.join(_SPECIALS.values())} "
                             "and extra ids are, in T5's SentencePiece model")
    return pieces, extra


def _normalizer_from_json(spec: dict, normalizer, src) -> None:
    """Fills a SentencePiece NormalizerSpec from a tokenizer.json's normalizer and pre_tokenizer."""
    node = spec.get("normalizer")
    sequence = isinstance(node, dict) and node.get("type") == "Sequence"
    steps = [] if node is None else node.get("normalizers") if sequence else [node]
    if not isinstance(steps, list):
        raise ValueError(f"{src}: normalizer.normalizers is not a list")
    charsmap, folds, strips = None, False, False
    for j, step in enumerate(steps):
        where = f"{src}: normalizer" + (f".normalizers[{j}]" if sequence else "")
        kind = step.get("type") if isinstance(step, dict) else None
        if kind == "Precompiled" and charsmap is None:
            try:
                charsmap = base64.b64decode(step["precompiled_charsmap"], validate=True)
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{where}.precompiled_charsmap is missing or not base64") from None
        elif kind == "Replace" and step.get("pattern") == _FOLD_SPACES and step.get("content") in (" ", "▁"):
            folds = True
        elif kind == "Strip":
            strips = True
        else:
            raise ValueError(f"{where} is {json.dumps(step)[:100]}: no SentencePiece equivalent (T5's: a "
                             "Precompiled charsmap, runs of spaces folded, ends stripped)")
    if strips and not folds:
        raise ValueError(f"{src}: normalizer strips spaces without folding runs of them; SentencePiece does both "
                         "or neither")
    normalizer.name = "nmt_nfkc" if charsmap is not None else "identity"
    if charsmap is not None:
        normalizer.precompiled_charsmap = charsmap
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = folds
    normalizer.escape_whitespaces = True
    pre = spec.get("pre_tokenizer")
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    meta = steps[0] if isinstance(steps, list) and len(steps) == 1 and isinstance(steps[0], dict) else {}
    prefixed = meta.get("add_prefix_space", meta.get("prepend_scheme") in ("always", "first"))
    if meta.get("type") != "Metaspace" or meta.get("replacement") != "▁" or not prefixed:
        raise ValueError(f"{src}: pre_tokenizer is {json.dumps(pre)[:120]}; T5's is Metaspace '▁' alone, with a "
                         "space before the first word")


def _record_prefix(model_path: pathlib.Path, prefix: pathlib.Path) -> None:
    """The model records the prefix it was trained under: the final one, not the staging folder's
    (so a model built here has the bytes of one trained in place, whichever process built it)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    proto.trainer_spec.model_prefix = str(prefix)
    model_path.write_bytes(proto.SerializeToString())


def _train_sentencepiece(sentences: Sequence[str], model_path: pathlib.Path, vocab_size: int, model_type: str,
                         character_coverage: float, input_sentence_size: int) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(sentences),
        model_prefix=str(model_path.with_suffix("")),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        hard_vocab_limit=False,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=False,  # with single-threaded training: the same text, the same model
        num_threads=1,
        minloglevel=2,
    )


def task_texts(task_names: Iterable[str], data_dir: str | os.PathLike | None = None) -> list[str]:
    """Training text of tasks for `build_vocab`: every prefixed source and every target in their files."""
    texts = []
    for name in task_names:
        card = cards.load_card(name)
        for key in card.files:
            loaded = jsonl.load_examples(card.file_path(key, data_dir), require_target=False,
                                         empty_targets="keep")
            for ex in loaded.examples:
                texts.append(card.input_prefix + ex["source"])
                texts.append(ex["target"])
    return texts
