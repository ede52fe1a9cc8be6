"""`doa plan` prints each strategy's purchase under a named cost profile, and rejects bad input with one clear line."""
import json

import pytest

from doa_jax import cli
from doa_jax.experiment import cost_profiles
from doa_jax.model import config_for_size

TINY_PARAMS = config_for_size("tiny").num_params()


def _plan(capsys, *argv):
    assert cli.main(["plan", *argv]) == 0
    return capsys.readouterr().out


def test_plan_json_is_one_object_naming_its_profile_and_each_arm(capsys):
    out = json.loads(_plan(capsys, "--task", "wlp", "--start-labels", "1000", "--budget", "100",
                           "--cost-profile", "mfu", "--json"))
    assert out["cost_profile"]["name"] == "mfu" and out["cost_profile"]["assumed"] is True
    assert "ASSUMED 40% MFU" in out["cost_profile"]["source"]
    assert out["annotate"]["labels_bought"] == 384  # $100 / $0.26, less the student's training
    distill = out["distill"]
    assert distill["feasible"] and distill["total_usd"] <= 100.0
    assert distill["teacher_finetune_usd"] > 0 and distill["unlabeled"] > 0 and distill["labels"] == 1000


def test_without_a_calibration_the_paper_prices_and_the_table_says_how_to_calibrate(capsys):
    out = _plan(capsys, "--task", "fever", "--start-labels", "1000", "--budget", "50")
    assert "cost profile: paper: the paper's accounting (A100 fp32 at $1.875/GPU-hour)" in out
    assert "no calibration given" in out and "doa calibrate --accelerator NAME" in out


@pytest.mark.parametrize("task", ["wlp", "fever"])
def test_a_paper_plan_for_a_task_outside_the_fit_says_it_is_an_extrapolation_with_the_loo_error(capsys, task):
    fit = cost_profiles._read_profiles()["paper_rates"]["fit"]
    out = json.loads(_plan(capsys, "--task", task, "--start-labels", "10000", "--unlabeled", "10000",
                           "--cost-profile", "paper", "--json"))
    described = out["cost_profile"]["fit"]
    assert described["status"] == "extrapolation" and task not in described["fitted_tasks"]
    assert described["expected_error"] == {"median": fit["loo_median_abs_residual"],
                                           "max": fit["loo_max_abs_residual"]}
    assert described["note"].startswith(f"EXTRAPOLATION: {task} is not among the 4 tasks")
    assert "fitted" not in described["note"].split("(")[0].replace("fitted to", "")
    table = _plan(capsys, "--task", task, "--start-labels", "10000", "--unlabeled", "10000")
    assert f"expect about ±{fit['loo_median_abs_residual']:.0%} (leave-one-task-out median |error|; up to " \
           f"{fit['loo_max_abs_residual']:.0%})" in table


def test_a_paper_plan_for_a_fitted_task_says_so_with_its_own_errors(capsys):
    nq = cost_profiles._read_profiles()["paper_rates"]["fit"]["per_task"]["nq"]
    out = json.loads(_plan(capsys, "--task", "nq", "--start-labels", "1000", "--unlabeled", "10000", "--json"))
    described = out["cost_profile"]["fit"]
    assert described["status"] == "fitted" and "nq" in described["fitted_tasks"]
    assert described["in_sample_error"] == {"median": nq["in_sample_median"], "max": nq["in_sample_max"]}
    assert described["leave_one_out_error"] == {"median": nq["loo_median"], "max": nq["loo_max"]}


def test_mfu_table_says_assumed_and_names_the_accelerator_and_an_infeasible_reason(capsys):
    out = _plan(capsys, "--task", "fever", "--start-labels", "1000", "--budget", "0.05", "--accelerator", "tpu_v5e",
                "--cost-profile", "mfu")
    assert "ASSUMED 40% MFU of Cloud TPU v5e" in out and "note (ASSUMED MFU)" in out
    assert "INFEASIBLE: fine-tuning the teacher on 1000 labels costs" in out


