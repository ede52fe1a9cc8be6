"""Planner arithmetic against hand-computed cases, infeasible cases, bad input."""
import pytest

from doa_jax import costs, flops, planner
from doa_jax.model import config_for_size

# A made-up accelerator and round FLOP counts make the arithmetic checkable by hand:
# $3.6/h = $0.001/s; at 50% of 1e12 FLOP/s, one FLOP costs 0.001 / 5e11 = $2e-15.
ACC = costs.Accelerator("toy", "toy", usd_per_chip_hour=3.6, peak_flops=1e12, source="test", date="-")
RECIPE = planner.Recipe(teacher_epochs=3, student_epochs=2, distill_epochs=5, mfu=0.5)
STUDENT, TEACHER = config_for_size("small"), config_for_size("xxl")


@pytest.fixture
def toy(monkeypatch):
    per_example = {("train", STUDENT): 1e12, ("train", TEACHER): 1e13, ("forward", TEACHER): 2e12,
                   ("forward", STUDENT): 3e11}
    monkeypatch.setattr(flops, "train_flops", lambda cfg, b, i, o: b * per_example[("train", cfg)])
    monkeypatch.setattr(flops, "forward_flops", lambda cfg, b, i, o: b * per_example[("forward", cfg)])
    return planner.Planner(ACC, STUDENT, TEACHER, usd_per_label=0.25, recipe=RECIPE)


def test_annotate_buys_the_most_labels_that_fit_with_the_students_fine_tuning(toy):
    # student fine-tune: 2 epochs x 1e12 x $2e-15 = $0.004 per label; start 100 labels: $0.40.
    # (10 - 0.40) // (0.25 + 0.004) = 37 labels.
    p = toy.plan("annotate", start_labels=100, budget_usd=10.0)
    assert (p.feasible, p.labels_bought, p.labels_used) == (True, 37, 137)
    assert p.labels_usd == pytest.approx(9.25) and p.student_training_usd == pytest.approx(0.548)
    assert p.total_usd == pytest.approx(9.798) and p.total_usd <= 10.0


def test_distill_spends_what_the_teacher_leaves_on_unlabeled_inputs(toy):
    # teacher: 100 labels x 3 epochs x 1e13 x $2e-15 = $6.00; left $4.00.
    # per input: inference 2e12 -> $0.004, distillation 5 x 1e12 -> $0.010: 4.00 // 0.014 = 285.
    p = toy.plan("distill", start_labels=100, budget_usd=10.0)
    assert (p.feasible, p.unlabeled_used, p.labels_bought) == (True, 285, 0)
    assert p.teacher_finetune_usd == pytest.approx(6.0)
    assert p.teacher_inference_usd == pytest.approx(1.14) and p.student_training_usd == pytest.approx(2.85)


def test_distill_is_capped_by_the_unlabeled_pool(toy):
    assert toy.plan("distill", 100, 10.0, unlabeled_available=50).unlabeled_used == 50


def test_mixed_splits_the_budget_between_labels_and_compute(toy):
    # labels: $5 buys 20; teacher on 120 labels: $7.20 > $5 left -> infeasible, reason given.
    p = toy.plan("mixed", 100, 10.0, compute_share=0.5)
    assert not p.feasible and "fine-tuning the teacher on 120 labels costs $7.20 > $5.00" in p.reason
    ok = toy.plan("mixed", 100, 20.0, compute_share=0.5)  # 40 labels; teacher $8.40; gold student $0.56
    assert ok.feasible and ok.labels_bought == 40
    assert ok.unlabeled_used == 74  # (20 - 10 - 8.40 - 0.56) // 0.014


def test_budget_below_the_teachers_fine_tuning_is_infeasible_with_its_reason(toy):
    p = toy.plan("distill", 100, 5.0)
    assert not p.feasible and p.reason == "fine-tuning the teacher on 100 labels costs $6.00 > $5.00 available for compute"


def test_budget_below_one_label_buys_none_and_says_so(toy):
    p = toy.plan("annotate", 100, 0.6)  # $0.40 trains on the 100 start labels; $0.20 < $0.254
    assert p.feasible and p.labels_bought == 0 and "is below one label's cost ($0.250 + $0.0040" in p.reason


def test_empty_unlabeled_pool_is_infeasible(toy):
    assert toy.plan("distill", 100, 10.0, unlabeled_available=0).reason == "the unlabeled pool is empty"


@pytest.mark.parametrize("budget", [-1.0, float("nan"), "100"])
def test_bad_budget_is_a_clear_error(toy, budget):
    with pytest.raises(ValueError, match="budget must be a non-negative number of dollars"):
        toy.plan("annotate", 100, budget)


def test_real_flops_price_the_papers_wlp_cell_on_an_a100():
    p = planner.Planner(costs.get_accelerator("a100"), STUDENT, TEACHER, 0.26, planner.Recipe())
    teacher_flops = 1000 * 20 * flops.train_flops(TEACHER, 1, 128, 8)
    assert p.teacher_finetune_usd(1000) == pytest.approx(teacher_flops / (312e12 * 0.4) / 3600 * 1.875)
    plan = p.plan("distill", 1000, 100.0)
    assert plan.feasible and plan.total_usd <= 100.0
