"""`doa aot`: the project's programs compiled for TPU slices and NVIDIA GPUs this CPU host lacks.

The target table agrees with hardware.toml and with the compilers (the TPU compiler's own capacity),
peaks are XLA's figures for the trainer's own programs, a program that does not fit is reported so
by both compilers, the search turns a case built not to fit into one that fits, and bad input is
one line. Programs are tiny (seconds to compile); the whole cell path is marked slow.
"""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from doa_jax import flops, hardware, partitioning, platforms, trainer
from doa_jax.bench import aot, recipes, search, targets
from doa_jax.cli import main
from doa_jax.model import config_for_size
from doa_jax.optimizers import OptimizerConfig
from doa_jax.trainer import TrainConfig, Trainer

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(targets.aot_available("tpu") or targets.aot_available("cuda"),
                                reason="needs the aot extra (libtpu and the CUDA plugin): pip install -e '.[aot]'")

# The smallest program that overflows each TPU's HBM: a tiny model's greedy decode, whose float32
# logits per step are batch x 32128 x 4 bytes (2^17 rows: 16 GiB).
OVERFLOWING_DECODE = {"v5e-1": 2 ** 17, "v6e-1": 2 ** 18, "v4-8": 2 ** 20, "v5p-8": 2 ** 22}   # over 4 devices


def _decode(batch, mesh=(-1, 1)):
    return recipes.recipe_programs(recipes.Recipe(size="tiny", phase="decode", batch=batch, lengths=(16, 8), mesh=mesh))


# ----------------------------------------------------------------------------- the target table

def test_slice_names_count_tensorcores_for_v4_and_v5p_and_chips_for_v5e_and_v6e():
    assert (targets.get("v4-8").chips, targets.get("v5p-8").chips) == (4, 4)
    assert (targets.get("v5e-8").chips, targets.get("v6e-256").chips) == (8, 256)
    assert targets.get("H100x8").devices_count == 8 and targets.get("h100").devices_count == 1
    assert targets.get("v5e-8").next_larger == "v5e-16" and targets.get("h100x8").next_larger == "h100x16"
    assert targets.get("v5e-256").next_larger is None


@pytest.mark.parametrize("name", ["v4-8", "v5p-8", "v5e-1", "v6e-8", "a100-40", "a100-80x2", "h100", "h200", "b200"])
def test_every_family_builds_compile_only_devices_that_hardware_toml_knows(name):
    target = targets.get(name)
    devices = target.devices()
    assert len(devices) == target.devices_count
    # The compile-only device kind finds the same accelerator (peak FLOP/s) the table names.
    assert hardware.for_device_kind(devices[0].device_kind).key == target.hardware_key
    assert target.hardware.peak_flops > 0 and target.bandwidth > 1e11 and target.capacity_gib > 10


def test_every_listed_target_parses():
    for name in targets.names():
        assert targets.get(name).name == name


def test_gpu_capacity_is_the_jax_clients_share_of_the_device(monkeypatch):
    assert targets.get("h100").capacity_gib == pytest.approx(0.75 * 84942979072 / 2 ** 30)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert targets.get("h200").capacity_gib == pytest.approx(0.9 * 151397597184 / 2 ** 30)


@pytest.mark.parametrize("name", sorted(OVERFLOWING_DECODE))
def test_the_tpu_tables_usable_hbm_is_what_the_compiler_allows(name):
    target = targets.get(name)
    (row,) = aot.compile_all(_decode(OVERFLOWING_DECODE[name]), target)
    assert row["fits"] is False and row["refusal"]
    assert row["compiler_capacity_gib"] == target.capacity_gib
    assert row["peak_gib"] > target.capacity_gib


# ----------------------------------------------------------------------------- compiling

