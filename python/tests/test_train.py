"""Training, loading and prediction from Python, checked against the command line on the same
images: the same metrics.csv as `rest train`, the same classes as `rest predict`."""

import json
import pathlib
import re
import struct
import zlib

import numpy as np
import pytest

import rest
from conftest import ROOT, SIZES, TRAIN, run_cli


def test_run_reports_summary_and_metrics(arrays_run):
    s = arrays_run.summary
    assert s["epochs"] == TRAIN["epochs"]
    assert s["dataset"] == "cmnist-5pct"
    assert 0.0 <= s["test"]["unbiased"] <= 1.0
    assert abs(s["final_density"] - 0.05) < 0.01
    splits = [(r["epoch"], r["split"]) for r in arrays_run.metrics]
    assert splits == [(1, "train"), (1, "valid"), (2, "train"), (2, "valid"), (s["selected_epoch"], "test")]
    test_row = arrays_run.metrics[-1]
    assert test_row["accuracy"] == pytest.approx(s["test"]["accuracy"], abs=1e-6)
    assert isinstance(arrays_run.run_dir, pathlib.Path)
    assert (arrays_run.run_dir / "summary.json").is_file()
    info = json.loads((arrays_run.run_dir / "data.json").read_text())
    assert info["in_memory"] is True and info["input"] == [3, 28, 28]


def test_metrics_frame(arrays_run):
    pd = pytest.importorskip("pandas")
    df = arrays_run.metrics_frame()
    assert isinstance(df, pd.DataFrame)
    assert list(df["split"]) == [r["split"] for r in arrays_run.metrics]


def test_loaded_model_reproduces_the_summary(arrays_run, small_arrays):
    model = rest.load(arrays_run.run_dir)
    assert model.image_shape == (28, 28, 3) and model.num_classes == 10
    report = model.eval(small_arrays)
    for k in ("accuracy", "unbiased", "worst_group"):
        assert report["test"][k] == pytest.approx(arrays_run.summary["test"][k], abs=1e-9)
    test = small_arrays.arrays("test")
    probs = model.predict_proba(test["images"])
    assert probs.shape == (SIZES["test_size"], 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    pred = model.predict(test["images"], batch_size=7)
    np.testing.assert_array_equal(pred, probs.argmax(axis=1))
    acc = float((pred == test["labels"]).mean())
    assert acc == pytest.approx(arrays_run.summary["test"]["accuracy"], abs=1e-9)
    with pytest.raises(ValueError, match=r"shape \[N, 28, 28, 3\]"):
        model.predict(test["images"][:, :20])
    with pytest.raises(ValueError, match="uint8"):
        model.predict(test["images"].astype(np.float32))


def test_an_existing_run_is_refused(arrays_run, small_arrays):
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        rest.train(small_arrays, out=str(arrays_run.run_dir), epochs=1)


def test_cli_refuses_to_resume_or_eval_an_arrays_run(arrays_run):
    r = run_cli("train", "--resume", str(arrays_run.run_dir), check=False)
    assert r.returncode != 0 and "in-memory arrays" in r.stderr, r.stderr
    r = run_cli("eval", "--checkpoint", str(arrays_run.run_dir / "best.safetensors"), check=False)
    assert r.returncode != 0 and "in-memory arrays" in r.stderr, r.stderr


def cli_flags(options):
    out = []
    for k, v in options.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def test_arrays_train_as_rest_train_on_the_exported_images(tmp_path):
    """`rest data export` -> NumPy -> rest.train gives the metrics.csv of `rest train`."""
    run_cli("data", "export", "--out", str(tmp_path / "npy"), *cli_flags(SIZES))
    npy = lambda s, f: np.load(tmp_path / "npy" / f"{s}_{f}.npy")
    splits = [{f: npy(s, f) for f in ("images", "labels", "bias")} for s in ("train", "valid", "test")]
    ds = rest.Dataset.from_arrays(*splits, conflict_pct=5)
    py_run = rest.train(ds, out=str(tmp_path / "py"), **TRAIN)
    run_cli("train", "--out", str(tmp_path / "cli"), *cli_flags(SIZES), *cli_flags(TRAIN))
    cli_csv = (tmp_path / "cli" / "metrics.csv").read_text()
    py_csv = (py_run.run_dir / "metrics.csv").read_text()
    assert len(cli_csv.splitlines()) == 2 * TRAIN["epochs"] + 2
    assert py_csv == cli_csv
    # Besides the dataset's name ("arrays" here), the summaries agree except for timings.
    cli_sum = json.loads((tmp_path / "cli" / "summary.json").read_text())
    for k in ("valid", "test", "selected_epoch", "final_density", "upweight", "train_flops"):
        assert py_run.summary[k] == cli_sum[k], k
    assert py_run.summary["dataset"] == "arrays" and cli_sum["dataset"] == "cmnist-5pct"


def png_bytes(img: np.ndarray) -> bytes:
    """A minimal RGB PNG encoder (8-bit, no filtering), for `rest predict`."""
    h, w, c = img.shape
    assert c == 3
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))
    chunk = lambda tag, data: (
        struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    )
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_predict_equals_rest_predict(arrays_run, small_arrays, tmp_path):
    images = small_arrays.arrays("test")["images"][:40]
    files = []
    for i, img in enumerate(images):
        p = tmp_path / f"img{i:03d}.png"
        p.write_bytes(png_bytes(img))
        files.append(str(p))
    r = run_cli("predict", "--checkpoint", str(arrays_run.run_dir / "best.safetensors"), *files)
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.strip()]
    assert [l["file"] for l in lines] == files
    cli_classes = np.array([l["top"][0]["class"] for l in lines])
    cli_probs = np.array([l["top"][0]["prob"] for l in lines])
    model = rest.load(arrays_run.run_dir)
    np.testing.assert_array_equal(model.predict(images), cli_classes)
    probs = model.predict_proba(images)
    np.testing.assert_allclose(probs[np.arange(len(files)), cli_classes], cli_probs, rtol=1e-6)


