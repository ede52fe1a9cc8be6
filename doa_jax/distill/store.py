"""The teacher store: a teacher's outputs on unlabeled inputs, computed once and reused.

Per example it keeps the output tokens and text, the sequence log-probability, and the teacher's
top-k logits at each output position (soft targets for distillation without a teacher forward per
student step). Outputs are written in chunks; a chunk is done when its `.COMPLETED` marker exists,
so a run killed part-way resumes by skipping finished chunks. The marker holds the SHA-256 of the
chunk's `.npz` and `.jsonl` files. They are checked as a build reuses a chunk, where a chunk truncated or
altered on disk is recomputed (with a warning naming the file), and as `load` reads it, where it raises
`StoreIncomplete` naming the file (a caller that reuses a complete store on its markers alone, reading
it once, builds again to recompute the chunk: `build_store(check="shard")`). The marker also holds
the seconds computing the chunk took and the chips it held, so the chunks a killed attempt finished
are still counted in what the store cost when a later attempt completes it. The store's directory is named by a
key hashed from the teacher, the inputs and the decoding settings, so any later run with the same
key reuses it with no teacher compute.

Only safe formats: `.npz` read with `allow_pickle=False`, and JSON lines.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import time
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from doa_jax import storage
from doa_jax.data import jsonl
from doa_jax.data.encode import encode_texts
from doa_jax.distill import outputs as teacher_outputs
from doa_jax.model import Transformer

FORMAT_VERSION = 1
CHUNK_FILES = (".npz", ".jsonl")   # the files of a chunk, checksummed in its `.COMPLETED` marker
ARRAYS = ("tokens", "lengths", "sequence_logprob", "topk_values", "topk_ids")

# predict_fn(encoder_input_tokens [n, S]) -> dict with the ARRAYS for those n rows:
#   tokens [n, T] int32 (no start token, 0 after EOS), lengths [n] (EOS included),
#   sequence_logprob [n], topk_values [n, T, k] float32 logits, topk_ids [n, T, k] int32.
PredictFn = Callable[[np.ndarray], Mapping[str, np.ndarray]]


def fingerprint_params(params: Any) -> str:
    """A cheap, content-based digest of a parameter tree: every leaf's path, shape, dtype and a
    strided sample of its values (hashing all of an 11B model would take minutes)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{arr.shape}:{arr.dtype}".encode())
        flat = arr.reshape(-1)
        h.update(np.ascontiguousarray(flat[:: max(1, flat.size // 4096)]).tobytes())
    return h.hexdigest()[:16]


def store_key(teacher: str, inputs: Sequence[str], settings: Mapping[str, Any]) -> str:
    """Key of a store: hash of the teacher fingerprint, the exact inputs and decoding settings."""
    h = hashlib.sha256()
    h.update(json.dumps({"teacher": teacher, "settings": dict(settings), "format": FORMAT_VERSION},
                        sort_keys=True).encode())
    for text in inputs:
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()[:20]


@dataclasses.dataclass
class TeacherOutputs:
    """All stored outputs, in input order."""

    sources: list[str]
    predictions: list[str]
    tokens: np.ndarray
    lengths: np.ndarray
    sequence_logprob: np.ndarray
    topk_values: np.ndarray
    topk_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.sources)


@dataclasses.dataclass
class BuildStats:
    """What building this host's share of a store did (in one pass, or in an attempt's passes together:
    `then`): the chunks it computed, and those it found done with what computing them took (chip-seconds,
    from their markers; None where an older version's marker does not say)."""

    path: pathlib.Path
    computed: tuple[int, ...] = ()
    reused: Mapping[int, Optional[float]] = dataclasses.field(default_factory=dict)
    lost: Mapping[int, Optional[float]] = dataclasses.field(default_factory=dict)   # `then`: first computations
    #                                                                                  of chunks computed again

    @property
    def computed_chunks(self) -> int:
        return len(self.computed)

    @property
    def reused_chunks(self) -> int:
        return len(self.reused)

    @property
    def reused_chip_seconds(self) -> float:
        """What the reused chunks took when an earlier attempt computed them."""
        return float(sum(c for c in self.reused.values() if c is not None))

    @property
    def unmeasured_chunks(self) -> int:
        """Reused chunks whose markers (an older version's) hold no seconds."""
        return sum(c is None for c in self.reused.values())

    @property
    def lost_chip_seconds(self) -> float:
        """What the lost first computations took, as far as their markers say."""
        return float(sum(c for c in self.lost.values() if c is not None))

    def then(self, later: "BuildStats") -> "BuildStats":
        """This pass and a `later` one of the same attempt, together: every chunk either computed, once; the
        chunks `later` reused that this pass did not compute (those are the attempt's own, timed by its clock,
        not earlier attempts' work). A chunk this pass reused that `later` recomputed (it was not whole) counts
        as computed, its first computation `lost`."""
        computed = tuple(dict.fromkeys(self.computed + later.computed))
        lost = {**self.lost, **{i: c for i, c in self.reused.items() if i in later.computed}}
        return BuildStats(later.path, computed, {i: c for i, c in later.reused.items() if i not in computed}, lost)


class StoreIncomplete(FileNotFoundError):
    """A store that cannot be read whole. `missing`: a chunk's marker (or the manifest) was never written,
    which a rebuild of this host's share cannot mend when other hosts own it; else a chunk whose marker is
    there is not whole (a file missing, truncated or altered on disk, or a marker without checksums), which
    a rebuild by the chunk's host recomputes."""

    def __init__(self, message: str, missing: bool):
        super().__init__(message)
        self.missing = missing


class TeacherStore:
    """Chunked outputs of one teacher over one list of inputs under one decoding setting."""

    def __init__(self, root: str | os.PathLike, key: str):
        self.key = key
        self.dir = storage.path(root) / key   # a local folder or a URL (gs://)

    def _chunk(self, i: int, suffix: str) -> pathlib.Path:
        return self.dir / f"chunk_{i:05d}{suffix}"

    @property
    def manifest_path(self) -> pathlib.Path:
        return self.dir / "manifest.json"

    def chunk_problem(self, i: int) -> Optional[str]:
        """None when chunk `i` is complete and its files match the checksums in its marker, else why
        not (naming the file); "" when the chunk was simply never finished."""
        return self._read_chunk(i)[2]

    def _read_chunk(self, i: int) -> tuple[Optional[dict[str, bytes]], Optional[dict], Optional[str]]:
        """(chunk `i`'s files' bytes, its marker, None) when it is complete and the files match the marker's
        checksums, else (None, None, why not; "" when never finished): each file read once, checked and parsed
        from the same bytes."""
        marker = self._chunk(i, ".COMPLETED")
        if not marker.exists():
            return None, None, ""
        sums = _parse_marker(marker.read_bytes())
        if sums is None:
            return None, None, f"{marker} holds no checksums (written by an older version, or torn)"
        data = {}
        for suffix in CHUNK_FILES:
            path = self._chunk(i, suffix)
            if not path.exists():
                return None, None, f"{path} is missing"
            data[suffix] = path.read_bytes()
            if _sha256(data[suffix]) != sums[suffix]:
                return None, None, f"{path} does not match its checksum (truncated or altered on disk)"
        return data, sums, None

    def verified_markers(self) -> Optional[list[dict]]:
        """Every chunk's marker, when the manifest and every chunk are there and every chunk passes its
        checksum; else None."""
        if not self.manifest_path.exists():
            return None
        markers = []
        for i in range(json.loads(self.manifest_path.read_text())["num_chunks"]):
            _, marker, problem = self._read_chunk(i)
            if problem is not None:
                return None
            markers.append(marker)
        return markers

    def shard_markers(self, shard: tuple[int, int] = (0, 1)) -> Optional[dict[int, dict]]:
        """The markers of `shard`'s chunks (`build`'s `shard`), by chunk, when the manifest and every chunk's
        marker are there, else None (None too when one of those markers is torn or holds no checksums: `build`
        recomputes that chunk). The chunks' files are not read: `load` checks them as it reads them, so a
        complete store is read once."""
        num_chunks = self._markers_present()
        if num_chunks is None:
            return None
        markers = {}
        for i in range(shard[0], num_chunks, shard[1]):
            marker = _parse_marker(self._chunk(i, ".COMPLETED").read_bytes())
            if marker is None:
                return None
            markers[i] = marker
        return markers

    def is_complete(self) -> bool:
        """True when the manifest and every chunk are there and every chunk passes its checksum."""
        return self.verified_markers() is not None

    def _markers_present(self) -> Optional[int]:
        """The number of chunks when the manifest and every chunk's marker exist (nothing read but the
        manifest), else None."""
        if not self.manifest_path.exists():
            return None
        num_chunks = json.loads(self.manifest_path.read_text())["num_chunks"]
        return num_chunks if all(self._chunk(i, ".COMPLETED").exists() for i in range(num_chunks)) else None

    def build(self, sources: Sequence[str], encoder_input_tokens: np.ndarray, predict_fn: PredictFn,
              detokenize: Callable[[np.ndarray], str], *, chunk_size: int = 256,
              settings: Optional[Mapping[str, Any]] = None,
              on_chunk: Optional[Callable[[int, int, int], None]] = None,
              shard: tuple[int, int] = (0, 1), chips: Optional[float] = None) -> BuildStats:
        """Computes every chunk not yet completed; with `shard=(i, n)` only the chunks c with c % n == i
        (one host's share when n hosts build one store; the others' chunks count as neither computed
        nor reused). `on_chunk(done, total, examples)` reports progress. Each chunk's marker records its
        seconds and `chips`, what this host holds in the unit its cost is counted in (default: its
        devices)."""
        if len(sources) != len(encoder_input_tokens):
            raise ValueError(f"{len(sources)} sources but {len(encoder_input_tokens)} token rows")
        if len(sources) == 0:
            raise ValueError("the unlabeled pool is empty: no inputs for the teacher")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not 0 <= shard[0] < shard[1]:
            raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
        num_chunks = -(-len(sources) // chunk_size)
        storage.makedirs(self.dir)
        manifest = {"key": self.key, "format_version": FORMAT_VERSION, "num_examples": len(sources),
                    "chunk_size": chunk_size, "num_chunks": num_chunks, "settings": dict(settings or {})}
        if self.manifest_path.exists():
            old = json.loads(self.manifest_path.read_text())
            if (old["num_examples"], old["chunk_size"]) != (len(sources), chunk_size):
                raise ValueError(f"{self.manifest_path}: store holds {old['num_examples']} examples in chunks "
                                 f"of {old['chunk_size']}, not {len(sources)} in chunks of {chunk_size}")
        elif shard[0] == 0:   # one writer (the first host); the others' chunks do not need it
            _atomic_write(self.manifest_path, json.dumps(manifest, indent=1).encode())
        computed, reused = [], {}
        for i in range(shard[0], num_chunks, shard[1]):
            _, marker, problem = self._read_chunk(i)
            if problem is None:
                reused[i] = marker_cost(marker)
                continue
            if problem:
                warnings.warn(f"teacher store: {problem}; recomputing chunk {i}", RuntimeWarning, stacklevel=2)
                self._chunk(i, ".COMPLETED").unlink(missing_ok=True)
            started = time.perf_counter()
            lo, hi = i * chunk_size, min(len(sources), (i + 1) * chunk_size)
            predicted = predict_fn(encoder_input_tokens[lo:hi])
            out = {name: np.asarray(predicted[name]) for name in ARRAYS}
            _check_chunk(out, hi - lo)
            lines = [json.dumps({"index": lo + j, "source": sources[lo + j],
                                 "prediction": detokenize(out["tokens"][j])}) for j in range(hi - lo)]
            data = {".npz": _npz_bytes(out), ".jsonl": ("\n".join(lines) + "\n").encode()}
            for suffix, buf in data.items():
                _atomic_write(self._chunk(i, suffix), buf)
            marker = {**{k: _sha256(v) for k, v in data.items()},
                      "seconds": round(time.perf_counter() - started, 3),
                      "chips": jax.local_device_count() if chips is None else chips}
            _atomic_write(self._chunk(i, ".COMPLETED"), json.dumps(marker).encode())
            computed.append(i)
            if on_chunk:
                on_chunk(i + 1, num_chunks, hi - lo)
        return BuildStats(self.dir, tuple(computed), reused)

    def load(self) -> TeacherOutputs:
        """All outputs; each chunk is checked against its checksums as it is read (`StoreIncomplete`
        names the first chunk that is missing or fails them)."""
        if not self.manifest_path.exists():
            raise StoreIncomplete(f"teacher store {self.dir} is missing or incomplete", missing=True)
        manifest = json.loads(self.manifest_path.read_text())
        arrays: dict[str, list[np.ndarray]] = {name: [] for name in ARRAYS}
        sources, predictions = [], []
        for i in range(manifest["num_chunks"]):
            files, _, problem = self._read_chunk(i)
            if problem is not None:
                raise StoreIncomplete(f"teacher store {self.dir} is incomplete: "
                                      f"{problem or f'chunk {i} was never finished'}; build it again",
                                      missing=not problem)
            with np.load(io.BytesIO(files[".npz"]), allow_pickle=False) as data:
                for name in ARRAYS:
                    arrays[name].append(data[name])
            for line in files[".jsonl"].decode("utf-8").splitlines():
                row = json.loads(line)
                sources.append(row["source"])
                predictions.append(row["prediction"])
        width = max(a.shape[1] for a in arrays["tokens"])
        padded = {name: np.concatenate([_pad_time(a, width) for a in arrays[name]]) if name in
                  ("tokens", "topk_values", "topk_ids") else np.concatenate(arrays[name]) for name in ARRAYS}
        return TeacherOutputs(sources, predictions, **padded)


@dataclasses.dataclass(frozen=True)
class StoreRequest:
    """What a store holds: a teacher (module, params and their fingerprint) over inputs, decoded so."""

    teacher: str            # fingerprint of the teacher's weights (or of its fine-tuning recipe)
    sources: Sequence[str]  # raw inputs; `prefix` is added when encoding
    prefix: str
    inputs_length: int
    max_decode_len: int
    num_beams: int = 1
    topk: int = 8
    extra_settings: Optional[Mapping[str, Any]] = None  # anything else that changes the outputs

    def settings(self) -> dict[str, Any]:
        return {"max_decode_len": self.max_decode_len, "num_beams": self.num_beams, "topk": self.topk,
                "inputs_length": self.inputs_length, "prefix": self.prefix, **dict(self.extra_settings or {})}


CHECKS = ("all", "markers", "shard")   # build_store(check=): how a store that looks complete is taken


def build_store(root: str | os.PathLike, request: StoreRequest, vocab, module: Transformer, params: Any, *,
                batch_size: int = 64, chunk_size: int = 256,
                on_chunk: Optional[Callable[[int, int, int], None]] = None,
                shard: tuple[int, int] = (0, 1), chips: Optional[float] = None, check: str = "all",
                ) -> tuple[TeacherStore, np.ndarray, BuildStats]:
    """The store for `request` under `root`: built (or finished) now, reused when already complete;
    `shard=(i, n)`: only this host's share of its chunks (`TeacherStore.build`). `check` says how a store
    that looks complete (every chunk's marker there) is taken: "all", once every chunk's files pass their
    checksums (`doa predict`); "markers", on this host's share's markers alone, for a caller that `load`s
    it next, which checks each file as it reads it; "shard", never taken as complete: this host's chunks
    are each checked and any that fails is recomputed, what such a caller does when its `load` found one.

    Returns the store, the encoded inputs and what was computed; `doa predict` and the experiment
    cell both come through here, so one key means the same outputs whoever wrote them.
    """
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    settings = request.settings()
    store = TeacherStore(root, store_key(request.teacher, request.sources, settings))
    enc = encode_texts(vocab, list(request.sources), request.inputs_length, request.prefix)
    mine = None
    if check == "all":
        markers = store.verified_markers()
        if markers is not None:
            mine = {i: markers[i] for i in range(shard[0], len(markers), shard[1])}
    elif check == "markers":
        mine = store.shard_markers(shard)
    if mine is not None:   # complete: this host's share of the chunks, as `build` would count them
        return store, enc, BuildStats(store.dir, (), {i: marker_cost(m) for i, m in mine.items()})
    predict = teacher_outputs.make_predict_fn(module, params, request.max_decode_len, num_beams=request.num_beams,
                                              topk=request.topk, batch_size=batch_size)
    stats = store.build(list(request.sources), enc, predict, vocab.decode, chunk_size=chunk_size, settings=settings,
                        on_chunk=on_chunk, shard=shard, chips=chips)
    return store, enc, stats


def marker_cost(marker: Mapping[str, Any]) -> Optional[float]:
    """The chip-seconds a chunk took, from its marker: its seconds x the chips its host counted
    (`TeacherStore.build(chips=)`); None where the marker (an older version's) does not say."""
    if all(isinstance(marker.get(k), (int, float)) for k in ("seconds", "chips")):
        return float(marker["seconds"]) * float(marker["chips"])
    return None


def _parse_marker(data: bytes) -> Optional[dict]:
    """A chunk's marker, or None when it is torn or holds no checksums (an older version's)."""
    try:
        marker = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(marker, dict) or not all(isinstance(marker.get(s), str) for s in CHUNK_FILES):
        return None
    return marker


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pad_time(a: np.ndarray, width: int) -> np.ndarray:
    pad = [(0, 0)] * a.ndim
    pad[1] = (0, width - a.shape[1])
    return np.pad(a, pad)


def _check_chunk(out: Mapping[str, np.ndarray], n: int) -> None:
    for name in ARRAYS:
        if out[name].shape[0] != n:
            raise ValueError(f"predict_fn returned {out[name].shape[0]} rows of {name!r} for {n} inputs")
    t = out["tokens"].shape[1]
    for name in ("topk_values", "topk_ids"):
        if out[name].ndim != 3 or out[name].shape[1] != t:
            raise ValueError(f"predict_fn's {name!r} must be [n, {t}, k], got {out[name].shape}")


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _atomic_write(path: storage.AnyPath, data: bytes) -> None:
    storage.write_atomic(path, data)


def read_t5x_infer_jsonl(path: str | os.PathLike, prefix: Optional[str] = None) -> list[dict[str, Any]]:
    """Pseudo-labels from T5X `infer` output (`predict` or `predict_with_aux` mode).

    Returns rows {"source", "prediction"} plus "tokens" and "score" when the file has them. With
    `prefix` (the task card's input prefix, which the SeqIO task put before each input), "source"
    is the raw input with it removed; an input without it is an error naming the line.
    """
    path = storage.path(path)
    if not path.exists():
        raise FileNotFoundError(f"T5X infer output {path} not found")
    rows = []
    for lineno, line in jsonl.text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            inputs = obj["inputs"]
            source = inputs.get("inputs_pretokenized", inputs.get("inputs"))
            row = {"source": source, "prediction": obj["prediction"]}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}:{lineno}: not a T5X infer line "
                             f"(need inputs.inputs_pretokenized and prediction): {e}") from None
        if source is None:
            raise ValueError(f"{path}:{lineno}: inputs has no 'inputs_pretokenized' field")
        if prefix is not None:
            if not source.startswith(prefix):
                raise ValueError(f"{path}:{lineno}: input {source[:40]!r} does not start with the task's "
                                 f"prefix {prefix!r}: T5X output of a different task?")
            row["source"] = source[len(prefix):]
        if "prediction_tokens" in obj:
            row["tokens"] = list(obj["prediction_tokens"])
        if isinstance(obj.get("aux"), dict) and "scores" in obj["aux"]:
            row["score"] = float(obj["aux"]["scores"])
        rows.append(row)
    return rows
