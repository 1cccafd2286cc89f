"""Type stubs of the `rest` Python module (the Rust extension `rest._rest`)."""

import os
import pathlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

_Path = Union[str, "os.PathLike[str]"]
_Split = Union[Dict[str, npt.ArrayLike], Tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike]]

class Dataset:
    """Train, valid and test splits; each image has a class label and a bias attribute (DFA's
    rule) or an attribute of (label, attribute) groups (a metadata table's)."""

    @staticmethod
    def colored_mnist(
        *,
        conflict_pct: Optional[float] = None,
        color_std: Optional[float] = None,
        data_seed: Optional[int] = None,
        train_size: Optional[int] = None,
        valid_size: Optional[int] = None,
        test_size: Optional[int] = None,
    ) -> "Dataset":
        """Colored MNIST from the built-in digits, as `rest train` without `--data`.

        Arguments are the CLI options of the same name; invalid values raise ValueError
        with the CLI's message (e.g. "--conflict-pct must be a percentage in (0, 100)").
        """
    @staticmethod
    def folder(
        path: _Path,
        *,
        conflict_pct: Optional[float] = None,
        dataset: Optional[str] = None,
        image_size: Optional[int] = None,
        skip_bad: Optional[bool] = None,
        cache_dir: Optional[_Path] = None,
    ) -> "Dataset":
        """A dataset folder (`rest train --data PATH`): the DFA layout or a metadata table.

        `dataset` is the layout (auto, cmnist, cifar10c, bffhq, dfa, subpop, waterbirds,
        celeba, table); `auto` recognises SubpopBench, Waterbirds and CelebA tables, whose
        minority groups `train`'s `minority_share=` / `minority_groups=` choose. A missing
        folder raises FileNotFoundError. The images are read on first use.
        """
    @staticmethod
    def from_arrays(
        train: _Split,
        valid: _Split,
        test: _Split,
        *,
        num_classes: Optional[int] = None,
        conflict_pct: Optional[float] = None,
        name: str = "arrays",
        minority_share: Optional[float] = None,
        minority_groups: Optional[Union[str, Sequence[Tuple[int, int]]]] = None,
    ) -> "Dataset":
        """A dataset from NumPy arrays (copied; no files are written).

        Each split is `{"images": uint8 [N, H, W, C], "labels": int [N], "bias": int [N]}`
        or the tuple `(images, labels, bias)`; a sample is bias-conflicting when its label
        differs from its bias (DFA's rule). Give `"attributes": int [N]` instead of `"bias"`
        in every split for a metadata table's groups: the (label, attribute) cells, minority
        groups those under `minority_share` (default 0.2) of their class's training samples
        or exactly `minority_groups` (`"0:1,1:0"` or `[(0, 1), (1, 0)]`); every method uses
        them and the summary reports per-group and weighted accuracy. (`attributes`, as a
        table's attribute column; `groups=` is `train`'s group-scheme option.)
        `num_classes` defaults to the largest label + 1; `conflict_pct` (which the default
        LAMBDA pairs with) to the training split's share of bias-conflicting (minority-group)
        samples. Bad arrays or rules raise ValueError.
        """
    @property
    def name(self) -> str: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(H, W, C)."""
    def arrays(self, split: str) -> Dict[str, np.ndarray]:
        """One split ("train", "valid", "test") as `{"images", "labels", "bias"}` arrays
        (`"attributes"` instead of `"bias"` for (label, attribute) groups)."""

class Run:
    """A finished training run."""

    run_dir: pathlib.Path
    summary: Dict[str, Any]
    """`summary.json` as a dict (metrics as fractions in [0, 1])."""
    metrics: List[Dict[str, Any]]
    """`metrics.csv`: one dict per epoch and split (train, valid) and the final test row."""
    def metrics_frame(self) -> Any:
        """`metrics` as a pandas DataFrame (ImportError without pandas)."""
    def load(self) -> "Model":
        """The selected model, as `rest.load(run.run_dir)`."""

class Model:
    """A trained model (`rest.load`, `Run.load`)."""

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """The input (H, W, C)."""
    @property
    def num_classes(self) -> int: ...
    @property
    def density(self) -> float: ...
    @property
    def config(self) -> Dict[str, Any]:
        """The run's configuration (`config.toml`)."""
    def predict(self, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """Most probable class (int64 [N]) of uint8 images [N, H, W, C]; GIL released."""
    def predict_proba(self, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """Softmax probabilities (float32 [N, classes]) of uint8 images [N, H, W, C]."""
    def eval(self, dataset: Dataset) -> Dict[str, Any]:
        """Metrics on the valid and test splits, as `rest eval`'s eval.json."""

def train(
    dataset: Dataset,
    *,
    overwrite: bool = False,
    progress: bool = True,
    callback: Optional[Callable[[Dict[str, Any]], Any]] = None,
    **options: Any,
) -> Run:
    """Trains on `dataset` in this process (GIL released) and returns the finished run.

    `progress` shows the epochs as they end: a `tqdm.auto` bar when tqdm is installed (a
    widget in Jupyter), else a line per epoch on `sys.stderr`; `progress=False` shows
    nothing. `callback(d)` is called after every epoch with `d = {"epoch", "epochs",
    "stage" ("train", or "jtt_stage1" for JTT's first loop), "train": row, "valid": row}`,
    each row a `metrics.csv` row as in `Run.metrics`; an exception it raises stops the run
    and propagates.

    `options` are `rest train`'s long flags with `_` for `-` (`rest.option_names()`), e.g.
    `density=0.05, epochs=2, seed=0, out="runs/x", threads=2`; checked as config files are:
    an unknown option raises ValueError naming the nearest one, a bad value ValueError with
    the CLI's message. A directory that holds a run raises FileExistsError unless
    `overwrite=True`. Options that choose the images (conflict_pct, ...) go to the Dataset.
    """

def load(path: _Path) -> Model:
    """A run directory, its best.safetensors, or a sparse export (`rest export`)."""

def option_names() -> List[str]:
    """Every option `train` takes."""
