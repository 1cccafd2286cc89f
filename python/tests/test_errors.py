"""Bad arrays, options and paths raise the documented exceptions with clear messages (never
a crash of the interpreter)."""

import numpy as np
import pytest

import rest


def split(n=8, h=6, w=6, c=3, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "images": rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8),
        "labels": np.arange(n) % classes,
        "bias": (np.arange(n) + (np.arange(n) % 4 == 0)) % classes,
    }


def make(**changes):
    parts = {"train": split(), "valid": split(seed=1), "test": split(seed=2)}
    for key, value in changes.items():
        name, field = key.split("__")
        parts[name][field] = value
    return rest.Dataset.from_arrays(parts["train"], parts["valid"], parts["test"])


def test_good_arrays_make_a_dataset():
    ds = make()
    assert ds.num_classes == 3
    assert ds.image_shape == (6, 6, 3)
    back = ds.arrays("valid")
    np.testing.assert_array_equal(back["images"], split(seed=1)["images"])
    np.testing.assert_array_equal(back["labels"], split(seed=1)["labels"])


def test_tuples_are_splits_too():
    t = split()
    ds = rest.Dataset.from_arrays(
        (t["images"], t["labels"], t["bias"]), split(seed=1), split(seed=2)
    )
    np.testing.assert_array_equal(ds.arrays("train")["bias"], t["bias"])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"train__images": np.zeros((8, 6, 6, 3), np.float32)}, "uint8"),
        ({"train__images": np.zeros((8, 6, 6), np.uint8)}, "shape [N, H, W, C]"),
        ({"valid__images": [[1, 2]]}, "must be a NumPy array"),
        ({"train__labels": np.zeros(7, np.int64)}, "has 7 entries but there are 8 images"),
        ({"test__bias": np.zeros(9, np.int64)}, "has 9 entries but there are 8 images"),
        ({"train__labels": np.full(8, -1)}, "class indices >= 0"),
        ({"train__labels": np.zeros(8, np.float64)}, "integer array"),
        ({"train__labels": np.zeros((8, 1), np.int64)}, "1-D integer array"),
        ({"test__images": np.zeros((8, 5, 6, 3), np.uint8)}, "same image shape"),
        ({"train__images": np.zeros((0, 6, 6, 3), np.uint8)}, "is empty"),
    ],
)
def test_bad_arrays_raise_value_error(changes, message):
    with pytest.raises(ValueError, match=None) as e:
        make(**changes)
    assert message in str(e.value), str(e.value)


def test_labels_out_of_range():
    t = split()
    with pytest.raises(ValueError, match=r"out of range for num_classes=2"):
        rest.Dataset.from_arrays(t, split(seed=1), split(seed=2), num_classes=2)


def test_split_must_be_a_dict_or_tuple():
    with pytest.raises(ValueError, match="must be a dict"):
        rest.Dataset.from_arrays([1, 2, 3], split(), split())
    with pytest.raises(ValueError, match="missing `bias`"):
        rest.Dataset.from_arrays({"images": split()["images"], "labels": split()["labels"]}, split(), split())


def test_no_conflicting_samples_needs_conflict_pct():
    t = split()
    t["bias"] = t["labels"].copy()
    with pytest.raises(ValueError, match="conflict_pct"):
        rest.Dataset.from_arrays(t, split(), split())
    rest.Dataset.from_arrays(t, split(), split(), conflict_pct=1.0)


def test_builtin_options_are_checked_as_the_cli_does():
    with pytest.raises(ValueError, match="--conflict-pct must be a percentage"):
        rest.Dataset.colored_mnist(conflict_pct=120)
    with pytest.raises(ValueError, match="--train-size must be at least 1"):
        rest.Dataset.colored_mnist(train_size=0)


def test_missing_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        rest.Dataset.folder(tmp_path / "nope")


def test_unknown_option_names_the_nearest():
    ds = make()
    with pytest.raises(ValueError, match=r"unknown option `densty` \(did you mean `density`\?\)"):
        rest.train(ds, densty=0.1)


def test_bad_option_values_carry_the_cli_message():
    ds = make()
    with pytest.raises(ValueError, match="--density"):
        rest.train(ds, density=1.5)
    with pytest.raises(ValueError, match="model"):
        rest.train(ds, model="transformer")
    with pytest.raises(ValueError, match="must be a bool, int, float, str or path"):
        rest.train(ds, density=[0.1])


def test_dataset_options_belong_to_the_dataset():
    with pytest.raises(ValueError, match="give it to the Dataset"):
        rest.train(make(), conflict_pct=1)


def test_option_names_are_the_config_keys():
    names = rest.option_names()
    assert "density" in names and "epochs" in names and "out" in names
    assert "conflict_pct" not in names


def test_load_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        rest.load(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="no best.safetensors"):
        rest.load(tmp_path)


def test_load_a_file_that_is_no_checkpoint(tmp_path):
    bad = tmp_path / "best.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises((ValueError, OSError)) as e:
        rest.load(bad)
    assert "--checkpoint" in str(e.value) or "best.safetensors" in str(e.value)
