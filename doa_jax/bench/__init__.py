"""Measuring: timed runs on the device at hand (`measure`, `run`, `table`: `doa bench`) and `aot`
(compile a run's real programs for a TPU slice or GPU this host does not have: memory per device,
fits, and the search for what would fit; targets are data, `targets.toml`)."""
