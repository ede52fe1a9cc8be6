"""What a run tells: console lines, `metrics.jsonl` rows, TensorBoard events, throughput and MFU.

Step metrics stay on the device (`pending`) until a log, checkpoint or eval step fetches them, so
the loop never waits on the device between steps. A console line also comes every `log_seconds`
between logged steps (the mean loss since the last line, the rate and ETA so far); those lines
are console only (metrics.jsonl keeps its `log_every` rows).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from doa_jax import flops, losses, progress, storage
from doa_jax.model import T5Config
from doa_jax.trainer.config import TrainConfig


class Reporter:
    """A run's outputs; off the chief host only the device bookkeeping runs (nothing is printed
    or written)."""

    def __init__(self, config: TrainConfig, model_config: T5Config, mesh, model_dir: storage.AnyPath, chief: bool,
                 total_steps: int):
        self.config, self.model_config, self.mesh, self.chief = config, model_config, mesh, chief
        self.model_dir, self.total_steps = model_dir, total_steps
        self.loss_unit = losses.loss_unit(config.loss)
        self.pending: list[Any] = []          # step metrics not fetched yet (device arrays)
        self.beat = progress.Heartbeat(config.log_seconds)
        self.meter: Optional[progress.Throughput] = None
        self.log: Optional[progress.MetricsLog] = None
        self.events: Optional[progress.EventWriter] = None

    def say(self, text: str) -> None:
        if self.config.verbose and self.chief:
            print(text, flush=True)

    def start(self, example: Mapping[str, Any], step: int) -> float:
        """Says what runs, starts the throughput meter and opens the chief's metrics log (dropping
        rows after `step`, which run again) and event writer. Returns the seconds of the dropped
        rows (what a kill undid)."""
        cfg = self.config
        in_len, out_len = example["encoder_input_tokens"].shape[1], example["decoder_input_tokens"].shape[1]
        peak, peak_note = progress.peak_flops_per_device(jax.devices()[0].device_kind)
        self.say(f"mesh {dict(self.mesh.shape)}, {progress.params_text(self.model_config.num_params())}, "
                 f"batch {cfg.batch_size} x {cfg.num_microbatches} microbatch(es), {self.total_steps} steps; "
                 f"MFU peak: {peak_note}; loss: {self.loss_unit}; compiling the training step next "
                 f"(minutes for a large model on a CPU), then its first step")
        self.beat.reset()
        self.meter = progress.Throughput(
            flops_per_step=flops.train_flops(self.model_config, cfg.batch_size, in_len, out_len),
            peak_flops_per_device=peak, devices=self.mesh.size, total_steps=self.total_steps,
            examples_per_step=cfg.batch_size, tokens_per_step=cfg.batch_size * (in_len + out_len))
        lost = 0.0
        if self.chief:
            self.log = progress.MetricsLog(self.model_dir / "metrics.jsonl")
            lost = self.log.drop_after(step)    # steps after the resumed checkpoint run again
            self.events = progress.EventWriter(self.model_dir / "tensorboard") if cfg.tensorboard else None
        self.meter.start(step)
        return lost

    def first_step_done(self, metrics: Any, step: int) -> None:
        """Waits for the run's first step (its compile), says so, and restarts the throughput meter
        after it, keeping compilation out of the throughput."""
        jax.block_until_ready(metrics)
        self.say(f"compiled; step {step} done in {self.meter.since_start():.1f} s")
        self.meter.start(step)

    def fetch(self) -> list[dict]:
        """The pending step metrics on the host (and none pending any more)."""
        got, self.pending = jax.device_get(self.pending), []
        return got

    def row(self, got: Sequence[Mapping[str, Any]], step: int) -> dict[str, float]:
        """The metrics row of the fetched steps ending at `step`: means and per-token rates, the
        last step's learning rate and norms, and the throughput since the last row."""
        tokens = sum(float(m["num_tokens"]) for m in got)
        mean = lambda key: float(np.mean([float(m[key]) for m in got]))  # noqa: E731
        row = dict(step=step, loss=mean("loss"),
                   loss_per_token=sum(float(m["nll_sum"]) for m in got) / max(tokens, 1.0),
                   token_accuracy=sum(float(m["correct"]) for m in got) / max(tokens, 1.0),
                   z_loss=mean("z_loss"), **({"kd_loss": mean("kd_loss")} if self.config.loss.kd_weight > 0 else {}),
                   learning_rate=float(got[-1]["learning_rate"]), grad_norm=float(got[-1]["grad_norm"]),
                   param_norm=float(got[-1]["param_norm"]))
        row.update(self.meter.report(step))
        return row

    def emit(self, row: Mapping[str, float], step: int) -> None:
        """Writes a metrics row (log, events, console line)."""
        if self.log is not None:
            self.log.write(row)
        if self.events is not None:
            self.events.scalars(step, {k if k.startswith("eval/") else f"train/{k}": v
                                       for k, v in row.items() if k != "step"})
        if self.config.verbose and self.chief:
            print(progress.console_line(step, self.total_steps, row, self.loss_unit), flush=True)
        self.beat.reset()

    def heartbeat(self, step: int) -> None:
        """A console line between logged steps when `log_seconds` have passed (no metrics row): the
        mean loss of the steps since the last line, the rate and ETA so far."""
        if not (self.pending and self.beat.due()):
            return
        if self.config.verbose and self.chief:
            losses_since = [float(m["loss"]) for m in jax.device_get(self.pending)]
            row = dict(loss=float(np.mean(losses_since)), **self.meter.peek(step))
            n = len(self.pending)
            print(progress.console_line(step, self.total_steps, row, self.loss_unit)
                  + f" | {n} step{'' if n == 1 else 's'} since the last line", flush=True)
        self.beat.reset()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