def test_a_fixed_point_with_a_budget_it_exceeds_is_infeasible(capsys):
    out = json.loads(_plan(capsys, "--task", "nq", "--start-labels", "1000", "--unlabeled", "100000",
                           "--budget", "50", "--json"))
    assert not out["distill"]["feasible"] and "L=1000, U=100000 costs $" in out["distill"]["reason"]
    assert out["annotate"]["feasible"]  # the budget still plans the other arms


def test_when_the_pool_caps_u_the_plan_says_so_and_reports_the_unspent_budget(capsys):
    out = json.loads(_plan(capsys, "--task", "nq", "--start-labels", "1000", "--budget", "100",
                           "--unlabeled-pool", "500", "--json"))
    distill = out["distill"]
    assert distill["unlabeled"] == 500 and "the unlabeled pool (500 inputs) caps U" in distill["note"]
    assert distill["unspent_usd"] == pytest.approx(100 - distill["total_usd"]) and f"${distill['unspent_usd']:.2f}" \
        in distill["note"]


def _calibration(tmp_path, **changes):
    """A hand-made calibration: tiny models on the demo task, batch 8, round throughputs."""
    record = {"format": "doa-calibration/1", "date": "2026-01-01", "jax_version": "0", "device_kind": "cpu",
              "device_count": 1, "accelerator": "toy", "task": "demo",
              "teacher": {"size": "t5_1_1_tiny", "params": config_for_size("tiny", vocab_size=384).num_params()},
              "student": {"size": "t5_1_1_tiny", "params": config_for_size("tiny", vocab_size=384).num_params()},
              "lengths": {"inputs": 40, "targets": 48}, "batch_size": 8,
              "programs": {p: {"examples_per_s": r} for p, r in
                           {"teacher_train": 8.0, "teacher_decode": 16.0, "teacher_score": 32.0, "student_train": 80.0,
                            "student_distill_stored": 40.0, "student_distill_online": 10.0,
                            "eval_decode": 64.0}.items()}}
    record["programs"]["teacher_train"]["run_overhead_s"] = 2.0  # set-up and final checkpoint of a run
    record["programs"]["teacher_decode"]["startup_s"] = 3.0      # its compilation, paid once per run
    record.update(changes)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(record))
    cards = tmp_path / "cards.toml"
    cards.write_text('[accelerators.toy]\nname = "toy"\nusd_per_chip_hour = 3.6\npeak_flops = 1e12\n'
                     'source = "test"\ndate = "-"\n[accelerators.a100]\nname = "A100"\nusd_per_chip_hour = 1.875\n'
                     'peak_flops = 312e12\nsource = "test"\ndate = "-"\n')
    return path, cards


def test_a_calibration_prices_measured_examples_per_second(capsys, tmp_path):
    cal, cards = _calibration(tmp_path)
    out = json.loads(_plan(capsys, "--task", "demo", "--teacher", "tiny", "--student", "tiny", "--batch-size", "8",
                           "--start-labels", "64", "--unlabeled", "80", "--teacher-epochs", "2",
                           "--distill-epochs", "3", "--calibration", str(cal), "--rate-cards", str(cards), "--json"))
    assert out["cost_profile"]["name"] == "calibrated" and str(cal) in out["cost_profile"]["source"]
    d = out["distill"]  # $3.6/h = $0.001 per second
    assert d["teacher_finetune_usd"] == pytest.approx((16 * 8 / 8.0 + 2.0) * 0.001)  # 2 epochs x 8 steps x 8 rows
    assert d["teacher_inference_usd"] == pytest.approx((80 / 16.0 + 3.0 + 80 / 32.0) * 0.001)  # decode + score
    assert d["student_training_usd"] == pytest.approx(30 * 8 / 40.0 * 0.001)     # 3 epochs x 10 steps, stored


