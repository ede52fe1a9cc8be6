"""Reading the paper's text-to-text files: one JSON object a line, `{"source": str, "target": str}`.

Every problem is reported with the file and line number. A bad line (not JSON, not an object, no
string `source`, no string `target` where one is required) is an error, or, with `skip_bad=True`,
skipped and counted in `Loaded.skipped`. Empty targets follow a policy: "error", "skip" (counted), or
"keep" (an unlabeled file's targets are ignored). Blank lines are ignored. Imports no TensorFlow.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Iterable, Iterator

from doa_jax import storage


@dataclasses.dataclass
class Loaded:
    """Examples read from one file, and the lines that were skipped as (line number, reason)."""

    path: pathlib.Path
    examples: list[dict[str, str]]
    skipped: list[tuple[int, str]]


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file (a leading BOM dropped); bytes that are not UTF-8
    raise one ValueError naming the file, line and column, instead of a bare codec error."""
    path = storage.path(path)     # a local file or a URL (gs://)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise FileNotFoundError(f"{path}: is a folder, expected a text file")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1}); save the file as UTF-8") from None


def parse_lines(lines: Iterable[str], where: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSON-lines text; a line that is not
    JSON raises one ValueError naming `where` and the line (results, ledgers, pilots files)."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}:{lineno}: not JSON ({e.msg})") from None


def iter_objects(path: str | os.PathLike) -> Iterator[tuple[int, Any | ValueError]]:
    """(line number, parsed object) for each non-blank line; a line that is not JSON gives a ValueError."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})")


def load_examples(
    path: str | os.PathLike,
    *,
    require_target: bool = True,
    empty_targets: str = "error",
    skip_bad: bool = False,
    allow_empty: bool = False,
) -> Loaded:
    """Reads a {"source","target"} JSON-lines file.

    require_target=False reads an unlabeled file: `target` may be absent (it becomes "").
    empty_targets: "error" | "skip" | "keep" for a target that is "" or only spaces.
    skip_bad=True skips malformed lines (counted in `.skipped`) instead of raising.
    A file with no examples at all (empty, or every line skipped) is an error unless `allow_empty`:
    an empty train file would otherwise give a run that trains on nothing.
    """
    path = storage.path(path)
    examples: list[dict[str, str]] = []
    skipped: list[tuple[int, str]] = []

    def bad(lineno: int, reason: str, *, always_skip: bool = False):
        if skip_bad or always_skip:
            skipped.append((lineno, reason))
        else:
            raise ValueError(f"{path}:{lineno}: {reason}")

    for lineno, obj in iter_objects(path):
        if isinstance(obj, ValueError):
            if not skip_bad:
                raise obj
            skipped.append((lineno, str(obj).split(": ", 1)[1]))
            continue
        if not isinstance(obj, dict):
            bad(lineno, f"expected a JSON object, got {type(obj).__name__}")
            continue
        source = obj.get("source")
        if not isinstance(source, str):
            bad(lineno, "missing 'source'" if source is None else "'source' is not a string")
            continue
        target = obj.get("target")
        if target is None and not require_target:
            target = ""
        if not isinstance(target, str):
            bad(lineno, "missing 'target'" if target is None else "'target' is not a string")
            continue
        if require_target and not target.strip():
            if empty_targets == "error":
                bad(lineno, "empty 'target' (the card's empty_targets policy is 'error')")
                continue
            if empty_targets == "skip":
                bad(lineno, "empty 'target'", always_skip=True)
                continue
        example = {"source": source, "target": target}
        if isinstance(obj.get("raw_target"), str):   # a paper cell's predictions.jsonl: the data's own target
            example["raw_target"] = obj["raw_target"]
        examples.append(example)
    if not examples and not allow_empty:
        raise ValueError(f"{path}: no examples" + (f" ({len(skipped)} line(s) skipped)" if skipped
                                                   else " (the file is empty)"))
    return Loaded(path=path, examples=examples, skipped=skipped)


def load_predictions(path: str | os.PathLike, key: str = "prediction") -> list[str]:
    """The `prediction` strings of a JSON-lines file (e.g. `doa infer` or T5X infer output), in order."""
    out = []
    for lineno, obj in iter_objects(path):
        if isinstance(obj, ValueError):
            raise obj
        if not isinstance(obj, dict) or key not in obj:
            raise ValueError(f"{path}:{lineno}: missing {key!r}")
        value = obj[key]
        if not isinstance(value, str):
            raise ValueError(f"{path}:{lineno}: {key!r} is not a string")
        out.append(value)
    return out


def write_examples(path: str | os.PathLike, examples) -> None:
    """Writes {"source","target"} dicts as JSON lines."""
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"source": ex["source"], "target": ex["target"]}, ensure_ascii=False) + "\n")
