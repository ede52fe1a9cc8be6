"""`metrics.jsonl` on resume: rows of steps after the resumed checkpoint, and a torn last line, go."""
import json

from doa_jax.progress import MetricsLog


def test_drop_after_keeps_rows_up_to_the_resume_step_and_drops_a_torn_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    with open(log.path, "a") as f:
        f.write('{"step": 6, "lo')                   # killed mid-write
    assert log.drop_after(3) == 3
    log.write({"step": 4, "loss": 0.25})
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2, 3, 4]


def test_drop_after_on_a_fresh_run_changes_nothing(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    assert log.drop_after(0) == 0 and not log.path.exists()
