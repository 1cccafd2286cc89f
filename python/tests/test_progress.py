"""Progress where the user is: a per-epoch display through Python (tqdm.auto when installed,
else a line per epoch on sys.stderr), `progress=False` for none, and `callback=` with one dict
per epoch holding the epoch's metrics.csv rows; an exception from the callback stops the run
and is raised by `rest.train`. The training runs with the GIL released."""

import sys
import threading
import time
import types

import pytest

import rest
from conftest import TRAIN


def test_callback_gets_one_dict_per_epoch_with_the_metrics_rows(small_arrays, tmp_path):
    seen = []
    run = rest.train(small_arrays, out=tmp_path / "cb", progress=False, callback=seen.append, **TRAIN)
    assert [d["epoch"] for d in seen] == list(range(1, TRAIN["epochs"] + 1))
    keys = set(run.metrics[0])
    for d in seen:
        assert d["epochs"] == TRAIN["epochs"] and d["stage"] == "train"
        for split in ("train", "valid"):
            assert set(d[split]) == keys
            row = next(r for r in run.metrics if r["epoch"] == d["epoch"] and r["split"] == split)
            assert d[split] == row


def test_jtt_reports_its_stage_one_epochs_too(small_arrays, tmp_path):
    seen = []
    rest.train(
        small_arrays, out=tmp_path / "jtt", method="jtt", jtt_epochs=1, epochs=2, threads=2,
        progress=False, callback=lambda d: seen.append((d["stage"], d["epoch"], d["epochs"])),
    )
    assert seen == [("jtt_stage1", 1, 1), ("train", 1, 2), ("train", 2, 2)]


class Stop(Exception):
    pass


def test_a_raising_callback_stops_training_with_its_exception(small_arrays, tmp_path):
    calls = []

    def callback(d):
        calls.append(d["epoch"])
        raise Stop(f"enough at epoch {d['epoch']}")

    with pytest.raises(Stop, match="enough at epoch 1"):
        rest.train(small_arrays, out=tmp_path / "stop", epochs=5, threads=2, callback=callback)
    assert calls == [1]
    out = tmp_path / "stop"
    assert not (out / "summary.json").exists()
    epochs = {l.split(",")[0] for l in (out / "metrics.csv").read_text().splitlines()[1:]}
    assert epochs == {"1"}
    # Training works again afterwards.
    assert rest.train(small_arrays, out=tmp_path / "again", epochs=1, threads=2, progress=False).summary


def test_callback_must_be_callable(small_arrays):
    with pytest.raises(ValueError, match="callback must be a callable"):
        rest.train(small_arrays, callback=3)


def test_without_tqdm_a_line_per_epoch_on_stderr(small_arrays, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    rest.train(small_arrays, out=tmp_path / "lines", **TRAIN)
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("epoch ")]
    assert [l.split(":")[0] for l in lines] == ["epoch 1/2", "epoch 2/2"], err
    assert "valid loss" in lines[0] and "worst-group" in lines[0]
    rest.train(small_arrays, out=tmp_path / "quiet", progress=False, **TRAIN)
    assert "epoch " not in capsys.readouterr().err


def test_tqdm_auto_bar_when_installed(small_arrays, tmp_path, monkeypatch):
    """tqdm.auto (a recording stand-in): one bar of `epochs` steps, updated once per epoch
    with the epoch's metrics, then closed."""
    bars = []

    class Bar:
        def __init__(self, **kw):
            self.kw, self.updates, self.postfix, self.closed = kw, 0, [], False
            bars.append(self)

        def update(self, n):
            self.updates += n

        def set_postfix_str(self, s, refresh=True):
            self.postfix.append(s)

        def close(self):
            self.closed = True

    auto = types.ModuleType("tqdm.auto")
    auto.tqdm = Bar
    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", auto)
    rest.train(small_arrays, out=tmp_path / "bar", **TRAIN)
    assert len(bars) == 1
    bar = bars[0]
    assert bar.kw["total"] == TRAIN["epochs"] and bar.kw["unit"] == "epoch"
    assert bar.updates == TRAIN["epochs"] and bar.closed
    assert len(bar.postfix) == TRAIN["epochs"] and "worst-group" in bar.postfix[0]


def test_real_tqdm_bar(small_arrays, tmp_path, capsys):
    """With tqdm installed (the CI installs it), its bar counts the epochs on stderr."""
    pytest.importorskip("tqdm.auto")
    rest.train(small_arrays, out=tmp_path / "tqdm", **TRAIN)
    err = capsys.readouterr().err
    assert "rest train" in err and f"{TRAIN['epochs']}/{TRAIN['epochs']}" in err, err


def test_the_gil_is_released_while_training(small_arrays, tmp_path):
    """A Python thread keeps running during the epochs (the GIL is taken back only briefly,
    per epoch)."""
    ticks, stop = [], threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.01)

    t = threading.Thread(target=tick)
    t.start()
    try:
        start = time.monotonic()
        rest.train(small_arrays, out=tmp_path / "gil", progress=False, **TRAIN)
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        t.join()
    during = [x for x in ticks if start <= x <= start + elapsed]
    # At 10 ms a tick, a thread that ran throughout ticks about 100 times a second (fewer on
    # a busy machine); one blocked by a held GIL would tick about once per epoch.
    assert len(during) > 0.2 * elapsed / 0.011, (len(during), elapsed)
