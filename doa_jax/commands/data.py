"""`doa data download TASK` and `doa data stats TASK`: fetch the paper's files; describe a task's data.

The download folder (`--data-dir`, `$DOA_DATA_DIR`) may be a URL (gs://bucket/data): each file is
downloaded to a local temporary file, checked, then uploaded in one put.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # annotations only; commands import their modules when run (a fast `doa --help`)
    from doa_jax import storage


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="download a task's files; show its data statistics")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    dl = sub.add_parser("download", help="download the paper's files of a task (or all)")
    dl.add_argument("task", help="task card name (see tasks/), or 'all'")
    dl.add_argument("--data-dir", help="folder for the task's files (default: $DOA_DATA_DIR/<task> "
                    "or ~/.cache/doa_jax/data/<task>)")
    dl.add_argument("--force", action="store_true", help="download again even if the file is there")
    dl.set_defaults(func=run_download)

    st = sub.add_parser("stats", help="sizes, label counts, length percentiles, truncation at the card's lengths, "
                        "and a perfect model's test score in the vocabulary at those lengths")
    st.add_argument("task", help="task card name (see tasks/), or 'all'")
    st.add_argument("--vocab", default=os.environ.get("DOA_VOCAB"),
                    help="SentencePiece model (T5's spiece.model, or one from `doa vocab build`); "
                    "default $DOA_VOCAB")
    st.add_argument("--extra-ids", type=int, default=100, help="extra ids on top of the model (T5: 100)")
    st.add_argument("--data-dir", help="the task's data folder (default: the card's)")
    st.add_argument("--seed", type=int, help="pool seed (default: the card's)")
    st.add_argument("--json", action="store_true", help="print one JSON object per task")
    st.set_defaults(func=run_stats)


def _task_names(task: str) -> list[str]:
    from doa_jax.data import cards

    return cards.card_names() if task == "all" else [task]


def download_dir(card, data_dir=None) -> storage.AnyPath:
    from doa_jax import storage
    from doa_jax.data import cards

    if data_dir:
        return storage.path(data_dir)
    root = os.environ.get("DOA_DATA_DIR")
    return (storage.path(root) if root else cards.CACHE_DATA) / card.subdir


def confined(folder: storage.AnyPath, name: str, where: str) -> storage.AnyPath:
    """`folder / name`, refused (ValueError naming `where`) when it resolves outside `folder`."""
    from doa_jax import storage

    if storage.is_url(folder):      # no links on an object store: the name alone decides
        if name.startswith("/") or ".." in pathlib.PurePosixPath(name).parts:
            raise ValueError(f"{where} = {name!r} points outside the data folder {folder}")
        return folder / name
    dest = (folder / name).resolve()
    if not dest.is_relative_to(folder.resolve()):
        raise ValueError(f"{where} = {name!r} points outside the data folder {folder}")
    return folder / name


def run_download(args) -> int:
    import urllib.error
    import urllib.request

    from doa_jax import storage
    from doa_jax.data import cards, jsonl

    for name in _task_names(args.task):
        card = cards.load_card(name)
        folder = download_dir(card, args.data_dir if args.task != "all" else None)
        storage.check_writable(folder, "data folder")     # a bad bucket fails before any download
        storage.makedirs(folder)
        for key, filename in card.files.items():
            if key not in card.urls:
                raise ValueError(f"{card.path}: [data.urls] has no URL for {key!r}")
            url = card.urls[key]
            if not url.lower().startswith("https://"):
                raise ValueError(f"{card.path}: [data.urls] {key} = {url!r}: only https:// URLs are downloaded")
            dest = confined(folder, filename, f"{card.path}: [data.files] {key}")
            if dest.exists() and not args.force:
                print(f"{card.name}: {dest} is there (use --force to download again)")
                continue
            remote = storage.is_url(dest)     # then the file is checked locally, then put whole
            with tempfile.TemporaryDirectory(prefix="doa-download-") if remote else contextlib.nullcontext() as tmp:
                part = pathlib.Path(tmp) / dest.name if remote else dest.with_name(dest.name + ".part")
                try:
                    with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
                        while chunk := r.read(1 << 20):
                            f.write(chunk)
                except (urllib.error.URLError, OSError) as e:
                    part.unlink(missing_ok=True)
                    raise ValueError(f"{card.name}: could not download {url} ({e})") from None
                loaded = jsonl.load_examples(part, require_target=False, empty_targets="keep")
                storage.upload(part, dest) if remote else part.replace(dest)
            print(f"{card.name}: {dest} ({len(loaded.examples)} examples)")
    return 0


def _skipped(key: str, count: int, why: dict[str, int] | None) -> str:
    """`train 12 (empty 'target' 12)`: how many lines of a file were skipped, and why."""
    return f"{key} {count}" + (f" ({', '.join(f'{r} {n}' for r, n in why.items())})" if why else "")


def _format(stats: dict) -> str:
    p = stats["length_percentiles"]
    cols = list(p["inputs"])
    lines = [
        f"task {stats['task']} (vocabulary {stats['vocabulary']['path']}, {stats['vocabulary']['vocab_size']} ids)",
        "sizes: " + ", ".join(f"{k} {v}" for k, v in stats["sizes"].items())
        + "; lines skipped: " + (", ".join(_skipped(k, v, stats.get("skipped_why", {}).get(k))
                                           for k, v in stats["skipped_lines"].items() if v) or "none"),
    ]
    for split, counts in stats["label_counts"].items():
        if counts:
            lines.append(f"labels ({split}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    lines.append("token lengths (with EOS)  " + "  ".join(f"{'max' if c == '100' else 'p' + c:>6}" for c in cols))
    for feat in ("inputs", "targets"):
        lines.append(f"  {feat:<22} " + "  ".join(f"{p[feat][c]:>6}" for c in cols))
    fl, tr = stats["feature_lengths"], stats["truncation_rate"]
    lines.append(
        f"truncation at inputs={fl['inputs']}, targets={fl['targets']}: inputs {tr['inputs']:.2%}, "
        f"targets {tr['targets']:.2%}, either {tr['either']:.2%}"
    )
    c = stats.get("ceiling")
    if c and "skipped" in c:
        lines.append(f"a perfect model's test {c['metric']}: not computed ({c['skipped']})")
    elif c:
        lost = ", ".join(f"{ch} {n}" for ch, n in c["lost_characters"].items())
        lines.append(f"a perfect model's test {c['metric']} in this vocabulary: {c['whole']:.2f} "
                     f"({c['unwritable_targets']} of {c['examples']} targets it cannot write"
                     + (f": {lost}" if lost else "") + f"; {c['normalised_targets']} it normalises"
                     + f"); cut at targets={fl['targets']}: {c['at_targets_length']:.2f}")
    return "\n".join(lines)


def run_stats(args) -> int:
    from doa_jax.data import stats, vocab

    if not args.vocab:
        raise ValueError("needs --vocab PATH (T5's spiece.model, or a model from `doa vocab build`)")
    v = vocab.Vocabulary(args.vocab, extra_ids=args.extra_ids)
    for i, name in enumerate(_task_names(args.task)):
        s = stats.task_stats(name, v, data_dir=args.data_dir if args.task != "all" else None, seed=args.seed)
        if args.json:
            print(json.dumps(s))
        else:
            print(("\n" if i else "") + _format(s))
    return 0
