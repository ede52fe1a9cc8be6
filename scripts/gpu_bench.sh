#!/usr/bin/env bash
# Issue 7 on one H100: the PyTorch peer (hf_t5_baseline.py) and `doa bench`, side by side, in the
# same device call. notes/performance.md says what each figure is for.
#
# 1. Once, on the developer machine (../shared does not travel to the device machine, so the
#    peer's script is copied into an ignored folder that the call carries):
#        bash scripts/gpu_bench.sh prepare
# 2. Through the device tool, one plan per call (each is sized for the 10-minute limit; the
#    three together take about 25 minutes of the 30-minute device budget):
#        run(command="bash scripts/gpu_bench.sh train",  carry=[".carry"], timeout_s=600)
#        run(command="bash scripts/gpu_bench.sh decode", carry=[".carry"], timeout_s=600)
#        run(command="bash scripts/gpu_bench.sh xxl",    carry=[".carry"], timeout_s=600)
#    Each writes to $OUT: peer_PLAN.json (the peer's rows), ours_PLAN.json (doa bench rows),
#    table_PLAN.md (ours with the peer's figures and ratios) and log_PLAN.txt.
#    Afterwards, here: python3 scripts/bench.py --show ours_PLAN.json --peer peer_PLAN.json
#
# Needs on the device machine only what its image has (Python 3.12, JAX CUDA, Flax, Optax, Orbax,
# TensorStore, PyTorch, transformers): the benchmark imports no TensorFlow, SeqIO or gin.
set -uo pipefail

plan=${1:-train}
root=$(cd "$(dirname "$0")/.." && pwd)
carry=$root/.carry

if [ "$plan" = prepare ]; then
    src=${PEER_SCRIPT:-$root/../shared/bench/hf_t5_baseline.py}
    [ -f "$src" ] || { echo "peer script not found at $src (set PEER_SCRIPT)" >&2; exit 2; }
    mkdir -p "$carry" && cp "$src" "$carry/hf_t5_baseline.py"
    grep -qxF '/.carry/' "$root/.git/info/exclude" 2>/dev/null || echo '/.carry/' >> "$root/.git/info/exclude"
    echo "copied $src to $carry; now run: bash scripts/gpu_bench.sh train|decode|xxl with carry=[\".carry\"]"
    exit 0
fi

OUT=${OUT:-$root/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
# JAX may take 95% of the card (each case runs in its own process, so nothing is shared).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
log=$OUT/log_$plan.txt
peer_json=$OUT/peer_$plan.json
ours_json=$OUT/ours_$plan.json
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
# Steps stop being started at DEADLINE seconds, so the tables and archives are written inside the
# device tool's 600-second limit; every case's time is capped by what is left.
DEADLINE=${DEADLINE:-540}
left() { echo $(( DEADLINE - $(elapsed) )); }

peer() {   # peer ITEMS... : the PyTorch baseline, capped so that our half of the call keeps its time
    if [ ! -f "$carry/hf_t5_baseline.py" ]; then
        echo "no $carry/hf_t5_baseline.py: run 'bash scripts/gpu_bench.sh prepare' here and carry .carry" | tee -a "$log"
        return
    fi
    echo "== peer $* (t=$(elapsed)s)" | tee -a "$log"
    local cap=${PEER_TIMEOUT:-240}
    [ "$(left)" -lt "$cap" ] && cap=$(left)
    timeout "$cap" python3 "$carry/hf_t5_baseline.py" "$peer_json" "$@" 2>&1 | tee -a "$log"
}

ours() {   # ours FLAGS... : doa bench, every case in its own process, rows appended to ours_PLAN.json
    local cap=${CASE_TIMEOUT:-150}
    if [ "$(left)" -lt 30 ]; then
        echo "== skipped (deadline): doa bench $*" | tee -a "$log"
        return
    fi
    [ "$(left)" -lt "$cap" ] && cap=$(left)
    echo "== doa bench $* (t=$(elapsed)s, at most ${cap}s a case)" | tee -a "$log"
    python3 "$root/scripts/bench.py" --append --out "$ours_json" --timeout "$cap" "$@" 2>&1 \
        | grep -v '^|' | tee -a "$log"
}

pack() {   # pack NAME DIR [FIND ARGS...]: DIR's matching files as $OUT/NAME.tgz (skipped past 15 MB)
    local name=$1 dir=$2
    shift 2
    [ -d "$dir" ] || return
    (cd "$dir" && find . -type f "$@" -print0 | tar -czf "$OUT/$name.tgz" --null -T -)
    if [ "$(stat -c %s "$OUT/$name.tgz")" -gt 15000000 ]; then
        echo "$name.tgz is over 15 MB; not kept" | tee -a "$log"
        rm -f "$OUT/$name.tgz"
    fi
}

hlo_dump() {   # hlo_dump DIR: XLA flags that write each compiled program's optimised HLO and buffers
    echo "--xla_dump_to=$1 --xla_dump_hlo_as_text"
}

{
    echo "== plan $plan on $(hostname), $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
    python3 - <<'EOF' 2>&1
import importlib.util, jax, flax, optax, orbax.checkpoint, torch, transformers
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__,
      "transformers", transformers.__version__, "devices", jax.devices())
print("TF/seqio/gin present (the bench needs none):",
      {m: importlib.util.find_spec(m) is not None for m in ("tensorflow", "seqio", "gin")})
EOF
} | tee "$log"

