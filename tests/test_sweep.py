"""`doa sweep`: the grid expands into `doa run` cells, a killed sweep resumes without rerunning
finished cells (each cell has one row), bad grids get one clear message before any compute, and a
small real sweep (tiny models on WLP) renders the report beside the paper's numbers."""
import csv
import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from doa_jax import cli, gin_utils
from doa_jax.experiment import report
from doa_jax.experiment import sweep, task_setup

REPO = pathlib.Path(__file__).resolve().parents[1]


def _demo_sweep(tmp_path, *bindings):
    return sweep.load_sweep(["sweeps/demo.gin"], [f"OUTPUT_DIR = '{tmp_path}'", *bindings])


# ----------------------------------------------------------------------------- the grid

def test_grid_runs_cells_that_share_a_teacher_next_to_each_other():
    grid = sweep.Grid(tasks=["wlp", "fever"], start_labels=[1000], budgets_usd=[100, 200],
                      strategies=["annotate", "distill"], seeds=[0, 1])
    points = grid.points()
    assert len(points) == 2 * 1 * 2 * 2 * 2
    assert [(p.task, p.seed, p.strategy, p.extra_budget_usd) for p in points[:6]] == [
        ("wlp", 0, "annotate", 100.0), ("wlp", 0, "annotate", 200.0),
        ("wlp", 0, "distill", 100.0), ("wlp", 0, "distill", 200.0),   # one teacher: wlp, 1000 labels, seed 0
        ("wlp", 1, "annotate", 100.0), ("wlp", 1, "annotate", 200.0)]
    assert len(set(points)) == len(points)


def test_budgets_may_differ_per_task():
    grid = sweep.Grid(tasks=["wlp", "fever"], start_labels=[1000], budgets_usd={"wlp": [100, 500], "fever": [50]},
                      strategies=["distill"], seeds=[0])
    assert [(p.task, p.extra_budget_usd) for p in grid.points()] == [("wlp", 100.0), ("wlp", 500.0), ("fever", 50.0)]


def test_repeated_grid_values_give_one_cell():
    grid = sweep.Grid(tasks=["wlp"], start_labels=[1000, 1000], budgets_usd=[100, 100.0], strategies=["annotate"],
                      seeds=[0, 0])
    assert len(grid.points()) == 1


def test_demo_sweep_cells_are_the_cells_doa_run_builds(tmp_path):
    points, cells = _demo_sweep(tmp_path)
    assert len(cells) == 1 * 1 * 3 * 2 * 2        # demo.gin: 1 task, 1 start, 3 budgets, 2 strategies, 2 seeds
    assert len({c.key() for c in cells}) == len(cells)
    p, cell = points[4], cells[4]
    assert (cell.task, cell.start_labels, cell.extra_budget_usd, cell.strategy, cell.seed) == (
        p.task, p.start_labels, p.extra_budget_usd, p.strategy, p.seed)
    gin_utils.parse(["runs/experiment.gin", "runs/demo_models.gin"],
                    [f"OUTPUT_DIR = '{tmp_path}'", f"TASK = '{p.task}'", f"START_LABELS = {p.start_labels}",
                     f"EXTRA_BUDGET_USD = {p.extra_budget_usd!r}", f"STRATEGY = '{p.strategy}'", f"SEED = {p.seed}"])
    assert task_setup.resolve_models(gin_utils.macro("CELL")).key() == cell.key()   # as run_cell keys it


def test_sweep_cells_follow_the_vocabulary_unless_model_vocab_size_overrides_it(tmp_path):
    _, cells = _demo_sweep(tmp_path)      # the demo's own vocabulary: 265 ids, padded to 384 rows
    assert {(c.student.vocab_size, c.teacher.vocab_size) for c in cells} == {(384, 384)}
    _, cells = _demo_sweep(tmp_path, "MODEL_VOCAB_SIZE = 320")
    assert {(c.student.vocab_size, c.teacher.vocab_size) for c in cells} == {(320, 320)}
    with pytest.raises(ValueError, match="has 265 ids .* is 256; expected 265..384: set MODEL_VOCAB_SIZE = 384"):
        _demo_sweep(tmp_path, "MODEL_VOCAB_SIZE = 256")


