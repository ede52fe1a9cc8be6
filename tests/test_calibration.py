"""`doa calibrate`: times the real programs here and writes a calibration `doa plan` prices with."""

import pytest

from doa_jax import cli
from doa_jax.experiment import cost_profiles


@pytest.mark.slow
def test_calibrate_tiny_models_on_the_demo_task_then_plan_with_the_file(capsys, tmp_path):
    out = tmp_path / "cal.json"
    assert cli.main(["calibrate", "--accelerator", "cpu", "--teacher", "tiny", "--student", "tiny", "--task", "demo",
                     "--batch-size", "8", "--inputs-length", "8", "--targets-length", "4", "--reps", "1",
                     "--warmup", "0", "--run-steps", "2", "--out", str(out)]) == 0
    assert "per-call rates exclude compile and warm-up" in capsys.readouterr().out
    record = cost_profiles.read_calibration(out)
    assert set(record["programs"]) == set(cost_profiles.PROGRAMS)
    assert all(p["examples_per_s"] > 0 for p in record["programs"].values())
    # A CPU's peak FLOP/s is only nominal, so no MFU is claimed against it (as `doa train` does).
    assert all(p["mfu"] is None for p in record["programs"].values()) and "no real peak" in record["mfu_note"]
    assert record["lengths"] == {"inputs": 8, "targets": 4} and record["batch_size"] == 8
    assert all(record["programs"][p]["run_overhead_s"] >= 0 for p in ("teacher_train", "student_distill_online"))
    assert all(p["startup_s"] > 0 for p in record["programs"].values())   # every program compiled once
    assert record["teacher"]["size"] == "t5_1_1_tiny" and record["device_count"] >= 1 and record["jax_version"]
    assert record["warmup_calls_excluded"] == 1
    assert record["teacher"]["decode_cross_kv"] == record["student"]["decode_cross_kv"] == "cache"   # --cross-kv
    # A run-length mismatch is refused; the matching lengths price from the file.
    assert cli.main(["plan", "--task", "demo", "--teacher", "tiny", "--student", "tiny", "--batch-size", "8",
                     "--start-labels", "16", "--unlabeled", "32", "--calibration", str(out), "--json"]) == 2
    assert "was measured at inputs length 8" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--accelerator", "b200"], "unknown accelerator 'b200'"),
    (["--teacher", "huge"], "unknown model size 'huge'"),
    (["--task", "imagenet"], "no task card"),
    (["--batch-size", "0"], "argument --batch-size: must be a whole number >= 1, got '0'"),
    (["--cross-kv", "keep"], "argument --cross-kv: invalid choice: 'keep'"),
])
def test_bad_calibrate_input_fails_before_any_compute(capsys, argv, message):
    base = {"--accelerator": "cpu", "--teacher": "tiny", "--student": "tiny", "--task": "demo"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    try:
        code = cli.main(["calibrate", *[x for kv in base.items() for x in kv]])
    except SystemExit as e:
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
