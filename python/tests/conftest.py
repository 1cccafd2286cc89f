"""Shared fixtures of the `rest` Python tests: the `rest` binary (for the comparisons with
the command line), a small built-in dataset and one short training run on it."""

import os
import pathlib
import shutil
import subprocess

import pytest

import rest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Small and short, so that the suite runs in a few minutes on 2 cores.
SIZES = dict(train_size=1500, valid_size=300, test_size=300)
TRAIN = dict(epochs=2, seed=3, threads=2, batch_size=128)


def rest_bin() -> str:
    """The `rest` binary: $REST_BIN, else the release build of this repository."""
    env = os.environ.get("REST_BIN")
    if env:
        return env
    for target in (os.environ.get("CARGO_TARGET_DIR"), str(ROOT / "target")):
        if target:
            p = pathlib.Path(target) / "release" / "rest"
            if p.is_file():
                return str(p)
    found = shutil.which("rest")
    if found:
        return found
    pytest.skip("no rest binary: build it with `cargo build --release` or set REST_BIN")


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [rest_bin(), *args], capture_output=True, text=True, check=check
    )


@pytest.fixture(scope="session")
def small_builtin() -> rest.Dataset:
    return rest.Dataset.colored_mnist(conflict_pct=5, **SIZES)


@pytest.fixture(scope="session")
def small_arrays(small_builtin) -> rest.Dataset:
    splits = [small_builtin.arrays(s) for s in ("train", "valid", "test")]
    return rest.Dataset.from_arrays(*splits, conflict_pct=5, name=small_builtin.name)


@pytest.fixture(scope="session")
def arrays_run(small_arrays, tmp_path_factory) -> rest.Run:
    out = tmp_path_factory.mktemp("runs") / "arrays"
    return rest.train(small_arrays, out=str(out), **TRAIN)
