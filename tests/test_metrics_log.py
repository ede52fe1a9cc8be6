"""`metrics.jsonl` on resume: rows of steps after the resumed checkpoint, and a torn last line, go."""
import json

from doa_jax.progress import MetricsLog


def test_drop_after_keeps_rows_up_to_the_resume_step_and_drops_a_torn_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step, "step_time_s": 0.5})
    with open(log.path, "a") as f:
        f.write('{"step": 6, "lo')                   # killed mid-write
    # Steps 4 and 5 ran (0.5 s each) and are lost: the resumed run does them again.
    assert log.drop_after(3) == 1.0
    log.write({"step": 4, "loss": 0.25})
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2, 3, 4]


def test_drop_after_on_a_fresh_run_changes_nothing(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    assert log.drop_after(0) == 0.0 and not log.path.exists()


def test_lost_seconds_count_every_step_a_row_covers(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (10, 20, 30):                       # logged every 10 steps, 0.1 s per step
        log.write({"step": step, "step_time_s": 0.1})
    assert abs(log.drop_after(10) - 2.0) < 1e-9      # steps 11-30 are lost
