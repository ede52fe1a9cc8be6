"""`doa plan --target SLICE`: each arm's chip-hours, the slice's wall time and its dollars on demand and on
spot, from rate cards that name their sources; a price the cards lack comes from the user, never a guess."""
import json

import pytest

from doa_jax import cli
from doa_jax.experiment import costs

WLP_1K = ["--task", "wlp", "--start-labels", "1000", "--budget", "100"]


def _plan(capsys, *argv):
    assert cli.main(["plan", *argv]) == 0
    return capsys.readouterr().out


def _error(capsys, *argv):
    assert cli.main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and len(err.strip().splitlines()) == 1
    return err


def test_a_v5e_8_plan_carries_chip_hours_wall_time_and_both_prices_with_their_source(capsys):
    out = json.loads(_plan(capsys, *WLP_1K, "--target", "v5e-8", "--unlabeled-pool", "3391", "--json"))
    v5e = costs.get_accelerator("tpu_v5e")
    assert out["cost_profile"]["name"] == "mfu" and out["cost_profile"]["assumed"] is True
    assert out["slice"]["chips"] == 8 and "ASSUMED 40% MFU" in out["slice"]["time_source"]
    for arm in ("annotate", "distill", "mixed"):
        row = out[arm]
        assert row["chip_hours"] == pytest.approx(row["compute_usd"] / v5e.usd_per_chip_hour)
        assert row["wall_hours"] == pytest.approx(row["chip_hours"] / 8)
        assert row["on_demand_usd"] == pytest.approx(row["compute_usd"])
        assert row["spot_usd"] is None       # no published spot price in the cards: not guessed
        assert row["price_source"] == f"$1.2/chip-hour: {v5e.source} ({v5e.date})"
    assert out["distill"]["chip_hours"] > 0.1 and out["distill"]["unlabeled"] == 3391
    assert "give one with --spot-usd-per-chip-hour" in out["slice"]["spot_price_source"]


def test_a_spot_price_given_by_the_user_prices_the_same_chip_hours_and_is_named_as_theirs(capsys):
    out = json.loads(_plan(capsys, *WLP_1K, "--target", "v5p-8", "--spot-usd-per-chip-hour", "1.5", "--json"))
    assert out["slice"]["chips"] == 4 and out["slice"]["accelerator"] == "tpu_v5p"   # v5p-8: 8 TensorCores, 4 chips
    distill = out["distill"]
    assert distill["spot_usd"] == pytest.approx(distill["chip_hours"] * 1.5)
    assert distill["wall_hours"] == pytest.approx(distill["chip_hours"] / 4)
    assert out["slice"]["spot_price_source"] == "$1.5/chip-hour: given with --spot-usd-per-chip-hour"


def test_the_table_prints_the_slice_rows_and_says_the_mfu_is_assumed(capsys):
    out = _plan(capsys, *WLP_1K, "--target", "v4-8")
    assert "on v4-8 (4 chips of tpu_v4); time: ASSUMED 40% MFU" in out
    assert "chip-hours" in out and "(ASSUMED MFU)" in out and "spot: no published spot price of tpu_v4" in out


def test_v6e_is_priced_by_its_card_and_by_the_mfu_profile(capsys):
    out = json.loads(_plan(capsys, *WLP_1K, "--target", "v6e-8", "--json"))
    assert out["slice"]["usd_per_chip_hour"] == 2.70 and "Trillium" in out["slice"]["price_source"]
    mfu = json.loads(_plan(capsys, *WLP_1K, "--cost-profile", "mfu", "--accelerator", "tpu_v6e", "--json"))
    assert mfu["cost_profile"]["accelerator"] == "tpu_v6e"


def test_an_accelerator_without_a_card_needs_the_users_price(capsys):
    err = _error(capsys, *WLP_1K, "--target", "h200")
    assert "no rate card prices h200 (target h200)" in err and "--usd-per-chip-hour" in err
    out = json.loads(_plan(capsys, *WLP_1K, "--target", "h200x8", "--usd-per-chip-hour", "10", "--json"))
    assert out["slice"]["chips"] == 8 and out["slice"]["price_source"] == "$10/chip-hour: given with --usd-per-chip-hour"
    assert out["distill"]["on_demand_usd"] == pytest.approx(out["distill"]["chip_hours"] * 10)


@pytest.mark.parametrize("argv, message", [
    (["--target", "v5e-8", "--cost-profile", "paper"], "--target prices compute on the slice's own chips"),
    (["--target", "v5e-8", "--accelerator", "tpu_v5e"], "--target names the accelerator"),
    (["--target", "v7-8"], "unknown target 'v7-8'; valid: v4-{8,16"),
    (["--spot-usd-per-chip-hour", "1"], "price a --target slice: give --target"),
])
def test_bad_slice_input_is_one_clear_line(capsys, argv, message):
    assert message in _error(capsys, *WLP_1K, *argv)


def test_a_spot_price_in_a_card_needs_its_source(tmp_path):
    bad = tmp_path / "cards.toml"
    bad.write_text('[accelerators.tpu_v5e]\nname = "v5e"\nusd_per_chip_hour = 1.2\nsource = "s"\ndate = "d"\n'
                   'spot_usd_per_chip_hour = 0.5\n')
    with pytest.raises(ValueError, match=r"gives spot_usd_per_chip_hour without spot_source and spot_date"):
        costs.load_rate_cards(bad)