def test_a_train_step_for_a_tpu_slice_reports_xlas_memory_of_the_trainers_own_program():
    target = targets.get("v5e-4")
    recipe = recipes.Recipe(size="tiny", phase="train", batch=8, lengths=(16, 8), mesh=(2, 2), optimizer="adafactor")
    (row,) = aot.compile_all(recipes.recipe_programs(recipe), target)
    assert row["device_kind"] == "TPU v5 lite" and row["mesh"] == [2, 2] and row["fits"] is True
    assert row["peak_gib"] == pytest.approx(row["argument_gib"] + row["output_gib"] - row["alias_gib"]
                                            + row["temp_gib"])
    assert row["alias_gib"] > 0          # the train state is donated
    # The Trainer builds the same program on that mesh; XLA reports the same sizes for it.
    cfg = config_for_size("tiny")
    tr = Trainer(cfg, TrainConfig(model_dir="unused", batch_size=8, train_steps=1, optimizer=OptimizerConfig(
        name="adafactor"), mesh=partitioning.MeshConfig(data=2, model=2)), devices=target.devices())
    prog = tr._program()
    params, opt = prog.abstract_state()
    state = trainer.TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=prog.state_shardings.step), params, opt)
    data = partitioning.data_sharding(prog.mesh)
    batch = {k: jax.ShapeDtypeStruct((8, n), d, sharding=data) for k, n, d in (
        ("encoder_input_tokens", 16, jnp.int32), ("decoder_input_tokens", 8, jnp.int32),
        ("decoder_target_tokens", 8, jnp.int32), ("decoder_loss_weights", 8, jnp.float32))}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=partitioning.replicated(prog.mesh))
    with partitioning.mesh_context(prog.mesh, prog.rules), platforms.compilation_cache_off():
        compiled = prog.train_step.lower(state, batch, rng).compile()
    assert aot.memory_fields(compiled)["peak_gib"] == pytest.approx(row["peak_gib"], rel=1e-9)