def test_builtin_dataset_runs_like_the_cli(tmp_path):
    """A built-in dataset is trained through its data options: config.toml names them, so the
    command line can evaluate the run."""
    ds = rest.Dataset.colored_mnist(conflict_pct=2, **SIZES)
    run = rest.train(ds, out=tmp_path / "b", epochs=1, threads=2, density=0.1)
    cfg = (run.run_dir / "config.toml").read_text()
    assert "conflict_pct = 2.0" in cfg and "train_size = 1500" in cfg
    assert run.summary["upweight"] == 50.0
    assert run.summary["dataset"] == "cmnist-2pct"
    r = run_cli("eval", "--checkpoint", str(run.run_dir / "best.safetensors"))
    assert "cmnist-2pct" in r.stdout
    report = rest.load(run.run_dir / "best.safetensors").eval(ds)
    assert report["test"]["accuracy"] == pytest.approx(run.summary["test"]["accuracy"], abs=1e-9)


def test_readme_quickstart(tmp_path, monkeypatch):
    """The README's Python quickstart, verbatim."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md quickstart", "exec"), {})
    summary = json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())
    assert summary["epochs"] == 2


def test_ctrl_c_stops_training_with_keyboard_interrupt(small_arrays, tmp_path):
    """SIGINT during training checkpoints and stops the run (as `rest train` does), raised as
    KeyboardInterrupt; Python's own SIGINT handler is back afterwards and training works
    again."""
    import os
    import signal
    import threading

    before = signal.getsignal(signal.SIGINT)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt, match="interrupted at epoch.*cannot be resumed"):
            rest.train(small_arrays, out=str(tmp_path / "stopped"), epochs=200, threads=2)
    finally:
        timer.cancel()
    assert (tmp_path / "stopped" / "checkpoint.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) is before
    run = rest.train(small_arrays, out=str(tmp_path / "again"), epochs=1, threads=2)
    assert run.summary["epochs"] == 1


def test_folder_dataset_reads_a_dfa_folder(small_builtin, tmp_path):
    """A DFA-layout folder of PNGs reads back as the same images, and trains through the
    CLI's data options (config.toml names the folder)."""
    root = tmp_path / "cmnist"
    written = {}
    for split in ("train", "valid", "test"):
        a = small_builtin.arrays(split)
        for i in range(60):
            img, y, b = a["images"][i], int(a["labels"][i]), int(a["bias"][i])
            if split == "train":
                d = root / "5pct" / ("align" if y == b else "conflict") / str(y)
            elif split == "valid":
                d = root / "5pct" / "valid"
            else:
                d = root / "test" / str(y)
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:04d}_{y}_{b}.png").write_bytes(png_bytes(img))
            written.setdefault(split, []).append((y, b, img.tobytes()))
    ds = rest.Dataset.folder(root, conflict_pct=5, dataset="dfa")
    assert ds.image_shape == (28, 28, 3)
    for split, items in written.items():
        a = ds.arrays(split)
        back = [(int(y), int(b), img.tobytes()) for img, y, b in zip(a["images"], a["labels"], a["bias"])]
        assert sorted(back) == sorted(items), split
    run = rest.train(ds, out=tmp_path / "run", epochs=1, threads=2)
    assert f'data = "{root}"' in (run.run_dir / "config.toml").read_text()
    with pytest.raises(ValueError, match="1pct is missing"):
        rest.Dataset.folder(root, conflict_pct=1).name
