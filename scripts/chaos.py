"""Chaos: a sweep killed at random moments, rerun until it finishes, must end as if never killed.

    python3 scripts/chaos.py                        # local disk, gs:// (emulator, flaky) and two hosts, 20 kills each
    python3 scripts/chaos.py --where local --kills 30 --seed 3
    python3 scripts/chaos.py --quick --kills 4      # tiny cells (what tests/test_chaos.py runs)

The sweep is gin/sweeps/chaos.gin: annotate, distill and mixed at two budgets (six cells; the distill
cells share one teacher; every teacher's outputs go through the teacher store). For each place
(`--where`): one run never killed (the reference), then the same command in a fresh OUTPUT_DIR,
SIGKILLed `--kills` times and rerun until it exits 0. Most kills come at a random moment of the run
(uniform over a 1.2/kills share of the reference's working time after the rerun starts working,
some during start-up); some are aimed from inside the
process at a write: a checkpoint save (files written, not yet committed), a teacher-store chunk (half
a temporary file written), a ledger entry or a results row (half a line written; on gs:// the row
lands and the process dies before its next step). `gs`: OUTPUT_DIR on the GCS emulator, which also
fails transiently during the killed runs (HTTP 429/503, connection resets before and after serving,
2 s stalls; tests/gcs_emulator_main.py). `hosts`: the sweep as a 2-process job (one CPU device each,
gloo), the kill taking one host or both; a host that survives must exit by itself (75, naming the
host that went away) within 60 s.

Then it checks, against the reference: one results row per cell and each row equal (but the fields
measured on the clock: `wall_seconds`; `measured_usd`, which also counts the compute the kills made
redo; `output`, the run's own folder); each cell's predictions.jsonl byte for byte; each ledger's
entries (key, phase, charged $, FLOPs, labels, profile) equal and none twice, besides `lost:` entries
(the compute kills undid: measured seconds, $0 charged); the teacher-store chunks byte for byte;
metrics.jsonl with one row per step; no temporary file or object left (`*.doa-tmp`, Orbax's
`*.orbax-checkpoint-tmp*`, write probes, lock objects), no checkpoint set aside as damaged. It prints
a table per place and exits 1 when anything differs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

AIMS = ("checkpoint", "store", "ledger", "results")
# Smaller cells for a short run (tests/test_chaos.py): same grid, 1+1-layer models, one epoch per
# phase, fewer examples (still two teacher-store chunks for the larger plans).
QUICK = ["--gin.TEACHER_EPOCHS=1", "--gin.STUDENT_EPOCHS=1", "--gin.DISTILL_EPOCHS=1", "--gin.MAX_EVAL_EXAMPLES=16",
         "--gin.CellConfig.demo_sizes={'labeled': 128, 'unlabeled': 320, 'test': 16}",
         *(f"--gin.{m}/T5Size.num_{s}_layers=1" for m in ("teacher", "student") for s in ("encoder", "decoder"))]
ROW_MEASURED = ("wall_seconds", "measured_usd", "output")
LEDGER_MEASURED = ("seconds", "measured_usd")
FAULTS = [{"match": "", "fault": f, "rate": r} for f, r in
          (("503", 0.01), ("429", 0.01), ("reset", 0.005), ("reset_after", 0.005), ("slow:2", 0.003))]
HOST_EXIT_LIMIT_S = 60


# ----------------------------------------------------------------------------- the killed process

def arm(aim: str) -> None:
    """In the child: SIGKILL this process at the N-th write of a kind (`KIND:N`), mid-write."""
    from doa_jax import storage
    from doa_jax.distill import store

    kind, n = aim.split(":")
    seen = [0]

    def due() -> bool:
        seen[0] += 1
        return seen[0] >= int(n)

    def die() -> None:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if kind in ("ledger", "results"):
        append = storage.append_line

        def append_line(p, line, **kw):
            if os.fspath(p).endswith(f"{kind}.jsonl") and due():
                if storage.is_url(p):
                    append(p, line, **kw)          # the row lands; the process dies before its next step
                else:
                    pathlib.Path(p).parent.mkdir(parents=True, exist_ok=True)
                    with open(p, "a") as f:
                        f.write(line[: len(line) // 2])
                die()
            return append(p, line, **kw)

        storage.append_line = append_line
    elif kind == "store":
        write = store._atomic_write

        def atomic_write(p, data):
            if "chunk_" in p.name and due():
                if not storage.is_url(p):
                    storage._tmp_name(p).write_bytes(data[: len(data) // 2])
                die()
            return write(p, data)

        store._atomic_write = atomic_write
    elif kind == "checkpoint":
        from orbax.checkpoint._src.path import atomicity

        for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
            async def finalize(self, *a, _original=cls.finalize, **k):
                if due():                           # the step's files are written, not committed
                    die()
                return await _original(self, *a, **k)
            cls.finalize = finalize
    else:
        raise SystemExit(f"unknown aim {aim!r}: one of {', '.join(AIMS)} with :N")


def child(argv: list[str]) -> int:
    aim = argv[argv.index("--aim") + 1] if "--aim" in argv else None
    doa_args = argv[argv.index("--") + 1:]
    from doa_jax import cli

    if aim:
        arm(aim)
    return cli.main(doa_args)


# ----------------------------------------------------------------------------- driving it

class Place:
    """Where a run writes (`local` folder, `gs` emulator, `hosts`: a 2-process job on a local folder)."""

    def __init__(self, name: str, work: pathlib.Path, quick: bool, env: dict, budgets=None):
        self.name, self.work, self.quick, self.env = name, work, quick, env
        self.bindings = [*(QUICK if quick else []), *([f"--gin.GRID_BUDGETS_USD={list(budgets)}"] if budgets else [])]
        self.hosts = 2 if name == "hosts" else 1
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def out(self, run: str) -> str:
        return f"gs://doa-test/chaos/{run}" if self.name == "gs" else str(self.work / run)

    def start(self, out: str, tag: str, aim: str | None) -> list[subprocess.Popen]:
        args = ["sweep", "--gin_file", "sweeps/chaos.gin", f"--gin.OUTPUT_DIR='{out}'", *self.bindings]
        port = _free_port()
        procs = []
        for i in range(self.hosts):
            hosts = ([] if self.hosts == 1 else
                     ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)])
            armed = ["--aim", aim] if aim and i == 0 else []
            log = open(self.logs / f"{tag}.{i}.log", "w")
            procs.append(subprocess.Popen([sys.executable, __file__, "child", *armed, "--", *args, *hosts], cwd=REPO,
                                          env=self.env, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        return procs

    def started(self, tag: str) -> bool:
        return all("sweep: " in (self.logs / f"{tag}.{i}.log").read_text() for i in range(self.hosts))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(place: Place, out: str, tag: str, *, aim=None, kill_at=None, from_start=False, rng=None) -> dict:
    """One run of the sweep; SIGKILLed `kill_at` s after it starts working (after it starts, with
    `from_start`) unless an aimed kill came first. Returns what happened; raises when a run that was
    not killed fails, or when a host outlives its peer's death by more than HOST_EXIT_LIMIT_S."""
    began = time.monotonic()
    procs = place.start(out, tag, aim)
    working = began if from_start else None
    killed_at, by_driver = None, False
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if working is None and place.started(tag):
            working = now
        if kill_at is not None and killed_at is None and working is not None and now - working >= kill_at:
            for i in (rng.choice([[0], [1], [0, 1]]) if place.hosts > 1 else [0]):
                with contextlib.suppress(ProcessLookupError):
                    procs[i].send_signal(signal.SIGKILL)
            killed_at, by_driver = now, True
        if killed_at is None and any(p.returncode == -signal.SIGKILL for p in procs):
            killed_at = now                    # an aimed kill, from inside
        if killed_at is not None and now - killed_at > HOST_EXIT_LIMIT_S:
            for p in procs:
                p.kill()
            raise RuntimeError(f"run {tag}: a host was still running {HOST_EXIT_LIMIT_S} s after its peer died")
        time.sleep(0.05)
    codes = [p.returncode for p in procs]
    killed = -signal.SIGKILL in codes
    record = {"tag": tag, "codes": codes, "seconds": round(time.monotonic() - began, 1), "killed": killed,
              "aim": aim.split(":")[0] if killed and aim and not by_driver else None,
              "work_s": round(time.monotonic() - working, 1) if working is not None else None}
    if killed and place.hosts > 1:
        record["survivor_exit_s"] = round(time.monotonic() - killed_at, 1)
        bad = [c for c in codes if c not in (-signal.SIGKILL, 75)]
        if bad:
            raise RuntimeError(f"run {tag}: a surviving host exited {bad}, not 75:\n"
                               + (place.logs / f"{tag}.{codes.index(bad[0])}.log").read_text()[-3000:])
    if not killed and any(codes):
        raise RuntimeError(f"run {tag} exited {codes} without being killed:\n"
                           + (place.logs / f"{tag}.0.log").read_text()[-3000:])
    return record


