#!/usr/bin/env bash
# Installs what `cargo build --features cuda` needs, without a system CUDA toolkit: NVIDIA's
# CUDA 13 compiler (nvcc, cicc), headers and libraries from their PyPI wheels, unpacked (not
# pip-installed) into one toolkit-shaped folder, plus a link-time stub of the driver library
# (libcuda.so), which only the NVIDIA driver provides. The stub is for linking only: at run time
# the real libcuda.so.1 of the machine's driver is used.
#
# Usage: tools/cuda/setup.sh [PREFIX]     (default PREFIX: .cuda in the repository)
# Then:  source PREFIX/env.sh && cargo build --release --features cuda
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
prefix="${1:-$repo/.cuda}"
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"
root="$prefix/nvidia/cu13"

# Versions that belong together (CUDA 13.0); cudarc supports 11.4 to 13.x. The CUDA 12 PyPI
# wheels ship ptxas but no nvcc, so 13 is the release that builds from PyPI alone.
CUDA_VER=13.0
WHEELS=(
    "nvidia-cuda-nvcc==13.0.88"
    "nvidia-nvvm==13.0.88"
    "nvidia-cuda-crt==13.0.88"
    "nvidia-cuda-runtime==13.0.96"
    "nvidia-cuda-cccl==13.0.85"
    "nvidia-cuda-nvrtc==13.0.88"
    "nvidia-curand==10.4.5.25"
    "nvidia-cublas==13.0.2.14"
)

if [ ! -x "$root/bin/nvcc" ] || [ ! -e "$root/lib/stubs/libcuda.so" ]; then
    py="$(command -v python3 || command -v python || true)"
    if [ -z "$py" ]; then
        echo "error: python3 with pip is needed to download the CUDA wheels" >&2
        exit 1
    fi
    dl="$prefix/wheels"
    mkdir -p "$dl"
    echo "downloading the CUDA $CUDA_VER wheels into $dl ..."
    "$py" -m pip download --quiet --no-deps --dest "$dl" "${WHEELS[@]}"
    for w in "$dl"/*.whl; do
        "$py" -m zipfile -e "$w" "$prefix/unpack"
    done
    mkdir -p "$prefix/nvidia"
    rm -rf "$root"
    mv "$prefix/unpack/nvidia/cu13" "$root"
    rm -rf "$prefix/unpack" "$dl"
    chmod +x "$root"/bin/* "$root"/nvvm/bin/* 2>/dev/null || true
    # Unversioned names for the linker.
    (cd "$root/lib" && for f in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
        ln -sf "$f" "${f%%.so*}.so"
    done)
    # The driver API stub: every cu* entry point cudarc declares, returning
    # CUDA_ERROR_UNKNOWN. Linking needs the names only.
    sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -1 || true)
    if [ -z "$sys" ]; then
        (cd "$repo" && cargo fetch --quiet)
        sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)
    fi
    mkdir -p "$root/lib/stubs"
    grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$sys" | sed 's/^pub unsafe fn //' | sort -u |
        awk '{ print "int " $1 "(void) { return 999; }" }' > "$root/lib/stubs/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$root/lib/stubs/libcuda_stub.c"
fi

cat > "$prefix/env.sh" <<ENV
# Source this before \`cargo build --features cuda\` (written by tools/cuda/setup.sh).
export CUDA_ROOT="$root"
export PATH="$root/bin:\$PATH"
# PTX for compute capability 8.0 runs on every GPU from A100 on (the driver JIT-compiles it);
# set CUDA_COMPUTE_CAP=90 for H100-only binaries.
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-80}"
ENV
cat > "$prefix/run-env.sh" <<ENV
# Source this before running a CUDA build of rest on a machine whose CUDA 13 libraries are not
# installed system-wide (the driver itself, libcuda.so.1, must be installed).
export LD_LIBRARY_PATH="$root/lib:\${LD_LIBRARY_PATH:-}"
ENV
"$root/bin/nvcc" --version | tail -2
echo "ok: source $prefix/env.sh, then cargo build --release --features cuda"
