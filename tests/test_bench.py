"""`doa bench` / scripts/bench.py on the CPU with the tiny size: rows, their arithmetic, the table,
the peer's ratios, isolation of cases, and errors."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from doa_jax.bench import measure, run as bench_run
from doa_jax.cli import main
from doa_jax.model import Transformer, config_for_size

TINY = ["--sizes", "tiny", "--batch", "2", "--enc-len", "16", "--dec-len", "8", "--steps", "2", "--warmup", "1",
        "--decode-batch", "4", "--in-len", "8", "--new-tokens", "5", "--reps", "2", "--no-scan", "--in-process"]


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    code = main(["bench", "--parts", "train", "decode", "distill", "--teacher", "tiny", "--student", "tiny",
                 "--out", str(out), *TINY])
    assert code == 0
    return out, json.loads(out.read_text())


def test_mfu_is_over_the_datasheet_peak_and_the_matmul_fraction_over_the_measured_one(monkeypatch):
    monkeypatch.setattr(measure.progress, "peak_flops_per_device", lambda kind: (1e12, "a datasheet peak"))
    monkeypatch.setattr(measure, "matmul_peak", lambda kind: (8e11, "a measured matmul rate"))
    row = {"peer_flops": 6e9, "attn_flops": 8e9, "step_s": 0.02}
    measure._add_mfu(row)
    assert row["mfu"] == pytest.approx(6e9 / 0.02 / 1e12) and row["mfu_attn"] == pytest.approx(8e9 / 0.02 / 1e12)
    assert row["matmul_peak_fraction"] == pytest.approx(6e9 / 0.02 / 8e11)
    assert row["floor_s"] == pytest.approx(8e9 / 8e11)


def test_train_row_reports_time_throughput_and_mfu_consistently(tiny_rows):
    _, rows = tiny_rows
    (train,) = [r for r in rows if r["part"] == "train"]
    assert train["tokens_per_s"] == pytest.approx(2 * (16 + 8) / train["step_s"])
    # The CPU has only a nominal peak (doa_jax/hardware.toml): no MFU is claimed against it.
    assert train.get("mfu") is None and "no MFU" in train["peak_note"]
    assert train["startup_s"] == pytest.approx(train["init_s"] + train["compile_s"] + train["first_step_s"])
    assert train["est_peak_gib"] > 0 and train["loss"] > 0
    # With attention the FLOP count is larger than the peer's 6 N tokens.
    assert train["attn_flops"] > train["peer_flops"]


def test_decode_row_counts_examples_per_second_of_exactly_new_tokens(tiny_rows):
    _, rows = tiny_rows
    (dec,) = [r for r in rows if r["part"] == "decode"]
    assert dec["examples_per_s"] == pytest.approx(4 / dec["batch_s"])
    assert dec["tokens_per_s"] == pytest.approx(4 * 5 / dec["batch_s"])


def test_distill_row_compares_online_and_stored_kd(tiny_rows):
    _, rows = tiny_rows
    (d,) = [r for r in rows if r["part"] == "distill"]
    # Same model as teacher and student: online KD adds one forward (1/3 of a train step).
    assert d["flops_ratio_online_vs_stored"] == pytest.approx(4 / 3)
    assert d["time_ratio_online_vs_stored"] == pytest.approx(
        (d["student_step_s"] + d["teacher_forward_s"]) / d["student_step_s"])


def test_peer_formula_counts_the_peers_matmul_params():
    torch = pytest.importorskip("torch")
    from transformers import T5Config as HFConfig, T5ForConditionalGeneration

    cfg = config_for_size("small")
    hf = HFConfig(vocab_size=cfg.vocab_size, d_model=cfg.emb_dim, d_kv=cfg.head_dim, d_ff=cfg.mlp_dim,
                  num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
                  num_heads=cfg.num_heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(hf)
    # hf_t5_baseline.py's matmul_params: encoder/decoder params without embeddings, plus lm_head.
    enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder.") and "embed" not in n)
    dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder.") and "embed" not in n)
    dec += model.lm_head.weight.numel()
    tokens = jnp.zeros((1, 1), jnp.int32)
    abstract = nn.meta.unbox(jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), tokens, tokens)))
    assert measure.stack_param_counts(abstract["params"]) == (enc, dec)
    assert measure.peer_train_flops(abstract["params"], 32, 512, 128) == 6 * (enc * 32 * 512 + dec * 32 * 128)


def test_show_puts_the_peers_figures_and_ratios_beside_ours(tiny_rows, tmp_path, capsys):
    out, rows = tiny_rows
    train = next(r for r in rows if r["part"] == "train")
    dec = next(r for r in rows if r["part"] == "decode")
    peer = [dict(kind="train", size="tiny", batch=2, tokens_per_s=train["tokens_per_s"] / 2, mfu=0.01),
            dict(kind="trainc", size="tiny", batch=2, tokens_per_s=train["tokens_per_s"] / 4, mfu=0.02),
            dict(kind="generate", size="tiny", batch=4, examples_per_s=dec["examples_per_s"] / 5),
            dict(kind="train", size="xl", error="RuntimeError('CUDA out of memory')")]
    (tmp_path / "peer.json").write_text(json.dumps(peer))
    assert main(["bench", "--show", str(out), "--peer", str(tmp_path / "peer.json")]) == 0
    text = capsys.readouterr().out
    assert "| 2.00x / 4.00x |" in text     # ours over the peer's eager and compiled tokens/s
    assert "| 5.00x |" in text             # decode examples/s ratio


def test_cases_run_each_in_its_own_process_and_failures_are_recorded(tmp_path):
    cases = bench_run.expand(["decode"], ["tiny"], decode_batch=2, in_len=4, new_tokens=3, reps=1, scan=False)
    cases.append(dict(part="train", size="no_such_size"))
    rows = bench_run.run_cases(cases, isolate=True, timeout_s=300)
    assert rows[0]["part"] == "decode" and rows[0]["examples_per_s"] > 0 and "error" not in rows[0]
    assert "unknown model size 'no_such_size'" in rows[1]["error"]


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["bench", "--sizes", "huge", "--out", str(tmp_path / "r.json"), "--in-process"]) == 2
    assert "unknown model size 'huge'" in capsys.readouterr().err
    assert main(["bench", "--show", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["bench", "--show", str(tmp_path / "bad.json")]) == 2
    assert "is not JSON (line 1" in capsys.readouterr().err


def test_script_runs_without_installing(tmp_path):
    done = subprocess.run([sys.executable, "scripts/bench.py", "--help"], capture_output=True, text=True,
                          cwd=measure.__file__.rsplit("/doa_jax/", 1)[0])
    assert done.returncode == 0 and "--peer" in done.stdout


def test_decode_floor_is_compute_bound_for_the_encoder_and_bytes_bound_per_step():
    from doa_jax import flops

    cfg = config_for_size("xxl")
    peak, fast, slow = 798e12, float("inf"), 3.0e12
    encoder_only = flops.forward_flops(cfg, 256, 128, 0) / peak      # encoder + cross K/V, attention included
    with_free_bytes = measure.decode_floor_s(cfg, 256, 128, 32, peak, fast)
    # Each of the 32 steps multiplies 256 tokens by the decoder's weights (5.4e9 without cross K/V).
    assert encoder_only + 32 * 2 * 256 * 5.4e9 / peak < with_free_bytes < 1.3 * encoder_only
    # With real bandwidth, each step costs at least its weights + cross cache read once.
    step_bytes = 2 * 6.24e9 + 2 * 2 * 256 * 128 * 24 * 4096
    floor = measure.decode_floor_s(cfg, 256, 128, 32, peak, slow)
    assert floor > encoder_only + 32 * step_bytes / slow


@pytest.mark.slow
def test_gpu_bench_dry_run_writes_env_rows_and_table_and_survives_a_timed_out_case(tmp_path):
    """The one-call device script, tiny sizes on the CPU, cases (b) and (d): (b) hangs (GPU_BENCH_HANG) and
    times out; the case after it still runs and the files the device tool brings back are all there."""
    root = measure.__file__.rsplit("/doa_jax/", 1)[0]
    env = {**os.environ, "OUT": str(tmp_path), "JAX_PLATFORMS": "cpu", "GPU_BENCH_TINY": "1", "SCALE": "1",
           "DEADLINE": "3000", "T_B": "10", "PEER_SCRIPT": "none", "CASES": "b d",
           "GPU_BENCH_HANG": "b"}
    done = subprocess.run(["bash", "scripts/gpu_bench.sh", "run"], cwd=root, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert {"env.json", "ours.json", "table.md", "log.txt"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "env.json").read_text())["bench_imports_tf_seqio_gin"] == []
    log = (tmp_path / "log.txt").read_text()
    assert "== (b ours) TIMED OUT after 10s" in log
    rows = json.loads((tmp_path / "ours.json").read_text())
    assert [r["part"] for r in rows if "error" not in r] == ["decode"]
    assert "| tiny | 4 | 8/4 | scan/cache |" in (tmp_path / "table.md").read_text()    # the decode row (size, batch, lengths, layout)


BLOCK_TF_SEQIO_GIN = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'seqio', 'gin', 'tensorflow_datasets', 'tensorflow_text'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
sys.argv = ['scripts/bench.py'] + sys.argv[1:]
runpy.run_path('scripts/bench.py', run_name='__main__')
"""


def test_the_script_needs_no_tensorflow_seqio_or_gin(tmp_path):
    # The GPU image has none of them: every module the bench imports must do without.
    root = measure.__file__.rsplit("/doa_jax/", 1)[0]
    done = subprocess.run([sys.executable, "-c", BLOCK_TF_SEQIO_GIN, "--parts", "train", "decode", *TINY,
                           "--steps", "1", "--out", str(tmp_path / "rows.json")],
                          cwd=root, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["part"] for r in json.loads((tmp_path / "rows.json").read_text())] == ["train", "decode"]
