"""rest: REST (reweighted sparse training) for group-robust, sparse image classifiers.

The Python module of the `rest` toolkit, over the same Rust core as the `rest` command:

    import rest
    ds = rest.Dataset.colored_mnist(conflict_pct=5)
    run = rest.train(ds, density=0.05, epochs=2, out="runs/py")
    model = rest.load(run.run_dir)
    model.predict(ds.arrays("test")["images"])

`rest.train` takes the command line's options as keywords (`rest train --help`, with `_`
for `-`); `rest.option_names()` lists them.
"""

from ._rest import Dataset, Model, Run, __version__, load, option_names, train

__all__ = ["Dataset", "Model", "Run", "__version__", "load", "option_names", "train"]
