#!/usr/bin/env bash
# The Python module's CI part (README, "Python"): rustfmt and clippy of python/, then the
# module built with maturin into a virtual environment (maturin, pytest, numpy, pandas and
# tqdm from PyPI; tqdm for the progress bar's test) and its pytest suite, which also runs
# the `rest` binary to compare with. Shares the root's target directory, so the `rest`
# library's release build (from `cargo test --release`) is reused and only PyO3, numpy and
# the module itself are compiled.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${REST_CI_VENV:-$root/.ci-venv}
export CARGO_TARGET_DIR=$root/target
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade maturin pytest numpy pandas tqdm
export PYO3_PYTHON=$venv/bin/python
cargo fmt --manifest-path python/Cargo.toml -- --check
cargo clippy --release --manifest-path python/Cargo.toml --all-targets -- -D warnings
# The binary the tests compare with: `cargo test --release` built it (with the test build's
# features; building it again here would recompile the library).
[ -x "$CARGO_TARGET_DIR/release/rest" ] || cargo build --release --bin rest
rm -rf "$CARGO_TARGET_DIR/wheels"
"$venv/bin/maturin" build --release -m python/Cargo.toml -i "$venv/bin/python" \
    -o "$CARGO_TARGET_DIR/wheels"
"$venv/bin/pip" install -q --force-reinstall --no-deps "$CARGO_TARGET_DIR"/wheels/rest-*.whl
REST_BIN=$CARGO_TARGET_DIR/release/rest "$venv/bin/python" -m pytest -q python/tests
