#!/usr/bin/env bash
# The GPU check of issue #9, prepared to run in one go on a machine with an NVIDIA GPU, PyTorch
# (with CUDA) and no Rust toolchain: training steps per second of rest and of PyTorch on the
# same GPU (CNN and ResNet18, dense and sparse), and a REST run on the GPU beside the same run
# on the CPU (accuracy within noise).
#
# Build here, carry the binary there:
#   source .cuda/env.sh && CUDA_COMPUTE_CAP=90 cargo build --release --features cuda
#   mkdir -p gpu && cp target/release/rest gpu/rest && strip gpu/rest   # ~57 MiB: fits the 64 MiB carry
# Run there, from the repository root:
#   BIN=gpu/rest tools/cuda/gpu-check.sh [OUT]
# Environment: BIN (default target/release/rest), DEVICE (default cuda; `cpu` runs the same
# flow without a GPU, to test the script), EPOCHS (default 3), STEPS (timed steps per
# measurement, default 50), WARMUP (default 10), PY (default python3).
# The binary needs CUDA 13's cuBLAS/cuRAND/NVRTC at run time; they are looked up in this
# machine's Python packages (PyTorch's nvidia-* wheels) and in .cuda/ when present.
set -euo pipefail
BIN="${BIN:-target/release/rest}"
DEVICE="${DEVICE:-cuda}"
EPOCHS="${EPOCHS:-3}"
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
fi
"$BIN" --version

echo "== speed: PyTorch on $DEVICE"
: > "$OUT/torch.jsonl"
for spec in "cnn" "cnn --infer" "resnet18" "resnet18 --infer" "resnet18 --hw 128"; do
    # shellcheck disable=SC2086
    "$PY" "$here/torch_gpu_ref.py" $spec --device "$DEVICE" --steps "$STEPS" --warmup "$WARMUP" | tee -a "$OUT/torch.jsonl"
done

echo "== speed: rest on $DEVICE"
"$BIN" bench --device "$DEVICE" --models cnn,resnet18 --densities 1,0.05 --steps "$STEPS" --warmup "$WARMUP" \
    --reference "$OUT/torch.jsonl" | tee "$OUT/bench.txt"
"$BIN" bench --device "$DEVICE" --models cnn,resnet18 --densities 1,0.05 --steps "$STEPS" --warmup "$WARMUP" \
    --reference "$OUT/torch.jsonl" --json > "$OUT/bench.jsonl"

echo "== accuracy: the REST default run, $EPOCHS epochs, on $DEVICE and on the CPU"
"$BIN" train --device "$DEVICE" --epochs "$EPOCHS" --out "$OUT/run-$DEVICE" > "$OUT/run-$DEVICE.log" 2>&1
"$BIN" train --device cpu --epochs "$EPOCHS" --out "$OUT/run-cpu" > "$OUT/run-cpu.log" 2>&1
"$PY" - "$OUT" "$DEVICE" <<'PYEOF'
import json, os, sys
out, dev = sys.argv[1], sys.argv[2]
for name in dict.fromkeys((dev, "cpu")):
    s = json.load(open(os.path.join(out, "run-" + name, "summary.json")))
    t = s["test"]
    print("%-6s unbiased %.2f %%  aligned %.2f %%  conflicting %.2f %%  worst group %.2f %%  "
          "%.1f s wall, %.0f samples/s"
          % (name, 100 * t["unbiased"], 100 * t["aligned"], 100 * t["conflicting"],
             100 * t["worst_group"], s["wall_time_s"], s["train_samples_per_s"]))
PYEOF
echo "results in $OUT"