def test_a_sweep_cell_has_the_key_doa_run_gives_the_same_experiment():
    common = ["OUTPUT_DIR = '/tmp/doa_sweep_key'", "VOCABULARY = '/t5/spiece.model'"]
    gin_utils.parse(["runs/sweep.gin"], common + ["GRID_TASKS = ['wlp']", "GRID_START_LABELS = [1000]",
                                                  "GRID_BUDGETS_USD = [100]", "GRID_STRATEGIES = ['annotate']"],
                    finalize=False)
    (cell,) = sweep.cells_from_gin(gin_utils.macro("GRID").points())
    gin_utils.parse(["runs/experiment.gin", "experiments/wlp_1k_plus100_annotate.gin"], common)
    assert gin_utils.macro("CELL").key() == cell.key()


def _paper_block_a() -> dict[str, list[float]]:
    with open(report.PAPER_RESULTS, newline="") as f:
        rows = [r for r in csv.DictReader(line for line in f if not line.startswith("#"))
                if r["table"] == "main" and r["start_labels"] == "1000"]
    budgets: dict[str, list[float]] = {}
    for r in rows:
        if float(r["extra_budget_usd"]) not in budgets.setdefault(r["task"], []):
            budgets[r["task"]].append(float(r["extra_budget_usd"]))
    return budgets


def test_paper_main_gin_is_the_papers_block_a_grid():
    gin_utils.parse(["sweeps/paper_main.gin"],
                    ["OUTPUT_DIR = '/tmp/doa_paper_main'", "VOCABULARY = '/t5/spiece.model'",
                     "TEACHER_CHECKPOINT = '/ckpt/xxl'", "STUDENT_CHECKPOINT = '/ckpt/small'"], finalize=False)
    points = gin_utils.macro("GRID").points()
    cells = sweep.cells_from_gin(points)
    expected = _paper_block_a()      # from doa_jax/paper_results.csv, the transcription of the paper
    grid = {}
    for p in points:
        grid.setdefault(p.task, [])
        if p.extra_budget_usd not in grid[p.task]:
            grid[p.task].append(p.extra_budget_usd)
    assert grid == expected
    assert {(p.start_labels, p.strategy) for p in points} == {(1000, "annotate"), (1000, "distill")}
    assert len(points) == sum(map(len, expected.values())) * 2 * 3        # x 2 strategies x 3 seeds
    c = cells[0]
    assert (c.teacher.emb_dim, c.student.emb_dim, c.pricing.accelerator) == (4096, 512, "a100")    # XXL, Small
    assert (c.teacher_checkpoint, c.student_checkpoint, c.vocab) == ("/ckpt/xxl", "/ckpt/small", "/t5/spiece.model")


