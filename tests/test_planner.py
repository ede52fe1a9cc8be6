"""Planner arithmetic against hand-computed cases, infeasible cases, bad input."""
import dataclasses

import pytest

from doa_jax import flops
from doa_jax.experiment import costs
from doa_jax.experiment import planner
from doa_jax.model import config_for_size

# A made-up accelerator and round FLOP counts make the arithmetic checkable by hand:
# $3.6/h = $0.001/s; at 50% of 1e12 FLOP/s, one FLOP costs 0.001 / 5e11 = $2e-15.
ACC = costs.Accelerator("toy", "toy", usd_per_chip_hour=3.6, peak_flops=1e12, source="test", date="-")
RECIPE = planner.Recipe(teacher_epochs=3, student_epochs=2, distill_epochs=5, batch_size=1, mfu=0.5)
STUDENT, TEACHER = config_for_size("small"), config_for_size("xxl")


@pytest.fixture
def toy(monkeypatch):
    per_example = {("train", STUDENT): 1e12, ("train", TEACHER): 1e13, ("forward", TEACHER): 2e12,
                   ("forward", STUDENT): 3e11}
    monkeypatch.setattr(flops, "train_flops", lambda cfg, b, i, o: b * per_example[("train", cfg)])
    monkeypatch.setattr(flops, "forward_flops", lambda cfg, b, i, o: b * per_example[("forward", cfg)])
    monkeypatch.setattr(flops, "decoder_token_flops", lambda cfg, b, i, o: 0.0)   # an MFU prices FLOPs alike
    return planner.Planner(ACC, STUDENT, TEACHER, usd_per_label=0.25, recipe=RECIPE)


def test_annotate_buys_the_most_labels_that_fit_with_the_students_fine_tuning(toy):
    # student fine-tune: 2 epochs x 1e12 x $2e-15 = $0.004 per label; start 100 labels: $0.40.
    # (10 - 0.40) // (0.25 + 0.004) = 37 labels.
    p = toy.plan("annotate", start_labels=100, budget_usd=10.0)
    assert (p.feasible, p.labels_bought, p.labels_used) == (True, 37, 137)
    assert p.labels_usd == pytest.approx(9.25) and p.student_training_usd == pytest.approx(0.548)
    assert p.total_usd == pytest.approx(9.798) and p.total_usd <= 10.0


class LabelsOnly(planner.BudgetSearch):
    """Phase prices of nothing but labels at $0.20: the search's arithmetic alone."""

    usd_per_label = 0.2

    def student_finetune_usd(self, labels):
        return 0.0

    teacher_finetune_usd = teacher_inference_usd = distill_usd = student_finetune_usd


def test_annotate_buys_every_label_the_budget_covers_exactly():
    # 750 labels at $0.20 cost exactly $150, though $150 // $0.20 is 749.0 in floating point.
    p = LabelsOnly().plan("annotate", start_labels=1000, budget_usd=150.0)
    assert (p.feasible, p.labels_bought, p.labels_usd, p.unspent_usd) == (True, 750, 150.0, 0.0)


def test_distill_spends_what_the_teacher_leaves_on_unlabeled_inputs(toy):
    # teacher: 100 labels x 3 epochs x 1e13 x $2e-15 = $6.00; left $4.00.
    # per input: inference = decode + scoring = 2 x 2e12 -> $0.008, distillation 5 x 1e12 -> $0.010:
    # 4.00 // 0.018 = 222.
    p = toy.plan("distill", start_labels=100, budget_usd=10.0)
    assert (p.feasible, p.unlabeled_used, p.labels_bought) == (True, 222, 0)
    assert p.teacher_finetune_usd == pytest.approx(6.0)
    assert p.teacher_inference_usd == pytest.approx(1.776) and p.student_training_usd == pytest.approx(2.22)


def test_distill_is_capped_by_the_unlabeled_pool(toy):
    assert toy.plan("distill", 100, 10.0, unlabeled_available=50).unlabeled_used == 50


def test_mixed_splits_the_budget_between_labels_and_compute(toy):
    # labels: $5 buys 20; teacher on 120 labels: $7.20 > $5 left -> infeasible, reason given.
    p = toy.plan("mixed", 100, 10.0, compute_share=0.5)
    assert not p.feasible and "fine-tuning the teacher on 120 labels costs $7.20 > $5.00" in p.reason
    # $10 buys 40 labels; teacher on 140: $8.40; $1.60 left for U inputs and the 140 gold rows:
    # 0.008 U + 0.010 (U + 140) <= 1.60  ->  U = 11.
    ok = toy.plan("mixed", 100, 20.0, compute_share=0.5)
    assert ok.feasible and (ok.labels_bought, ok.unlabeled_used) == (40, 11)
    assert ok.student_training_usd == pytest.approx(0.01 * 151)


def test_budget_below_the_teachers_fine_tuning_is_infeasible_with_its_reason(toy):
    p = toy.plan("distill", 100, 5.0)
    assert not p.feasible and p.reason == "fine-tuning the teacher on 100 labels costs $6.00 > $5.00 available for compute"


def test_budget_below_one_label_is_infeasible_and_says_so(toy):
    p = toy.plan("annotate", 100, 0.6)  # $0.40 trains on the 100 start labels; $0.20 < $0.254
    assert not p.feasible and p.labels_bought == 0
    assert "buys no label" in p.reason and "below one label's cost ($0.250 plus its training)" in p.reason


def test_zero_extra_budget_is_the_start_labels_baseline(toy):
    p = toy.plan("annotate", 100, 0.0)
    assert (p.feasible, p.labels_used, p.labels_bought) == (False, 100, 0)  # $0.40 of training > $0


