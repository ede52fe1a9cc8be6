"""Vocabularies: T5's SentencePiece model from a path, or one trained offline on task text.

T5's ids: pad 0, eos 1, unk 2, no bos, then the model's pieces, then 100 extra ids
(`<extra_id_0>` is the last id), as seqio's `SentencePieceVocabulary(path, extra_ids=100)` numbers
them. `build_vocab` trains a SentencePiece model with those special ids, for machines without
T5's `spiece.model`. A vocabulary's `spec()` (path, sha256, extra ids, size) goes into a run's
config; `check_vocab` refuses a model whose vocab_size does not fit it.

Uses the `sentencepiece` package only (no TensorFlow); `seqio_tasks.seqio_vocabulary` makes the
equivalent seqio object.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
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
