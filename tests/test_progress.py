"""Progress reporting: the console line, MFU's peak table, and TensorBoard event files."""
import pytest

from doa_jax import progress


def test_console_line_shows_step_loss_rates_mfu_and_eta_with_the_losses_units():
    line = progress.console_line(120, 1000, dict(loss=535.4567, learning_rate=1e-3, examples_per_s=310.24,
                                                 tokens_per_s=40123.0, mfu=0.1234, eta_s=312.4,
                                                 **{"eval/loss": 1.5}), "sum over the batch's target tokens")
    assert line == ("step 120/1000 | loss 535.4567 (sum over the batch's target tokens) | lr 1.0e-03 | 310.2 ex/s | "
                    "40.1k tok/s | MFU 12.3% | ETA 0:05:12 | eval/loss 1.5 (per target token)")


@pytest.mark.parametrize("factor,kd_exact,unit", [
    (None, False, "sum over the batch's target tokens"),          # T5X's default: a sum, not per token
    ("NUM_REAL_TARGET_TOKENS", False, "per target token"),
    (233472, False, "sum over the batch's target tokens / 233472"),
    ("NUM_REAL_TARGET_TOKENS", True, "per padded target position"),   # the released KD reduction
])
def test_the_training_loss_unit_follows_its_normalisation(factor, kd_exact, unit):
    from doa_jax.losses import LossConfig, loss_unit

    cfg = LossConfig(loss_normalizing_factor=factor, kd_weight=1.0 if kd_exact else 0.0, kd_paper_exact=kd_exact)
    assert loss_unit(cfg) == unit


def test_peak_flops_table():
    assert progress.peak_flops_per_device("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert progress.peak_flops_per_device("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert progress.peak_flops_per_device("TPU v4")[0] == 275e12
    assert progress.peak_flops_per_device("TPU v5 lite")[0] == 197e12
    assert progress.peak_flops_per_device("TPU v5p")[0] == 459e12
    peak, note = progress.peak_flops_per_device("cpu")
    assert peak is None and "nominal" in note and "no MFU" in note   # the CPU's peak is only nominal
    assert progress.peak_flops_per_device("Quantum QPU")[0] is None


def test_mfu_is_model_flops_per_second_over_the_datasheet_peak_of_every_device_in_use():
    h100, _ = progress.peak_flops_per_device("NVIDIA H100 80GB HBM3")
    assert progress.mfu(4e14, h100, devices=2) == pytest.approx(4e14 / (2 * 989e12))
    assert progress.mfu(4e14, progress.peak_flops_per_device("cpu")[0], devices=2) is None


def test_one_peak_table_serves_progress_the_bench_and_the_rate_cards():
    from doa_jax import hardware
    from doa_jax.bench import measure
    from doa_jax.experiment import costs

    cards = costs.load_rate_cards()
    for key, card in cards.items():
        assert card.peak_flops == hardware.get(key).peak_flops
    assert progress.peak_flops_per_device("NVIDIA H200")[0] == hardware.get("h200").peak_flops
    # The bench's measured matmul rate (floors, `matmul_peak_fraction`; not MFU) where the table has one.
    assert measure.matmul_peak("NVIDIA H200")[0] == hardware.get("h200").measured_peak_flops == 798e12
    assert measure.bandwidth("NVIDIA H200") == 4.3e12 and measure.bandwidth("cpu") is None


def test_event_files_are_read_by_tensorflow(tmp_path):
    assert progress.crc32c(b"123456789") == 0xE3069283   # the CRC-32C check value
    writer = progress.EventWriter(tmp_path)
    writer.scalars(5, {"train/loss": 1.5, "train/learning_rate": 1e-3})
    writer.scalars(10, {"eval/loss": 0.75, "note": "not a number"})
    writer.close()
    tf = pytest.importorskip("tensorflow")
    events = [(e.step, [(v.tag, round(v.simple_value, 6)) for v in e.summary.value])
              for e in tf.compat.v1.train.summary_iterator(str(writer.path))]
    assert events == [(0, []), (5, [("train/loss", 1.5), ("train/learning_rate", 0.001)]),
                      (10, [("eval/loss", 0.75)])]


def test_parameter_counts_read_in_their_own_unit():
    # the tiny T5X fixture, T5 v1.1 Small, and a toy: never "0.0M params"
    assert [progress.params_text(n) for n in (22_976, 76_961_152, 512)] == [
        "22.98k params", "76.96M params", "512 params"]