case "$plan" in
train)   # train step: tokens/s and MFU vs the peer (eager and torch.compile); XL start-up
    peer train:small train:base trainc:base train:large train:xl
    ours --parts train --sizes base --optimizers adamw --profile /tmp/prof_train
    ours --parts train --sizes base --optimizers adamw --no-scan
    ours --parts train --sizes xl small large --optimizers adamw
    XLA_FLAGS="$(hlo_dump /tmp/hlo_train)" ours --parts aot_train --sizes base --optimizers adamw
    pack profile_train /tmp/prof_train
    pack hlo_train /tmp/hlo_train -name '*after_optimizations*'
    ;;
decode)  # greedy decoding, batch 256, 128 in, exactly 32 new; XXL decode start-up, scanned and unrolled
    peer gen:small gen:large gen:xxl
    ours --parts decode --sizes xxl --profile /tmp/prof_decode
    ours --parts decode --sizes small large
    XLA_FLAGS="$(hlo_dump /tmp/hlo_decode)" ours --parts aot_decode --sizes large
    XLA_FLAGS="$(hlo_dump /tmp/hlo_decode_unrolled)" ours --parts aot_decode --sizes large --no-scan
    CASE_TIMEOUT=240 ours --parts decode --sizes xxl --no-scan --reps 2
    pack profile_decode /tmp/prof_decode
    pack hlo_decode /tmp/hlo_decode -name '*after_optimizations*'
    pack hlo_decode_unrolled /tmp/hlo_decode_unrolled -name '*after_optimizations*'
    ;;
xxl)     # XXL fine-tuning on one card (batch 8, 512/128), distillation cost, XL unrolled start-up, GPU AOT memory
    ours --parts train --sizes xxl --optimizers adafactor --param-dtype bfloat16 --remat full --steps 5 --warmup 1
    ours --parts distill --teacher xxl --student small --batch 32 --steps 5
    ours --parts train --sizes xl --optimizers adafactor
    ours --parts aot_train --sizes xxl --optimizers adafactor --param-dtype bfloat16 --remat dots
    ours --parts aot_train --sizes xxl --optimizers adafactor --param-dtype float32 --remat full
    CASE_TIMEOUT=240 ours --parts train --sizes xl --optimizers adamw --no-scan --steps 3 --warmup 1
    ;;
smoke)   # the script itself, on any machine (CPU included), with the tiny size and no peer
    tiny=(--sizes tiny --batch 2 --enc-len 16 --dec-len 8 --steps 2 --decode-batch 4 --in-len 8 --new-tokens 4 --no-scan)
    ours --parts train decode "${tiny[@]}" --profile /tmp/prof_smoke_$$
    XLA_FLAGS="$(hlo_dump /tmp/hlo_smoke_$$)" ours --parts aot_decode "${tiny[@]}"
    pack profile_smoke /tmp/prof_smoke_$$
    pack hlo_smoke /tmp/hlo_smoke_$$ -name '*after_optimizations*'
    rm -rf /tmp/prof_smoke_$$ /tmp/hlo_smoke_$$
    ;;
*)
    echo "unknown plan '$plan': use prepare, train, decode, xxl (or smoke)" >&2
    exit 2
    ;;
esac

if [ -s "$ours_json" ]; then
    args=(--show "$ours_json")
    [ -s "$peer_json" ] && args+=(--peer "$peer_json")
    python3 "$root/scripts/bench.py" "${args[@]}" | tee "$OUT/table_$plan.md"
fi
echo "== plan $plan done in $(elapsed)s; files in $OUT" | tee -a "$log"
