"""Rate cards and the ledger: arithmetic by hand, resume safety, clear errors."""
import json


import pytest

from doa_jax.experiment import cost_profiles, costs


def test_rate_cards_carry_the_papers_a100_price_and_a_source_for_every_price():
    cards = costs.load_rate_cards()
    assert cards["a100"].usd_per_chip_hour == 1.875
    assert {"a100", "h100", "tpu_v4", "tpu_v5e", "tpu_v5p", "cpu"} <= set(cards)
    assert all(c.source and c.date for c in cards.values())


def test_unknown_accelerator_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown accelerator 'b200'; known: a100, cpu, h100"):
        costs.get_accelerator("b200")
    assert costs.get_accelerator("TPU-v5e").key == "tpu_v5e"


def test_rate_card_with_a_bad_price_names_the_field(tmp_path):
    bad = tmp_path / "cards.toml"
    bad.write_text('[accelerators.x]\nname="x"\nusd_per_chip_hour=-1\npeak_flops=1e12\nsource="s"\ndate="d"\n')
    with pytest.raises(ValueError, match=r"accelerators.x.usd_per_chip_hour must be a positive number"):
        costs.load_rate_cards(bad)


def test_projected_compute_cost_is_flops_over_peak_times_mfu_times_price():
    a100, cpu = costs.get_accelerator("a100"), costs.get_accelerator("cpu")
    ledger = costs.Ledger(None, measured_on=cpu, profile=cost_profiles.MfuProfile("mfu", "ASSUMED 40%", a100, mfu=0.4))
    # 1e18 FLOPs at 40% of 312 TFLOP/s = 8012.8 s = 2.2258 h; x $1.875 = $4.1734
    work = [cost_profiles.Work("teacher_train", rows=100, steps=4, flops=1e18, params=1)]
    entry = ledger.add_compute("teacher:0-100", "teacher_finetune", seconds=7200.0, flops=1e18, work=work)
    assert entry.usd == pytest.approx(1e18 / (312e12 * 0.4) / 3600 * 1.875)
    assert entry.usd == pytest.approx(4.1734, abs=1e-4)
    # The measured view: 2 h on the CPU card.
    assert entry.measured_usd == pytest.approx(2 * 0.0971)


def test_measured_view_multiplies_seconds_chips_and_rate():
    h100 = costs.get_accelerator("h100")
    ledger = costs.Ledger(None, measured_on=h100, chips=8)
    assert ledger.add_compute("k", "student_training", 900.0, 0.0).usd == pytest.approx(0.25 * 8 * 11.06)


def test_labels_cost_count_times_price_and_totals_split_by_phase():
    ledger = costs.Ledger(None, measured_on=costs.get_accelerator("a100"))
    ledger.add_labels("labels:1000-1500", 500, 0.26)
    ledger.add_compute("s", "student_training", 3600.0, 0.0)
    assert ledger.by_phase()["labels"] == pytest.approx(130.0)
    assert ledger.by_phase()["student_training"] == pytest.approx(1.875)
    assert ledger.total() == pytest.approx(131.875)


def test_a_resumed_run_does_not_count_an_entry_twice(tmp_path):
    path = tmp_path / "ledger.jsonl"
    a100 = costs.get_accelerator("a100")
    first = costs.Ledger(path, measured_on=a100)
    first.add_compute("student:steps0-50", "student_training", 60.0, 0.0)
    resumed = costs.Ledger(path, measured_on=a100)
    resumed.add_compute("student:steps0-50", "student_training", 61.0, 0.0)  # same chunk again
    resumed.add_compute("student:steps50-100", "student_training", 60.0, 0.0)
    assert len(path.read_text().splitlines()) == 2
    assert resumed.total() == pytest.approx(2 * 60 / 3600 * 1.875)


@pytest.mark.parametrize("bad, message", [("not json", "not JSON"), ('{"key": "b", "dollars": 2}', "not a ledger entry"),
                                          ("[1, 2]", "not a ledger entry")])
def test_a_corrupt_ledger_line_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"key": "a", "phase": "labels", "usd": 1.0}\n' + bad + "\n")
    with pytest.raises(ValueError, match=rf"ledger.jsonl:2: {message}"):
        costs.Ledger(path, measured_on=costs.get_accelerator("cpu"))


