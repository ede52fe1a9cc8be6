"""`doa plan` prints each strategy's purchase, and rejects bad input with one clear line."""
import json

import pytest

from doa_jax import cli


def test_plan_prints_labels_bought_and_phase_costs(capsys):
    assert cli.main(["plan", "--task", "wlp", "--start-labels", "1000", "--budget", "100", "--json"]) == 0
    plans = {p["strategy"]: p for p in json.loads(capsys.readouterr().out)}
    assert plans["annotate"]["labels_bought"] == 384  # $100 / $0.26, less the student's training
    assert plans["distill"]["feasible"] and plans["distill"]["total_usd"] <= 100.0
    assert plans["distill"]["teacher_finetune_usd"] > 0 and plans["distill"]["unlabeled_used"] > 0


def test_plan_table_names_the_accelerator_and_an_infeasible_reason(capsys):
    cli.main(["plan", "--task", "fever", "--start-labels", "1000", "--budget", "0.05", "--accelerator", "tpu_v5e"])
    out = capsys.readouterr().out
    assert "Cloud TPU v5e" in out and "INFEASIBLE: fine-tuning the teacher on 1000 labels costs" in out


@pytest.mark.parametrize("argv,message", [
    (["--task", "wlp", "--budget", "-5"], "budget must be a non-negative number of dollars"),
    (["--task", "wlp", "--budget", "lots"], "budget must be a number of dollars, got 'lots'"),
    (["--task", "wlp", "--budget", "10", "--accelerator", "b200"], "unknown accelerator 'b200'"),
    (["--task", "imagenet", "--budget", "10"], "no task card"),
])
def test_bad_input_is_one_clear_message(capsys, argv, message):
    try:
        code = cli.main(["plan", "--start-labels", "1000"] + argv)
    except SystemExit as e:  # argparse rejects malformed flags itself
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