def test_empty_unlabeled_pool_is_infeasible(toy):
    assert toy.plan("distill", 100, 10.0, unlabeled_available=0).reason == "the unlabeled pool is empty"


@pytest.mark.parametrize("budget", [-1.0, float("nan"), float("inf"), 1e309, "100", True])
def test_bad_budget_is_a_clear_error(toy, budget):
    with pytest.raises(ValueError, match="budget must be a non-negative, finite number of dollars"):
        toy.plan("annotate", 100, budget)


def test_real_flops_price_the_papers_wlp_cell_on_an_a100():
    p = planner.Planner(costs.get_accelerator("a100"), STUDENT, TEACHER, 0.26, planner.Recipe())
    # 1000 labels in batches of 32: 32 steps an epoch (the last padded), 20 epochs = 640 steps.
    teacher_flops = 640 * 32 * flops.train_flops(TEACHER, 1, 128, 8)
    assert p.teacher_finetune_usd(1000) == pytest.approx(teacher_flops / (312e12 * 0.4) / 3600 * 1.875)
    plan = p.plan("distill", 1000, 100.0)
    assert plan.feasible and plan.total_usd <= 100.0


def test_training_is_priced_in_whole_padded_batches(toy):
    batched = planner.Planner(ACC, STUDENT, TEACHER, 0.25, dataclasses.replace(RECIPE, batch_size=32))
    # 33 labels in batches of 32: 2 steps an epoch, 2 epochs = 4 steps of 32 rows at $0.002 a row.
    assert batched.student_finetune_usd(33) == pytest.approx(4 * 32 * 0.002)
    assert batched.student_finetune_usd(32) == pytest.approx(2 * 32 * 0.002)


def test_a_fixed_point_is_priced_phase_by_phase(toy):
    # teacher $6.00 on 100 labels; 50 inputs: inference 50 x $0.008, distillation 50 x $0.010.
    p = toy.price(100, 50)
    assert (p.feasible, p.labels_used, p.unlabeled_used) == (True, 100, 50)
    assert (p.teacher_finetune_usd, p.teacher_inference_usd, p.student_training_usd) == pytest.approx((6.0, 0.4, 0.5))
    assert p.compute_usd == pytest.approx(6.9) and p.budget_usd == pytest.approx(6.9)
    assert toy.price(100, 50, budget_usd=6.0).reason == "L=100, U=50 costs $6.90 > budget $6.00"


@pytest.mark.parametrize("unlabeled", [-1, 2.5, True])
def test_a_fixed_point_needs_a_whole_non_negative_u(toy, unlabeled):
    with pytest.raises(ValueError, match="unlabeled inputs must be a whole number >= 0"):
        toy.price(100, unlabeled)


def test_online_soft_targets_pay_the_teachers_forward_at_every_student_step_and_no_scoring_pass():
    online = planner.Planner(ACC, STUDENT, TEACHER, 0.25, dataclasses.replace(RECIPE, online_kd=True))
    stored = planner.Planner(ACC, STUDENT, TEACHER, 0.25, RECIPE)
    fwd, train = flops.forward_flops(TEACHER, 1, 128, 8), flops.train_flops(STUDENT, 1, 128, 8)
    assert online.teacher_inference_usd(10) == pytest.approx(stored.teacher_inference_usd(10) / 2)
    # 5 epochs x 10 rows x (student step + teacher forward) FLOPs at $2e-15 a FLOP.
    assert online.distill_usd(10) == pytest.approx(50 * (train + fwd) * 2e-15)


def test_u_on_a_grid_is_the_largest_grid_value_the_budget_covers(toy):
    # $4.00 left after the teacher, $0.018 per input: 222 fit, so the grid's 200 is bought, not 300.
    p = toy.plan("distill", 100, 10.0, unlabeled_grid=[100, 200, 300])
    assert p.unlabeled_used == 200 and p.unspent_usd == pytest.approx(4.0 - 200 * 0.018)
    none = toy.plan("distill", 100, 10.0, unlabeled_grid=[300])
    assert not none.feasible and "does not cover the grid's smallest U=300 ($5.40)" in none.reason


def test_a_pool_below_every_grid_value_is_bought_whole_and_the_plan_says_the_pool_caps_u(toy):
    p = toy.plan("distill", 100, 10.0, unlabeled_available=50, unlabeled_grid=[100, 200])
    assert p.unlabeled_used == 50
    assert p.note == "the unlabeled pool (50 inputs) caps U: $3.10 of the budget is unspent"


def test_when_the_pool_caps_u_the_plan_says_so_with_the_unspent_budget(toy):
    p = toy.plan("distill", 100, 10.0, unlabeled_available=50)
    assert p.unlabeled_used == 50 and p.unspent_usd == pytest.approx(4.0 - 50 * 0.018)
    assert p.note == "the unlabeled pool (50 inputs) caps U: $3.10 of the budget is unspent"
    assert toy.plan("distill", 100, 10.0, unlabeled_available=500).note == ""  # the budget, not the pool, binds


def test_plans_carry_the_profile_that_priced_them(toy):
    row = toy.plan("annotate", 100, 10.0).as_row()
    assert row["cost_profile"]["name"] == "mfu" and row["cost_profile"]["assumed"] is True


def test_one_step_of_a_phase_costs_its_share_of_the_phase(toy):
    # The teacher on 100 labels: 3 epochs x 100 steps of batch 1 for $6.00, $0.02 a step.
    work = toy.teacher_finetune_work(100)
    assert work.steps == 300 and toy.step_usd(work) == pytest.approx(0.02)