def test_paper_main_names_the_macros_the_user_must_set():
    with pytest.raises(ValueError, match=r"TEACHER_CHECKPOINT \(required by gin/sweeps/paper_main.gin:\d+\)"):
        gin_utils.parse(["sweeps/paper_main.gin"], ["OUTPUT_DIR = '/tmp/x'", "VOCABULARY = '/t5/spiece.model'"],
                        finalize=False)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("flag,message", [
    ("--gin.GRID_SEEDS=[]", "the sweep's grid is empty: GRID_SEEDS has no values"),
    ("--gin.GRID_BUDGETS_USD=[]", "the sweep's grid is empty: GRID_BUDGETS_USD has no budgets"),
    ("--gin.GRID_TASKS=['imagenet']", "GRID_TASKS: no task card"),
    ("--gin.ACCELERATOR=b200", "ACCELERATOR: unknown accelerator 'b200'; known: a100"),
    ("--gin.GRID_BUDGETS_USD=[5, -5]", "GRID_BUDGETS_USD: a budget must be >= 0 dollars, got -5"),
    ("--gin.GRID_BUDGETS_USD=[5, 'lots']", "GRID_BUDGETS_USD: a budget is a number of dollars, got 'lots'"),
    ("--gin.GRID_BUDGETS_USD=lots", "GRID_BUDGETS_USD must be a list of dollar amounts"),
    ("--gin.GRID_STRATEGIES=['cheap']", "GRID_STRATEGIES: unknown strategy 'cheap'"),
])
def test_bad_grid_is_one_clear_message_before_any_compute(tmp_path, capsys, flag, message):
    code = cli.main(["sweep", "--gin_file", "sweeps/demo.gin", f"--gin.OUTPUT_DIR={tmp_path}", flag])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_dry_run_lists_cells_and_runs_none(tmp_path, capsys):
    assert cli.main(["sweep", "--gin_file", "sweeps/demo.gin", f"--gin.OUTPUT_DIR={tmp_path}", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "sweep: 12 cells" in out and out.count("to run") == 12 and "demo, 200 labels, +$10, distill, seed 1" in out
    assert not (tmp_path / "results.jsonl").exists()


@pytest.mark.parametrize("sweep_file", ["sweeps/demo.gin", "sweeps/wlp_tiny.gin"])
def test_a_sweeps_default_output_dir_is_under_runs_and_git_ignored(sweep_file, tmp_path):
    gin_utils.parse([sweep_file], ["VOCABULARY = 'x'"], finalize=False)
    out = pathlib.PurePosixPath(gin_utils.macro("OUTPUT_DIR"))
    assert not out.is_absolute() and out.parts[0] == "runs"
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: cannot ask git what it ignores")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "results.jsonl")], cwd=REPO)
    assert ignored.returncode == 0, f"{out} is not git-ignored"


def test_doa_sweep_says_where_it_writes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sweep", "--gin_file", "sweeps/demo.gin", "--dry_run"]) == 0
    assert f"sweep output: {tmp_path / 'runs' / 'demo_sweep'} (OUTPUT_DIR;" in capsys.readouterr().out


# ----------------------------------------------------------------------------- resume

class FakeRunner:
    """Appends a row per cell, as run_cell does; fails on call `fail_at` (1-based) if given."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, cell):
        self.calls.append(cell.key())
        if len(self.calls) == self.fail_at:
            raise RuntimeError("injected failure")
        row = {"cell_key": cell.key(), "task": "demo", "strategy": cell.strategy,
               "start_labels": cell.start_labels,
               "extra_budget_usd": cell.extra_budget_usd, "seed": cell.seed, "metric": "f1", "value": 10.0 + cell.seed,
               "status": "ok", "spent_total_usd": cell.extra_budget_usd / 2, "wall_seconds": 0.1}
        with open(pathlib.Path(cell.output_dir) / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def test_a_failed_sweep_rerun_runs_only_the_unfinished_cells(tmp_path):
    points, cells = _demo_sweep(tmp_path)
    first = FakeRunner(fail_at=4)
    with pytest.raises(RuntimeError, match="injected failure"):
        sweep.run_sweep(points, cells, runner=first, write_report=False, log=lambda s: None)
    finished = [json.loads(line)["cell_key"] for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert finished == [c.key() for c in cells[:3]]
    second = FakeRunner()
    result = sweep.run_sweep(points, cells, runner=second, write_report=False, log=lambda s: None)
    assert second.calls == [c.key() for c in cells[3:]]
    assert (result.ran, result.skipped) == (len(cells) - 3, 3)
    keys = [json.loads(line)["cell_key"] for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(keys) == sorted(c.key() for c in cells)          # each cell once
    assert [r["cell_key"] for r in result.rows] == [c.key() for c in cells]
    third = FakeRunner()
    assert sweep.run_sweep(points, cells, runner=third, write_report=False, log=lambda s: None).ran == 0
    assert third.calls == []


def test_a_row_torn_by_a_kill_is_dropped_and_its_cell_reruns(tmp_path):
    points, cells = _demo_sweep(tmp_path, "GRID_SEEDS = [0]", "GRID_STRATEGIES = ['annotate']")
    FakeRunner()(cells[0])
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write(json.dumps({"cell_key": cells[1].key(), "task": "demo"})[:25])      # killed mid-write
    runner = FakeRunner()
    sweep.run_sweep(points, cells, runner=runner, write_report=False, log=lambda s: None)
    assert runner.calls == [c.key() for c in cells[1:]]
    rows = report.read_results(tmp_path / "results.jsonl")
    assert [r["cell_key"] for r in rows] == [c.key() for c in cells]


def test_progress_lines_count_cells_spent_dollars_and_eta(tmp_path):
    points, cells = _demo_sweep(tmp_path, "GRID_SEEDS = [0]", "GRID_STRATEGIES = ['annotate']",
                                "GRID_BUDGETS_USD = [1, 3, 10]")
    lines = []
    sweep.run_sweep(points, cells, runner=FakeRunner(), write_report=False, log=lines.append)
    assert lines[0] == f"sweep: 3 cells in {tmp_path}: 0 already finished, 3 to run"
    assert lines[1].startswith("[cell 1/3] demo, 200 labels, +$1, annotate, seed 0") and "ETA ?" in lines[1]
    assert "spent so far $0.50" in lines[3] and "ETA 0:00:00" in lines[3]       # +$1 cell spent $0.50
    assert "demo" in lines[-1] and "10.0" in lines[-1]       # the summary table's last row


def test_two_sweeps_cannot_share_an_output_dir_at_once(tmp_path):
    points, cells = _demo_sweep(tmp_path, "GRID_SEEDS = [0]", "GRID_STRATEGIES = ['annotate']")

    def nested(cell):
        return sweep.run_sweep(points, cells, runner=FakeRunner(), write_report=False, log=lambda s: None,
                               config_gin="# the second sweep's config\n")

    with pytest.raises(ValueError, match=r"a sweep in .* is being run by pid \d+"):
        sweep.run_sweep(points, cells, runner=nested, write_report=False, log=lambda s: None,
                        config_gin="# the running sweep's config\n")
    # The refused sweep wrote nothing over the running one's files.
    assert (tmp_path / "config.gin").read_text() == "# the running sweep's config\n"


TINY_DEMO = ["--gin.GRID_BUDGETS_USD=[1, 2, 3]", "--gin.GRID_STRATEGIES=['annotate']", "--gin.GRID_SEEDS=[0]",
             "--gin.STUDENT_EPOCHS=2", "--gin.MAX_EVAL_EXAMPLES=16",
             "--gin.CellConfig.demo_sizes={'labeled': 256, 'unlabeled': 64, 'test': 16}",
             "--gin.CellConfig.verbose=False"]


@pytest.mark.slow
def test_a_sweep_killed_after_its_first_row_reruns_only_unfinished_cells(tmp_path, monkeypatch):
    argv = ["sweep", "--gin_file", "sweeps/demo.gin", f"--gin.OUTPUT_DIR={tmp_path}", *TINY_DEMO]
    results = tmp_path / "results.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "doa_jax", *argv], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (results.exists() and results.read_text().count("\n") >= 1):
            assert proc.poll() is None, "the sweep ended before its first row"
            assert time.time() < deadline, "no row after 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    before = report.read_results(results)
    assert 1 <= len(before) < 3
    calls = []
    real = sweep.run_cell
    monkeypatch.setattr(sweep, "run_cell", lambda cell, **kw: calls.append(cell.key()) or real(cell, **kw))
    assert cli.main(argv) == 0
    after = [r["cell_key"] for r in report.read_results(results)]
    assert len(calls) == 3 - len(before) and not set(calls) & {r["cell_key"] for r in before}
    assert len(after) == len(set(after)) == 3


# ----------------------------------------------------------------------------- a small real sweep

@pytest.mark.slow
def test_small_real_wlp_sweep_renders_the_report_beside_the_papers_numbers(tmp_path, doa_data, monkeypatch, capsys):
    from doa_jax.data import demo as demo_task
    from doa_jax.data import vocab as vocab_lib

    monkeypatch.setenv("DOA_DATA_DIR", str(doa_data))
    vocab = vocab_lib.Vocabulary(vocab_lib.build_vocab(vocab_lib.task_texts(["wlp"], doa_data / "wlp"),
                                                       tmp_path / "vocab" / "wlp.model", vocab_size=2000))
    rows = demo_task.model_vocab_size(vocab)
    _, cells = sweep.load_sweep(["sweeps/wlp_tiny.gin"], [f"VOCABULARY = '{vocab.path}'",
                                                          f"OUTPUT_DIR = '{tmp_path / 'sweep'}'"])
    assert {c.student.vocab_size for c in cells} == {rows} == {2176}   # what wlp_tiny.gin's comment promises
    out = tmp_path / "sweep"
    argv = ["sweep", "--gin_file", "sweeps/wlp_tiny.gin", f"--gin.OUTPUT_DIR={out}",
            f"--gin.VOCABULARY={tmp_path / 'vocab' / 'wlp.model'}", "--gin.GRID_BUDGETS_USD=[100]",
            "--gin.MAX_UNLABELED=64", "--gin.MAX_EVAL_EXAMPLES=16",
            "--gin.FEATURE_LENGTHS={'inputs': 48, 'targets': 48}",
            "--gin.CellConfig.verbose=False"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed
    rows_ = report.read_results(out / "results.jsonl")
    assert len(rows_) == 4 and {r["status"] for r in rows_} <= {"ok", "capped"}
    md = (out / "report.md").read_text()
    assert "Sweep progress: 4 of 4 cells have a result." in md
    # this run's mean over seeds 0 and 1, and the paper's number for the same cell beside it
    ann = [r["value"] for r in rows_ if r["strategy"] == "annotate"]
    assert f"| wlp | 1000 | 100 | Ann. | efficient | mfu (ASSUMED) | f1 | {sum(ann) / 2:.1f} ± " in md and "| 2 | 50.0 (not comparable) |" in md
    assert "| 2 | 71.1 (not comparable) |" in md                 # Dist., +$100: the paper's 71.1
    for name in ("wlp_cost_vs_metric.png", "wlp_budget_bars.png"):
        png = out / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    capsys.readouterr()
    assert cli.main(argv) == 0                                   # rerun: nothing left to do
    assert "4 already finished, 0 to run" in capsys.readouterr().out
    assert len(report.read_results(out / "results.jsonl")) == 4


PAPER_CHECKPOINTS = ["OUTPUT_DIR = '/tmp/doa_paper'", "VOCABULARY = '/t5/spiece.model'",
                     "TEACHER_CHECKPOINT = '/ckpt/t'", "STUDENT_CHECKPOINT = '/ckpt/s'"]


def _paper_cells(table: str, **where) -> set[tuple]:
    """(task, start, budget, strategy, student, teacher) of the paper's rows; budget = extra $ (main)
    or total $ minus the start labels' cost (the size tables)."""
    out = set()
    for r in report.read_paper_results():
        if r["table"] != table or any(r[k] != v for k, v in where.items()):
            continue
        extra = r["extra_budget_usd"] if table == "main" else round(
            r["total_budget_usd"] - r["start_labels"] * report.label_cost_usd(r["task"]), 2)
        out.add((r["task"], r["start_labels"], extra, r["strategy"], r["student"], r["teacher"] or ""))
    return out


def _grid_cells(files, bindings) -> set[tuple]:
    gin_utils.parse(files, PAPER_CHECKPOINTS + bindings, finalize=False)
    cells = sweep.cells_from_gin(gin_utils.macro("GRID").points())
    return {(c.task, c.start_labels, c.extra_budget_usd, c.strategy, report.model_name(_size(c.student)),
             report.model_name(_size(c.teacher)) if c.strategy == "distill" else "") for c in cells}


def _size(model_cfg) -> str:
    from doa_jax.experiment.cell import size_name
    return size_name(model_cfg)


@pytest.mark.parametrize("rel,start", [("sweeps/paper_main_5k.gin", 5000), ("sweeps/paper_main_10k.gin", 10000)])
def test_paper_main_5k_and_10k_blocks_are_the_papers(rel, start):
    assert _grid_cells([rel], []) == _paper_cells("main", start_labels=start)


@pytest.mark.parametrize("task,starts", [("wlp", "[100, 1000, 5000]"), ("multipit_gen", "[100, 1000, 10000]")])
def test_paper_student_size_runs_are_the_papers_table(task, starts):
    got = set()
    for size in ("small", "base", "large"):
        got |= _grid_cells(["sweeps/paper_student_size.gin"], [f"STUDENT_SIZE = '{size}'", f"GRID_TASKS = ['{task}']",
                                                               f"GRID_START_LABELS = {starts}"])
    assert got == _paper_cells("student_size", task=task)


@pytest.mark.parametrize("task,starts,budget", [("wlp", "[100, 1000, 5000]", "[200]"),
                                                ("multipit_gen", "[100, 1000, 10000]", "[150]")])
def test_paper_teacher_size_runs_are_the_papers_table(task, starts, budget):
    got = set()
    for size, strategies_ in (("xxl", "['annotate', 'distill']"), ("xl", "['distill']"), ("large", "['distill']")):
        got |= _grid_cells(["sweeps/paper_teacher_size.gin"],
                           [f"TEACHER_SIZE = '{size}'", f"GRID_TASKS = ['{task}']", f"GRID_START_LABELS = {starts}",
                            f"GRID_BUDGETS_USD = {budget}", f"GRID_STRATEGIES = {strategies_}"])
    assert got == _paper_cells("teacher_size", task=task)


def test_a_sweep_of_stand_in_models_says_it_is_a_plumbing_check_and_names_the_pairs():
    rows = [{"teacher": "t5_1_1_tiny", "student": "t5_1_1_tiny", "priced_as": {"teacher": "xxl", "student": "small"}},
            {"teacher": "t5_1_1_tiny", "student": "t5_1_1_tiny", "priced_as": None}]
    note = sweep.stand_in_note(rows)
    assert "t5_1_1_tiny as small, t5_1_1_tiny as xxl" in note and "plumbing check" in note
    assert sweep.stand_in_note([{"teacher": "xxl", "student": "small", "priced_as": None}]) is None