@pytest.mark.parametrize("change,argv,message", [
    ({}, ["--student", "small"], "measured for a student of"),
    ({}, ["--accelerator", "a100"], "was measured for accelerator 'toy', not 'a100'"),
    ({"teacher": {"size": "t5_1_1_tiny", "params": config_for_size("tiny", vocab_size=384).num_params(),
                  "dtype": "float32"}}, [],
     "measured with teacher activations in float32, this teacher runs in bfloat16: re-run `doa calibrate --dtype"),
    ({"student": {"size": "t5_1_1_tiny", "params": config_for_size("tiny", vocab_size=384).num_params(),
                  "decode_cross_kv": "recompute"}}, [],
     "timed the student's decode with cross-attention K/V 'recompute', this student decodes with 'cache': "
     "re-run `doa calibrate --cross-kv cache`"),
    ({"lengths": {"inputs": 32, "targets": 48}}, [], "was measured at inputs length 32 (task demo), "
                                                     "this prices 40"),
    ({"batch_size": 16}, [], "measured at batch size 16, this prices 8"),
    ({"programs": {"teacher_train": {"examples_per_s": -1}}}, [], "programs.teacher_train needs"),
    ({"device_count": "one"}, [], "field 'device_count' is missing or not a int"),
    ({"programs": {"teacher_train": {"examples_per_s": 8.0, "run_overhead_s": -1}}}, [],
     "programs.teacher_train.run_overhead_s must be seconds >= 0, got -1"),
    ({"programs": {"eval_decode": {"examples_per_s": 8.0, "startup_s": "slow"}}}, [],
     "programs.eval_decode.startup_s must be seconds >= 0, got 'slow'"),
])
def test_a_calibration_for_something_else_is_refused_naming_the_mismatch(capsys, tmp_path, change, argv, message):
    cal, cards = _calibration(tmp_path, **change)
    code = cli.main(["plan", "--task", "demo", "--teacher", "tiny", "--student", "tiny", "--batch-size", "8",
                     "--start-labels", "64", "--unlabeled", "80", "--calibration", str(cal), "--rate-cards", str(cards),
                     *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_a_corrupt_calibration_file_is_one_clear_error(capsys, tmp_path):
    cal = tmp_path / "cal.json"
    cal.write_text('{"format": "doa-calibration/1", "programs": {')
    assert cli.main(["plan", "--task", "demo", "--start-labels", "64", "--unlabeled", "80",
                     "--calibration", str(cal)]) == 2
    assert f"calibration file {cal} is not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--budget", "-5"], "budget must be a non-negative, finite number of dollars, got '-5'"),
    (["--budget", "lots"], "budget must be a number of dollars, got 'lots'"),
    (["--budget", "inf"], "budget must be a non-negative, finite number of dollars, got 'inf'"),
    (["--budget", "1e308"], "budget $1e+308 is beyond what the planner prices"),
    (["--unlabeled", "-3"], "argument --unlabeled: must be a whole number of inputs >= 0, got '-3'"),
    (["--unlabeled", "many"], "argument --unlabeled: must be a whole number of inputs >= 0, got 'many'"),
    (["--budget", "10", "--unlabeled-grid", "0,10"], "argument --unlabeled-grid: must be comma-separated counts >= 1"),
    (["--budget", "10", "--cost-profile", "magic"], "unknown cost profile 'magic'; profiles: paper, calibrated, mfu"),
    (["--budget", "10", "--cost-profile", "calibrated"], "cost profile 'calibrated' needs a calibration file"),
    (["--budget", "10", "--accelerator", "h100"], "cost profile 'paper' prices the paper's A100s, not 'h100'"),
    (["--budget", "10", "--mfu", "0.5"], "--mfu applies to --cost-profile mfu only"),
    # (a budget that covers the teacher's fine-tuning, $19.92, so that the inference is priced)
    (["--budget", "100", "--soft-targets", "stored"], "cost profile 'paper' has no rate for 'teacher_score'"),
    (["--budget", "10", "--cost-profile", "mfu", "--accelerator", "b200"], "unknown accelerator 'b200'"),
    ([], "give --budget (what an extra budget buys) or --unlabeled U"),
])
def test_bad_input_is_one_clear_message(capsys, argv, message):
    try:
        code = cli.main(["plan", "--task", "wlp", "--start-labels", "1000"] + argv)
    except SystemExit as e:  # argparse rejects malformed flags itself
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1


def test_an_unknown_task_is_one_clear_message(capsys):
    assert cli.main(["plan", "--task", "imagenet", "--start-labels", "1000", "--budget", "10"]) == 2
    assert "no task card" in capsys.readouterr().err
