"""Cost profiles: the data they load, the arithmetic they price Work with, and the fit that makes `paper`."""
import importlib.util
import json
import math

import pytest

from doa_jax.experiment import cost_profiles as cp
from doa_jax.experiment import costs

ACC = costs.Accelerator("toy", "toy", usd_per_chip_hour=3.6, peak_flops=1e12, source="test", date="-")


def _fit_script():
    spec = importlib.util.spec_from_file_location("fit_paper_costs", cp.PROFILES_FILE.parents[2] / "scripts" /
                                                  "fit_paper_costs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_paper_rate_charges_flops_at_its_rate_and_steps_scaled_by_parameters():
    rate = cp.Rate(flops_per_s=2e12, seconds_per_step=3.0, reference_params=1000)
    profile = cp.PaperProfile("paper", "test", ACC, rates={"teacher_train": rate})
    # 4e12 FLOPs / 2e12 = 2 s; 10 steps x 3 s x 500/1000 params = 15 s; 17 s at $0.001/s.
    assert profile.usd(cp.Work("teacher_train", rows=320, steps=10, flops=4e12, params=500)) == pytest.approx(0.017)


def test_the_paper_profile_loads_its_fitted_rates_and_the_papers_a100_price():
    paper = cp.load_profile("paper")
    assert paper.accelerator.usd_per_chip_hour == 1.875 and paper.recipe["soft_targets"] == "online"
    assert set(paper.rates) == {"teacher_train", "teacher_decode", "student_distill_online", "student_train",
                                "eval_decode"}
    assert not paper.rates["student_train"].charged and "labels only" in paper.rates["student_train"].why_not
    assert math.isinf(paper.rates["teacher_decode"].flops_per_s)  # decoding: a cost per decoded position
    assert paper.task_lengths("stanceosaurus").inputs > paper.task_lengths("nq").inputs
    assert "max |residual| 22% over 40 points" in paper.source


def test_the_fitted_rates_in_the_data_file_are_what_the_fit_script_computes():
    fit = _fit_script()
    data = cp._read_profiles()
    points = fit.read_points()
    X = [fit.work_features(p, data["paper_lengths"], data["profiles"]["paper"]) for p in points]
    theta = fit.fit(fit.np.array(X), fit.np.array([p["compute_usd"] for p in points]) / (1.875 / 3600),
                    fit.MAX_RESIDUAL)
    paper = cp.load_profile("paper")
    for i, program in enumerate(fit.FITTED):
        rate = paper.rates[program]
        assert rate.seconds_per_step == pytest.approx(theta[2 * i + 1], rel=1e-3)
        assert (0.0 if math.isinf(rate.flops_per_s) else 1 / rate.flops_per_s) == pytest.approx(theta[2 * i], rel=1e-3)


def test_the_mfu_profile_says_it_is_assumed():
    mfu = cp.load_profile("mfu", accelerator="h100", mfu=0.25)
    assert mfu.assumed and mfu.as_dict()["assumed"] is True
    assert mfu.source.startswith("ASSUMED 25% MFU of NVIDIA H100")
    # 989e12 x 0.25 FLOP/s: 989e12 FLOPs take 4 s.
    assert mfu.chip_seconds(cp.Work("teacher_train", 1, 1, 989e12, 1)) == pytest.approx(4.0)


def test_an_unknown_profile_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown cost profile 'cheap'; profiles: paper, calibrated, mfu"):
        cp.load_profile("cheap")


def test_work_of_an_unknown_program_is_refused():
    with pytest.raises(ValueError, match="unknown program 'teacher_dream'"):
        cp.Work("teacher_dream", 1, 1, 1.0, 1)


@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"format": "other/9"}', "field 'date' is missing or not a str"),
])
def test_a_malformed_calibration_file_names_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "cal.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        cp.read_calibration(path)


def test_a_missing_calibration_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="make one with `doa calibrate`"):
        cp.read_calibration(tmp_path / "none.json")


def test_a_calibration_of_another_format_version_is_refused(tmp_path):
    record = {"format": "doa-calibration/0", "date": "d", "jax_version": "0", "device_kind": "cpu", "device_count": 1,
              "accelerator": "cpu", "teacher": {}, "student": {}, "task": "t", "lengths": {}, "batch_size": 8,
              "programs": {}}
    (tmp_path / "cal.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="format 'doa-calibration/0', expected 'doa-calibration/1'"):
        cp.read_calibration(tmp_path / "cal.json")