def test_a_ledger_with_a_cost_profile_prices_the_work_and_names_the_profile(tmp_path):
    from doa_jax.experiment import cost_profiles

    toy = costs.Accelerator("toy", "toy", usd_per_chip_hour=3.6, peak_flops=1e12, source="test", date="-")
    rate = cost_profiles.Rate(flops_per_s=1e12, seconds_per_step=2.0, reference_params=10)
    profile = cost_profiles.PaperProfile("paper", "test", toy, rates={"teacher_train": rate})
    ledger = costs.Ledger(tmp_path / "ledger.jsonl", measured_on=costs.get_accelerator("cpu"), profile=profile)
    work = cost_profiles.Work("teacher_train", rows=64, steps=2, flops=3e12, params=10)
    entry = ledger.add_compute("teacher", "teacher_finetune", seconds=100.0, flops=3e12, work=[work])
    assert entry.usd == pytest.approx((3.0 + 2 * 2.0) * 0.001) and entry.cost_profile == "paper"  # 7 s at $0.001/s
    assert costs.Ledger(tmp_path / "ledger.jsonl", measured_on=toy).entries["teacher"].cost_profile == "paper"
    with pytest.raises(ValueError, match="needs the work done"):
        ledger.add_compute("student", "student_training", seconds=1.0, flops=1e9)


def test_ledger_entries_say_whether_compute_was_assumed_or_measured():
    cpu, a100 = costs.get_accelerator("cpu"), costs.get_accelerator("a100")
    projected = costs.Ledger(None, measured_on=cpu, profile=cost_profiles.MfuProfile("mfu", "ASSUMED", a100, mfu=0.4))
    assumed = projected.add_compute("a", "teacher_finetune", 1, 1e12,
                                    work=[cost_profiles.Work("teacher_train", 1, 1, 1e12, 1)])
    measured = costs.Ledger(None, measured_on=cpu).add_compute("a", "teacher_finetune", 1, 1e12)
    assert (assumed.cost_profile, measured.cost_profile) == ("mfu", "measured")


def test_a_ledger_line_torn_by_a_kill_is_dropped_and_the_ledger_reopens(tmp_path):
    acc = costs.get_accelerator("cpu")
    path = tmp_path / "ledger.jsonl"
    ledger = costs.Ledger(path, measured_on=acc)
    ledger.add_compute("teacher_finetune:k", "teacher_finetune", 10.0, 1e9)
    with open(path, "a") as f:
        f.write('{"key": "teacher_inference:k", "phase": "teacher_inf')       # a kill mid-write
    again = costs.Ledger(path, measured_on=acc)
    assert list(again.entries) == ["teacher_finetune:k"]
    again.add_compute("teacher_inference:k", "teacher_inference", 2.0, 1e8)
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["teacher_finetune:k",
                                                                                 "teacher_inference:k"]


def test_compute_lost_to_a_kill_is_measured_but_not_charged(tmp_path):
    ledger = costs.Ledger(tmp_path / "ledger.jsonl", measured_on=costs.get_accelerator("cpu"))
    ledger.add_compute("student_training:k:40", "student_training", 36.0, 1e9)
    ledger.add_lost("lost:student_training:k", "student_training", 18.0)
    assert ledger.total() == pytest.approx(costs.get_accelerator("cpu").usd(36.0))          # the budget's view
    assert ledger.measured_total() == pytest.approx(costs.get_accelerator("cpu").usd(54.0))  # what it really cost
    assert ledger.add_lost("lost:none", "student_training", 0.0) is None


def test_the_measured_view_is_priced_on_the_jobs_own_devices_and_an_unknown_kind_is_named(monkeypatch):
    card, chips = costs.job_accelerator(None)
    assert (card.key, chips) == ("cpu", 1)          # one host, whatever its (8 fake) CPU devices
    assert costs.job_accelerator("tpu_v5e")[0].key == "tpu_v5e"      # MEASURED_ON overrides

    class Device:
        device_kind, platform = "Imaginary Accelerator 9000", "gpu"

    monkeypatch.setattr(costs.jax, "devices", lambda: [Device()] * 4)
    with pytest.raises(ValueError, match=r"this job runs on 4 x 'Imaginary Accelerator 9000', which has no rate card"):
        costs.job_accelerator(None)