def chaos_round(place: Place, out: str, kills: int, reference_work_s: float, rng: random.Random,
                start_index: int) -> list[dict]:
    """Reruns the sweep in `out`, killing it (aimed or at random) until `kills` kills happened or
    it finished; then runs it to the end."""
    first = rng.randrange(len(AIMS))
    # The N-th write of its kind in that run: a results row comes once per cell, the others often.
    aims = [f"{kind}:{1 if kind == 'results' else rng.randint(1, 2)}"
            for kind in (AIMS[(first + i) % len(AIMS)] for i in range(-(-kills * 2 // 5)))]
    plan = aims + [None] * (kills - len(aims))
    rng.shuffle(plan)
    runs = []
    for i, aim in enumerate(plan):
        # Uniform over a share of the work a bit above 1/kills: the kills come spread over the sweep
        # and, with the work each rerun redoes, rarely after it finished.
        # (An aimed run is killed from outside only if its write did not come within 4-6 such shares.)
        share = reference_work_s / max(kills, 1)
        record = run_once(place, out, f"run{start_index + i:03d}", aim=aim, rng=rng,
                          kill_at=rng.uniform(0, 1.2 * share) if aim is None else rng.uniform(4, 6) * share,
                          from_start=aim is None and rng.random() < 0.15)
        runs.append(record)
        if not record["killed"]:
            return runs                        # it finished before this kill
    runs.append(run_once(place, out, f"run{start_index + len(plan):03d}"))
    return runs


# ----------------------------------------------------------------------------- checking the outcome

def _files(out: str) -> list[str]:
    import fsspec

    fs, key = fsspec.core.url_to_fs(out)
    return sorted(p[len(key):].lstrip("/") for p in fs.find(key, refresh=True))


def _lines(path: str) -> list[dict]:
    """The JSON lines of an append-only log; a line that is not JSON (torn) as {"torn": line}."""
    from doa_jax import storage

    out = []
    for line in storage.read_appended(path).decode(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append({"torn": line, "key": "torn", "step": -1})
    return out


def _sha(out: str, rel: str) -> str:
    import hashlib

    from doa_jax import storage

    return hashlib.sha256(storage.read_bytes(f"{out}/{rel}")).hexdigest()


def _charged(entries: list[dict]) -> list[tuple]:
    """A ledger's entries but the `lost:` ones, as (phase, then every field not measured), sorted.
    Keys are left out: a teacher's and a store's keys hash the vocabulary file, which records
    the folder it was built in, so the same teacher has another key in another OUTPUT_DIR."""
    return sorted(tuple(sorted((f, v) for f, v in e.items() if f not in (*LEDGER_MEASURED, "key")))
                  for e in entries if not e["key"].startswith("lost:"))


def compare(reference: str, out: str) -> dict:
    """What differs between the sweep in `out` and the reference (see the module's docstring)."""
    from collections import Counter

    from doa_jax.experiment import results

    problems = []
    want = {r["cell_key"]: r for r in results.read_rows(f"{reference}/results.jsonl")}
    got_rows = results.read_rows(f"{out}/results.jsonl")
    got = {r["cell_key"]: r for r in got_rows}
    twice = [k for k, n in Counter(r["cell_key"] for r in got_rows).items() if n > 1]
    problems += [f"results row of cell {k} written {Counter(r['cell_key'] for r in got_rows)[k]} times" for k in twice]
    if set(got) != set(want):
        problems.append(f"cells with rows differ: {sorted(set(want) ^ set(got))}")
    lost_entries, lost_seconds = 0, 0.0
    for key in sorted(set(want) & set(got)):
        fields = sorted(f for f in set(want[key]) | set(got[key])
                        if f not in ROW_MEASURED and want[key].get(f) != got[key].get(f))
        if fields:
            problems.append(f"cell {key}: row fields differ: {', '.join(fields)}")
        if want[key].get("output") and _sha(reference, f"cells/{key}/predictions.jsonl") != _sha(out, f"cells/{key}/predictions.jsonl"):
            problems.append(f"cell {key}: predictions.jsonl differs")
        mine = _lines(f"{out}/cells/{key}/ledger.jsonl")
        counts = Counter(e["key"] for e in mine)
        problems += [f"cell {key}: ledger entry {k} written {n} times" for k, n in counts.items() if n > 1]
        lost = [e for e in mine if e["key"].startswith("lost:")]
        problems += [f"cell {key}: lost entry {e['key']} charged ${e['usd']}" for e in lost if e["usd"]]
        lost_entries, lost_seconds = lost_entries + len(lost), lost_seconds + sum(e["seconds"] for e in lost)
        if _charged(mine) != _charged(_lines(f"{reference}/cells/{key}/ledger.jsonl")):
            problems.append(f"cell {key}: ledger entries differ")
    files, ref_files = _files(out), _files(reference)
    chunks = lambda fs_, root: sorted(_sha(root, f) for f in fs_ if "/stores/" in f and "/chunk_" in f
                                      and f.endswith((".npz", ".jsonl")))
    if chunks(files, out) != chunks(ref_files, reference):
        problems.append("teacher-store chunks differ")
    for log in sorted({f.split(".rows/")[0] for f in files if f.endswith("metrics.jsonl") or "metrics.jsonl.rows/" in f}):
        steps = [row["step"] for row in _lines(f"{out}/{log}")]
        if steps != sorted(set(steps)):
            problems.append(f"{log}: steps logged twice or out of order")
    orphans = [f for f in files if ".doa-tmp" in f or "orbax-checkpoint-tmp" in f or ".doa_write_probe" in f
               or ".corrupt/" in f or (f.endswith(".lock") and (out.startswith("gs://") or _sha(out, f) != _EMPTY))]
    problems += [f"left behind: {f}" for f in orphans]
    return {"cells": len(want), "rows_equal": sum(1 for k in want if k in got and not any(
        p.startswith(f"cell {k}") for p in problems)), "lost_entries": lost_entries,
            "lost_seconds": round(lost_seconds, 1), "orphans": len(orphans), "problems": problems}


_EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"   # sha256 of b"" (a released lock)


# ----------------------------------------------------------------------------- the table

def chaos(place: Place, kills: int, seed: int, faults=None) -> dict:
    """The reference run, then rounds of killed runs until `kills` kills; each round compared."""
    rng = random.Random(seed)
    reference = place.out("reference")
    ref = run_once(place, reference, "reference")
    if faults is not None:
        faults.set(*FAULTS, seed=seed)
    runs, rounds, started = [], [], time.monotonic()
    while sum(r["killed"] for r in runs) < kills:
        out = place.out(f"chaos{len(rounds)}")
        left = kills - sum(r["killed"] for r in runs)
        runs += chaos_round(place, out, left, ref["work_s"] or ref["seconds"], rng, len(runs))
        rounds.append(compare(reference, out))
    if faults is not None:
        faults.set()
    killed = [r for r in runs if r["killed"]]
    return {"place": place.name, "reference_s": ref["seconds"], "chaos_s": round(time.monotonic() - started, 1),
            "rounds": len(rounds), "runs": len(runs), "kills": len(killed),
            "aimed": {a: sum(r["aim"] == a for r in killed) for a in AIMS},
            "survivor_exit_s": max((r.get("survivor_exit_s", 0.0) for r in killed), default=None) if place.hosts > 1 else None,
            "faults": len(faults.injected()) if faults is not None else None,
            "cells": sum(r["cells"] for r in rounds), "rows_equal": sum(r["rows_equal"] for r in rounds),
            "lost_entries": sum(r["lost_entries"] for r in rounds), "lost_seconds": sum(r["lost_seconds"] for r in rounds),
            "orphans": sum(r["orphans"] for r in rounds), "problems": [p for r in rounds for p in r["problems"]],
            "run_log": runs}


def table(results: list[dict]) -> str:
    head = ("place", "ref s", "chaos s", "runs", "kills", "aimed c/s/l/r", "faults", "host exit s", "rows equal",
            "lost (entries, s)", "orphans", "problems")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in results:
        a = r["aimed"]
        lines.append(" | ".join(str(x) for x in (
            r["place"], r["reference_s"], r["chaos_s"], r["runs"], r["kills"],
            f"{a['checkpoint']}/{a['store']}/{a['ledger']}/{a['results']}", "-" if r["faults"] is None else r["faults"],
            "-" if r["survivor_exit_s"] is None else r["survivor_exit_s"], f"{r['rows_equal']}/{r['cells']}",
            f"{r['lost_entries']}, {r['lost_seconds']:.1f}", r["orphans"], len(r["problems"]))))
    return "\n".join(lines)


def _env() -> dict:
    import xla_env

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["XLA_FLAGS"] = xla_env.flags(1)     # one CPU device per process
    return env


def run_place(name: str, work: pathlib.Path, kills: int, seed: int, quick: bool, budgets=None) -> dict:
    """The chaos of one place (`local`, `gs` or `hosts`) in `work`/name."""
    work = work / name
    if name != "gs":
        return chaos(Place(name, work, quick, _env(), budgets), kills, seed)
    from gcs_helpers import FaultPlan, gcs_emulator

    work.mkdir(parents=True, exist_ok=True)
    faults = FaultPlan(work / "faults.json")
    with gcs_emulator(faults=faults):
        return chaos(Place(name, work, quick, _env(), budgets), kills, seed, faults)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        return child(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--where", nargs="+", default=["local", "gs", "hosts"], choices=["local", "gs", "hosts"])
    p.add_argument("--kills", type=int, default=20, help="kills per place (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smaller cells (the grid is the same)")
    p.add_argument("--budgets", type=float, nargs="+", help="the grid's extra budgets (default: chaos.gin's, 2 and 4)")
    p.add_argument("--work", help="folder for the runs and their logs (default: a temporary folder, kept)")
    args = p.parse_args(argv)
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="doa-chaos-"))
    print(f"chaos: {args.kills} kills per place in {', '.join(args.where)}; runs and logs in {work}", flush=True)
    results = []
    for name in args.where:
        results.append(run_place(name, work, args.kills, args.seed, args.quick, args.budgets))
        print(f"{name}: {json.dumps({k: v for k, v in results[-1].items() if k != 'run_log'})}", flush=True)
    (work / "chaos.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    for r in results:
        for problem in r["problems"]:
            print(f"{r['place']}: {problem}")
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
