#!/usr/bin/env bash
# The GPU check of issue #9, prepared to run in one go on a machine with an NVIDIA GPU, PyTorch
# (with CUDA) and no Rust toolchain: training steps per second of rest and of PyTorch on the
# same GPU (CNN and ResNet18, dense and sparse), and a REST run on the GPU beside the same run
# on the CPU (accuracy within noise).
#
# Build here, carry the binary there:
#   source .cuda/env.sh && CUDA_COMPUTE_CAP=90 cargo build --release --features cuda
#   mkdir -p gpu && gzip -9 -c target/release/rest > gpu/rest.gz   # ~18 MiB (65 MiB unpacked)
# Run there, from the repository root:
#   gunzip gpu/rest.gz && BIN=gpu/rest tools/cuda/gpu-check.sh [OUT]
# Environment: BIN (default target/release/rest), DEVICE (default cuda; `cpu` runs the same
# flow without a GPU, to test the script), EPOCHS (default: the default run's), SEEDS (extra
# --seed values to train beside the default run, e.g. "1 2", for the run-to-run spread),
# STEPS (timed steps per measurement, default 50), WARMUP (default 10), PY (default python3,
# with PyTorch; the models and timing loop are tools/reference/), STAGE_TIMEOUT (seconds per
# stage, default 300). Every stage runs even when an earlier one fails (a device
# lease is too short to rerun for one failure); the exit status says whether any failed.
# The binary needs CUDA 13's cuBLAS/cuRAND/NVRTC at run time; they are looked up in this
# machine's Python packages (PyTorch's nvidia-* wheels) and in .cuda/ when present.
set -uo pipefail
BIN="${BIN:-target/release/rest}"
DEVICE="${DEVICE:-cuda}"
EPOCHS="${EPOCHS-}"
SEEDS="${SEEDS-}"
STEPS="${STEPS:-50}"
WARMUP="${WARMUP:-10}"
PY="${PY:-python3}"
OUT="${1:-${OUT:-/tmp/rest-gpu-check}}"
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$OUT"
if [ ! -x "$BIN" ]; then
    echo "error: no rest binary at $BIN (set BIN=path/to/rest built with --features cuda)" >&2
    exit 1
fi

if [ "$DEVICE" != cpu ]; then
    libs=$("$PY" - <<'PYEOF'
import glob, os, site
dirs = []
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for f in sorted(glob.glob(os.path.join(sp, "nvidia", "**", "lib*.so*"), recursive=True)):
        d = os.path.dirname(f)
        if d not in dirs:
            dirs.append(d)
print(":".join(dirs))
PYEOF
)
    [ -d .cuda/nvidia/cu13/lib ] && libs="$PWD/.cuda/nvidia/cu13/lib:$libs"
    export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
    nvidia-smi -L || true
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ldd "$BIN" | grep "not found" || true
fi
"$BIN" --version

STAGE_TIMEOUT="${STAGE_TIMEOUT:-300}"
failed=()
# stage NAME CMD...: runs CMD with a time limit, logs its status, and goes on whatever happens.
stage() {
    local name="$1"
    shift
    local t0=$SECONDS
    timeout "$STAGE_TIMEOUT" "$@"
    local rc=$?
    echo "-- stage $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -ne 0 ] && failed+=("$name")
    return 0
}

echo "== speed: PyTorch on $DEVICE"
: > "$OUT/torch.jsonl"
for spec in "cnn" "cnn --infer" "resnet18" "resnet18 --infer" "resnet18 --hw 128"; do
    # shellcheck disable=SC2086
    stage "torch $spec" "$PY" "$here/../reference/bench.py" $spec --device "$DEVICE" \
        --steps "$STEPS" --warmup "$WARMUP" > >(tee -a "$OUT/torch.jsonl")
done
ref=()
[ -s "$OUT/torch.jsonl" ] && ref=(--reference "$OUT/torch.jsonl")

echo "== speed: rest on $DEVICE"
export RUST_BACKTRACE=1
stage "rest bench" "$BIN" bench --device "$DEVICE" --models cnn,resnet18 --densities 1,0.05 \
    --steps "$STEPS" --warmup "$WARMUP" "${ref[@]}" --json > >(tee "$OUT/bench.jsonl")
stage "rest bench 128px" "$BIN" bench --device "$DEVICE" --models resnet18 --densities 1 --hw 128 \
    --steps "$STEPS" --warmup "$WARMUP" "${ref[@]}" --json > >(tee -a "$OUT/bench.jsonl")
sleep 1

epochs=()
[ -n "$EPOCHS" ] && epochs=(--epochs "$EPOCHS")
echo "== accuracy: the REST default run ${EPOCHS:+($EPOCHS epochs) }on $DEVICE and on the CPU"
for dev in $(printf '%s\n' "$DEVICE" cpu | uniq); do
    for seed in default $SEEDS; do
        name="run-$dev" seed_args=()
        [ "$seed" != default ] && name="run-$dev-s$seed" seed_args=(--seed "$seed")
        stage "train $dev seed $seed" "$BIN" train --device "$dev" "${epochs[@]}" "${seed_args[@]}" \
            --out "$OUT/$name" > "$OUT/$name.log" 2>&1
        tail -n 4 "$OUT/$name.log"
    done
done
"$PY" - "$OUT" "$DEVICE" <<'PYEOF'
import json, os, sys
out, dev = sys.argv[1], sys.argv[2]
print("%-9s %-6s %-8s %-10s %-10s %-8s" % ("model", "mode", "density", "rest ms", "torch ms", "ratio"))
for line in open(os.path.join(out, "bench.jsonl")) if os.path.exists(os.path.join(out, "bench.jsonl")) else []:
    try:
        r = json.loads(line)
    except ValueError:
        continue
    ref = r.get("reference_ms")
    print("%-9s %-6s %-8s %-10s %-10s %-8s" % (
        r.get("model"), r.get("mode"), r.get("density"), r.get("median_ms"), ref if ref else "-",
        r.get("ratio_vs_reference", "-")))
for name in sorted(d for d in os.listdir(out) if d.startswith("run-") and not d.endswith(".log")):
    p = os.path.join(out, name, "summary.json")
    if not os.path.exists(p):
        print("%-14s no summary (see %s.log)" % (name, name))
        continue
    s = json.load(open(p))
    t = s["test"]
    print("%-14s unbiased %.2f %%  aligned %.2f %%  conflicting %.2f %%  worst group %.2f %%  "
          "%.1f s wall, %.0f samples/s"
          % (name, 100 * t["unbiased"], 100 * t["aligned"], 100 * t["conflicting"],
             100 * t["worst_group"], s["wall_time_s"], s["train_samples_per_s"]))
PYEOF
echo "results in $OUT"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "failed stages: ${failed[*]}" >&2
    exit 1
fi