def test_a_decode_for_a_gpu_reports_fits_flops_and_a_roofline_bound(capsys):
    assert main(["aot", "--target", "h100x2", "--size", "tiny", "--phase", "decode", "--batch", "64",
                 "--lengths", "16,8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["target"], report["devices"], report["device_kind"]) == ("h100x2", 2, "NVIDIA H100 80GB HBM3")
    (row,) = report["programs"]
    assert row["phase"] == "decode" and row["fits"] is True and row["mesh"] == [2, 1]
    assert row["capacity_gib"] == pytest.approx(59.33, abs=0.01) and row["margin_gib"] > 59
    # The bound: every FLOP at the datasheet peak on both GPUs, or the per-step bytes at the bandwidth.
    assert row["bound_s"] >= row["flops"] / (2 * 989e12)


def test_a_gpu_program_over_capacity_is_reported_not_fitting_and_the_search_halves_the_batch(capsys):
    # The GPU compiler compiles a program larger than the device; the verdict is the tool's.
    assert main(["aot", "--target", "h100", "--size", "tiny", "--phase", "decode", "--batch", str(2 ** 19),
                 "--lengths", "16,8", "--search", "--max-compiles", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (row,) = report["programs"]
    assert row["fits"] is False and row["peak_gib"] > row["capacity_gib"] and "refusal" not in row
    best = report["suggestions"][0]
    assert best["fits"] is True and best["batch"] == 2 ** 18 and best["target"] == "h100"
    assert best["changes"] == {"batch": 2 ** 18} and best["peak_gib"] < row["capacity_gib"]


def test_the_search_prefers_the_same_target_and_skips_what_cannot_fit_without_compiling():
    program = recipes.recipe_programs(recipes.Recipe(size="xxl", phase="train", batch=8, optimizer="adamw"))[0]
    target = targets.get("h100")
    found = search.candidates(program, target)
    base = search._settings(program)
    first = found[0]
    assert first.target == "h100" and search.invasiveness(first, base) == 0
    assert [c.target for c in found[-3:]] == ["h100x8"] * 3          # up to three slices larger, last
    # fp32 AdamW XXL state is 3 x 44.5 GB: no setting keeping it fits one H100's 59 GiB, so none is compiled.
    layout = aot.Layout(program, target.devices())
    assert aot.state_bytes_per_device(program, layout) / 2 ** 30 > target.capacity_gib


@pytest.mark.slow   # two GPU compiles (~20 s on 2 idle cores)
def test_the_fused_update_keeps_a_layers_gradients_at_a_time_and_needs_less_than_the_plain_step():
    # Wide layers, few tokens: gradients (float32, like the params) dominate the temporaries. The plain
    # scanned step holds a stack's gradients at once (measured: 0.63 of the params); the fused one a layer's.
    model = config_for_size("tiny", emb_dim=256, num_heads=4, head_dim=64, mlp_dim=1024, num_encoder_layers=8,
                            num_decoder_layers=8, vocab_size=128, scan_layers=True, remat_policy="full")
    target = targets.get("h100")
    rows = [aot.compile_program(aot.Program(f"fused={fused}", "train", "train", model, 2, (16, 8), train=aot.TrainSpec(
        optimizer=OptimizerConfig(name="adafactor"), fused_update=fused)), target, target.devices()) for fused in (False, True)]
    params_gib = model.num_params() * 4 / 2 ** 30
    assert rows[0]["temp_gib"] > 0.5 * params_gib                    # the plain step: a whole stack's gradients
    assert rows[1]["temp_gib"] < 0.2 * params_gib                    # the fused: a layer's (16 layers)
    assert rows[1]["peak_gib"] < rows[0]["peak_gib"] - 0.4 * params_gib
    assert rows[1]["fused_update"] is True and rows[1]["alias_gib"] == pytest.approx(rows[1]["argument_gib"], rel=0.01)


def test_on_a_target_of_several_hosts_the_teachers_inference_compiles_on_one_hosts_chips():
    # v5e-16: 4 hosts of 4 chips. The train step spans all 16 (model axis 4); the teacher's decode, as a
    # multi-host cell runs it, each host alone on its 4 chips (the same model axis, data 1).
    mesh = partitioning.MeshConfig(model=4)
    train = recipes.recipe_programs(recipes.Recipe(size="tiny", phase="train", batch=16, lengths=(16, 8), mesh=(-1, 4),
                                                   optimizer="adafactor"))[0]
    decode = aot.Program("teacher_decode", "decode", "decode", config_for_size("tiny"), 8, (16, 8), mesh, per_host=True)
    rows = aot.compile_all([train, decode], targets.get("v5e-16"))
    assert [r["mesh"] for r in rows] == [[4, 4], [1, 4]] and all(r["fits"] for r in rows)
    assert aot.placed(decode, targets.get("v5e-8"))[0] is decode      # one host: as it is
    assert targets.one_host(targets.get("v4-16")).name == "v4-8" and rows[1]["target"] == "v5e-4"


@pytest.mark.slow   # six compiles (~50 s on 2 idle cores)
def test_scanned_layers_are_differentiated_the_way_each_platforms_compiler_needs_least_for():
    # scan_backward='auto' is lowered as JAX's transposed scan for a TPU and as the stack's own loop for a
    # GPU: the same programs, so the same memory, as naming each; and each platform's choice needs less.
    model = config_for_size("tiny", emb_dim=256, num_heads=4, head_dim=64, mlp_dim=1024, num_encoder_layers=4,
                            num_decoder_layers=4, vocab_size=128, scan_layers=True, remat_policy="full")

    def temp_gib(target, mesh, backward):
        program = aot.Program(backward, "train", "train", model.replace(scan_backward=backward), 8, (64, 16),
                              partitioning.MeshConfig(data=mesh[0], model=mesh[1]),
                              train=aot.TrainSpec(optimizer=OptimizerConfig(name="adafactor")))
        return aot.compile_program(program, targets.get(target), targets.get(target).devices())["temp_gib"]

    for target, mesh, best, other in (("v5e-4", (1, 4), "autodiff", "stack"), ("h100", (1, 1), "stack", "autodiff")):
        auto = temp_gib(target, mesh, "auto")
        assert auto == temp_gib(target, mesh, best) < temp_gib(target, mesh, other), target


def test_the_search_offers_the_fused_update_first_and_scans_the_layers_for_it():
    program = recipes.recipe_programs(recipes.Recipe(size="xxl", phase="train", batch=8, optimizer="adafactor", mesh=(1, 1)))[0]
    target = targets.get("h100")
    base = search._settings(program)
    fused = [c for c in search.candidates(program, target)
             if c.target == "h100" and search.changes(c, base) == {"fused_update": True}]
    assert len(fused) == 1 and search.invasiveness(fused[0], base) == 1       # keeps the recipe's math
    variant = search.apply(program, fused[0].knobs)
    assert variant.model.scan_layers and variant.train.fused_update
    layout = aot.Layout(variant, target.devices())
    plain = search.apply(program, {**base, "fused_update": False})
    plain = dataclasses.replace(plain, model=plain.model.replace(scan_layers=True))
    # Its floor is the state alone; the plain scanned step's floor adds the float32 gradient tree (41.5 GiB).
    assert aot.least_peak_bytes(variant, layout) == aot.state_bytes_per_device(variant, layout)
    assert (aot.least_peak_bytes(plain, layout) - aot.least_peak_bytes(variant, layout)) / 2 ** 30 > 40


@pytest.mark.slow   # two GPU compiles of T5 Small's decode (~20 s on 2 idle cores)
def test_recomputing_the_decodes_cross_kv_saves_the_cross_cache_and_pays_its_flops_at_every_step():
    def decode(mode):
        (program,) = recipes.recipe_programs(recipes.Recipe(size="small", phase="decode", batch=4096, lengths=(64, 8),
                                                            cross_kv=mode))
        return program, aot.compile_program(program, targets.get("h100"), targets.get("h100").devices())
    (cached, a), (recomputed, b) = decode("cache"), decode("recompute")
    saved = (flops.decode_cache_bytes(cached.model, 4096, 64, 8)
             - flops.decode_cache_bytes(recomputed.model, 4096, 64, 8)) / 2 ** 30          # 2.75 GiB
    assert a["peak_gib"] - b["peak_gib"] > 0.5 * saved
    # The 8 steps project the encoder output 8 times instead of once: 7 more x 2 x 4096 x 64 x (8 layers x 2 x 512
    # x 384) FLOPs (the formula; the peaks above are the compiled programs').
    assert b["flops"] - a["flops"] == pytest.approx(7 * 2 * 4096 * 64 * 8 * 2 * 512 * 384, rel=1e-9)


def test_the_search_halves_a_decodes_batch_before_it_recomputes_the_cross_kv():
    (program,) = recipes.recipe_programs(recipes.Recipe(size="xxl", phase="decode", batch=256, lengths=(512, 128)))
    base = search._settings(program)
    order = [search.changes(c, base) for c in search.candidates(program, targets.get("h100")) if c.target == "h100"]
    assert order.index({"batch": 128}) < order.index({"decode_cross_kv": "recompute"})
    variant = search.apply(program, {**base, "decode_cross_kv": "recompute"})
    assert variant.model.decode_cross_kv == "recompute" and variant.batch == 256


# ----------------------------------------------------------------------------- refusals and bad input

def test_the_tpu_compilers_refusals_are_parsed():
    temps = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
             "(42.67G) exceeds available HBM (15.75G).")
    total = "XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 215.17G of 31.25G hbm."
    assert aot.parse_refusal(temps) == {"needs_gib": 42.67, "of_gib": 15.75, "counted": "temporaries",
                                        "text": temps}
    assert aot.parse_refusal(total)["needs_gib"] == 215.17 and aot.parse_refusal(total)["counted"] == "total"
    assert aot.parse_refusal("INVALID_ARGUMENT: shapes differ") is None


@pytest.mark.parametrize("argv, message", [
    (["--target", "v5e-3"], "unknown target 'v5e-3': v5e slices are v5e-{1,4,8,16,32,64,128,256}"),
    (["--target", "tpu9"], "unknown target 'tpu9'; valid: v4-{8,16"),
    (["--target", "v5e-8", "--mesh", "2,2"], "mesh 2 (data) x 2 (model) uses 4 of the target's 8 devices"),
    (["--target", "v5e-8", "--mesh", "1,3"], "model axis 3 must be a positive divisor of the 8 devices"),
    (["--target", "v5e-8", "--mesh", "4,2", "--batch", "6"], "batch size 6 is not divisible by the mesh's data axis (4)"),
    (["--target", "h100", "--fused-update"], "FUSED_UPDATE needs scanned layers (T5Config.scan_layers = True)"),
    (["--target", "h100", "--fused-update", "--scan", "--microbatches", "2"], "FUSED_UPDATE does not take microbatches"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(["aot", "--size", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_phase_the_cell_does_not_have_is_named(capsys):
    argv = ["aot", "--target", "v5e-8", "--phase", "score", "--gin_file", "runs/experiment.gin",
            "--gin_file", "experiments/wlp_1k_plus100_annotate.gin", "--gin.OUTPUT_DIR=/tmp/unused",
            "--gin.VOCABULARY=None", "--gin.MODEL_VOCAB_SIZE=32128"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--phase score: the cell (wlp annotate +$100, strategy annotate) has no such phase; it has decode, train" in err


def test_without_the_extra_it_names_the_extra(monkeypatch):
    monkeypatch.setattr(targets.importlib.util, "find_spec", lambda name: None)
    assert 'pip install -c constraints.txt -e ".[aot]"' in targets.aot_available("tpu")
    assert "jax-cuda12-pjrt" in targets.aot_available("cuda")


def test_generated_gpu_target_configs_hold_the_described_device():
    text = targets.target_config("h200")
    assert 'name: "NVIDIA H200 141GB HBM3e"' in text and "device_memory_size: 151397597184" in text
    assert "feature_extension: ACCELERATED_FEATURES" in text and "rate_infos {" in text


# ----------------------------------------------------------------------------- a cell's programs

@pytest.mark.slow   # five tiny programs compiled for a TPU slice (~40 s on 2 busy cores)
def test_a_cells_gin_compiles_every_phase_with_its_models_lengths_and_each_models_layout(capsys):
    argv = ["aot", "--target", "v5e-4", "--json", "--gin_file", "runs/experiment.gin",
            "--gin_file", "experiments/wlp_1k_plus100_distill.gin", "--gin_file", "protocols/paper.gin",
            "--gin.OUTPUT_DIR=/tmp/unused", "--gin.VOCABULARY=None", "--gin.MODEL_VOCAB_SIZE=256",
            "--gin.TEACHER_SIZE='tiny'", "--gin.STUDENT_SIZE='tiny'", "--gin.BATCH_SIZE=8",
            "--gin.TEACHER_MESH_MODEL=2", "--gin.TEACHER_DECODE_BATCH=8"]
    assert main(argv) == 0
    rows = {r["program"]: r for r in json.loads(capsys.readouterr().out)["programs"]}
    assert list(rows) == ["teacher_train", "teacher_decode", "teacher_score", "teacher_forward", "student_distill",
                          "eval_decode"]
    # WLP's card lengths; the paper's protocol decodes one token fewer, with float32 activations.
    assert rows["teacher_train"]["lengths"] == [96, 128] and rows["teacher_decode"]["lengths"] == [96, 127]
    # The teacher on its own 2x2 mesh, the student on the default (every device on data).
    assert {n: r["mesh"] for n, r in rows.items()} == {
        "teacher_train": [2, 2], "teacher_decode": [2, 2], "teacher_score": [2, 2], "teacher_forward": [2, 2],
        "student_distill": [4, 1], "eval_decode": [4, 1]}
    assert rows["teacher_train"]["dtype"] == "float32" and rows["teacher_train"]["optimizer"] == "adamw"
    assert rows["teacher_decode"]["batch"] == 8 and rows["eval_decode"]["batch"] == 64
    # Online soft targets: the student's batch carries the teacher's full-vocabulary logits.
    assert rows["student_distill"]["soft_targets"] == 256 and rows["teacher_forward"]["co_resident_gib"] > 0
    assert all(r["fits"] for r in rows.values())


def test_importing_doa_jax_with_the_aot_extra_starts_cpu_quietly():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
    done = subprocess.run([sys.executable, "-c", "import doa_jax, jax; print(jax.devices()[0].platform)"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "cpu\n", "")


# ----------------------------------------------------------------------------- platforms

def test_jax_platforms_are_chosen_only_when_a_plugin_lacks_its_hardware():
    from doa_jax import platforms

    assert platforms.choose({}, installed={"tpu", "cuda"}, present=set()) == "cpu"
    assert platforms.choose({}, installed={"tpu", "cuda"}, present={"cuda"}) == "cuda,cpu"
    assert platforms.choose({}, installed={"tpu"}, present={"tpu"}) is None          # a TPU VM: JAX decides
    assert platforms.choose({}, installed=set(), present=set()) is None              # plain JAX: as before
    assert platforms.choose({"JAX_PLATFORMS": "cpu,tpu"}, installed={"tpu"}, present=set()) is None


def test_filtered_stderr_drops_the_plugins_notices_and_keeps_everything_else(capfd):
    from doa_jax import platforms

    with platforms.filtered_stderr():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
                    b"I0000 00:00:1.0 1 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
                    b"not be used.\nE0000 a real error\n")
    assert capfd.readouterr().err == "E0000 a real error\n"


def test_a_failure_prunes_only_candidates_needing_more_memory_on_every_ranked_knob():
    def cand(**changes):
        knobs = dict(batch=16, mesh=(-1, 1), fsdp=False, remat="full", num_microbatches=1,
                     param_dtype="bfloat16", optimizer="adafactor")
        return search.Candidate(tuple(sorted({**knobs, **changes}.items())), "h100", 0)

    failed = [cand()]
    assert search._dominated(cand(batch=32), failed) is not None               # more rows: cannot fit
    assert search._dominated(cand(param_dtype="float32"), failed) is not None
    assert search._dominated(cand(batch=8), failed) is None                    # fewer rows: compile it
    # Microbatches are not ranked: their accumulator can cost more than the activations they save.
    assert search._dominated(cand(batch=32, num_microbatches=2), failed) is None
    assert search._dominated(cand(batch=32, mesh=(-1, 2)), failed) is None      # another mesh: compile it


def test_a_fit_found_outdoes_candidates_making_the_same_changes_and_more():
    base = dict(batch=32, mesh=(-1, 1), fsdp=False, remat="full", num_microbatches=1, param_dtype="float32",
                optimizer="adamw")

    def cand(target="h100", steps=0, **changes):
        return search.Candidate(tuple(sorted({**base, **changes}.items())), target, steps)

    fit = [cand(batch=16, optimizer="adafactor", param_dtype="bfloat16")]
    assert search._outdone(cand(batch=16, optimizer="adafactor", param_dtype="bfloat16", num_microbatches=2), fit, base)
    assert search._outdone(cand("h100x2", 1, batch=16, optimizer="adafactor", param_dtype="bfloat16"), fit, base)
    assert not search._outdone(cand("h100x4", 2, mesh=(-1, 4)), fit, base)      # the recipe kept, more chips
    assert not search._outdone(cand(optimizer="adafactor", param_dtype="bfloat16"), fit, base)


@pytest.mark.slow   # a tiny cell's five programs compiled for a TPU slice (~40 s on 2 busy cores)
def test_doa_run_dry_run_with_a_target_compiles_every_phase_and_runs_nothing(tmp_path, capsys):
    argv = ["run", "--dry_run", "--target", "v5e-4", "--gin_file", "runs/experiment.gin",
            "--gin_file", "experiments/wlp_1k_plus100_distill.gin", f"--gin.OUTPUT_DIR='{tmp_path}'",
            "--gin.VOCABULARY=None", "--gin.MODEL_VOCAB_SIZE=256", "--gin.TEACHER_SIZE='tiny'",
            "--gin.STUDENT_SIZE='tiny'", "--gin.BATCH_SIZE=8", "--gin.TEACHER_MESH_MODEL=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "run: 1 cells in" in out and "to run" in out
    assert "every phase fits (5 programs)" in out and not list(tmp_path.iterdir())   # nothing written


def test_doa_run_refuses_a_target_without_dry_run(capsys):
    assert main(["run", "--target", "v5e-4", "--gin_file", "runs/experiment.gin"]) != 0
    assert capsys.readouterr().err == ("doa run: error: --target goes with --dry_run (a run compiles for the devices "
                                       "it runs on)\n")


def test_the_devices_of_a_job_name_their_target_and_cpus_none():
    class Device:
        def __init__(self, kind, platform):
            self.device_kind, self.platform = kind, platform

    assert targets.for_devices([Device("TPU v5 lite", "tpu")] * 8) == "v5e-8"
    assert targets.for_devices([Device("TPU v5", "tpu")] * 4) == "v5p-8"         # 4 chips: 8 TensorCores
    assert targets.for_devices([Device("NVIDIA H100 80GB HBM3", "gpu")] * 8) == "h100x8"
    assert targets.for_devices([Device("NVIDIA H200", "gpu")]) == "h200"
    assert targets.for_devices(jax.devices()) is None                            # this CPU mesh: nothing to check
