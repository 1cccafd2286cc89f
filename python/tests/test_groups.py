"""Arrays with `attributes` (instead of `bias`) make (label, attribute) groups as a metadata
table does: minority groups by `minority_share` or `minority_groups`, used by every method, and
the summary's worst-group, per-group and weighted accuracies; the same run as on the table
folder (`rest data make colored-mnist --format subpopbench`) read with `Dataset.folder`."""

import numpy as np
import pytest

import rest
from conftest import run_cli

FAST = dict(epochs=1, seed=1, threads=2, batch_size=64)


def with_attributes(ds: rest.Dataset):
    """The splits of `ds` with the bias attribute given as a table's attribute."""
    out = []
    for split in ("train", "valid", "test"):
        a = ds.arrays(split)
        out.append({"images": a["images"], "labels": a["labels"], "attributes": a["bias"]})
    return out


@pytest.fixture(scope="module")
def attribute_splits(small_builtin):
    return with_attributes(small_builtin)


def train_pairs(splits):
    return list(zip(splits[0]["labels"].tolist(), splits[0]["attributes"].tolist()))


def two_minority_groups(splits):
    """The two most frequent off-diagonal (label, attribute) groups of the training split."""
    pairs = [p for p in train_pairs(splits) if p[0] != p[1]]
    return sorted(sorted(set(pairs), key=lambda g: (-pairs.count(g), g))[:2])


def test_attributes_train_with_table_groups(attribute_splits, tmp_path):
    train = attribute_splits[0]
    ds = rest.Dataset.from_arrays(*attribute_splits)
    # The (label, attribute) groups under 0.2 of their class: here the off-colour samples.
    conflicting = train["labels"] != train["attributes"]
    assert "conflict_pct=%.3f" % (100 * conflicting.mean()) in repr(ds)
    back = ds.arrays("train")
    assert "bias" not in back
    np.testing.assert_array_equal(back["attributes"], train["attributes"])

    run = rest.train(ds, out=tmp_path / "up", method="upweight", **FAST)
    groups = run.summary["groups"]
    assert "0.2" in groups["rule"]
    cells = {(g["label"], g["attribute"]): g for g in groups["train_groups"]}
    assert set(cells) == set(zip(train["labels"].tolist(), train["attributes"].tolist()))
    for (l, a), g in cells.items():
        n_class = int((train["labels"] == l).sum())
        assert g["count"] == int(((train["labels"] == l) & (train["attributes"] == a)).sum())
        assert g["minority"] == (g["count"] / n_class < 0.2)
    for split in ("valid", "test"):
        m = run.summary[split]
        per_group = m["groups"]
        assert per_group and all(set(g) >= {"label", "attribute", "n", "accuracy", "minority"} for g in per_group)
        assert m["worst_group"] == pytest.approx(min(g["accuracy"] for g in per_group))
        assert 0.0 <= m["weighted_accuracy"] <= 1.0
        assert sum(g["n"] for g in per_group) == len(attribute_splits[1 if split == "valid" else 2]["labels"])


@pytest.mark.parametrize("method", ["jtt", "group-dro", "balanced"])
def test_every_method_uses_the_attribute_groups(attribute_splits, tmp_path, method):
    chosen = two_minority_groups(attribute_splits)
    ds = rest.Dataset.from_arrays(*attribute_splits, minority_groups=",".join(f"{l}:{a}" for l, a in chosen))
    opts = dict(FAST, method=method)
    if method == "jtt":
        opts["jtt_epochs"] = 1
    run = rest.train(ds, out=tmp_path / method, **opts)
    minority = {(g["label"], g["attribute"]) for g in run.summary["groups"]["train_groups"] if g["minority"]}
    assert minority == set(chosen)
    assert "--minority-groups" in run.summary["groups"]["rule"]
    assert run.summary["test"]["groups"]
    if method == "jtt":
        # JTT's report compares its error set with the minority-group samples.
        pairs = train_pairs(attribute_splits)
        assert run.summary["jtt"]["conflicting"] == sum(pairs.count(g) for g in chosen)


def minority_repr(groups):
    """A set of (label, attribute) pairs as the Dataset's repr prints it (sorted)."""
    return "minority {" + ", ".join(f"({l}, {a})" for l, a in sorted(groups)) + "}"


def test_minority_groups_as_pairs_and_share(attribute_splits):
    chosen = two_minority_groups(attribute_splits)
    as_pairs = rest.Dataset.from_arrays(*attribute_splits, minority_groups=chosen[::-1])
    assert minority_repr(set(chosen)) in repr(as_pairs)
    pairs = train_pairs(attribute_splits)
    share = lambda g: pairs.count(g) / sum(1 for p in pairs if p[0] == g[0])
    for t in (0.5, 1.0):
        ds = rest.Dataset.from_arrays(*attribute_splits, minority_share=t, conflict_pct=5)
        assert minority_repr({g for g in set(pairs) if share(g) < t}) in repr(ds)


def write_idx(dir, prefix, images, labels):
    """MNIST's IDX files of uint8 [N, 28, 28] digits and their labels."""
    n = len(labels)
    head = lambda *v: b"".join(int(x).to_bytes(4, "big") for x in v)
    (dir / f"{prefix}-images-idx3-ubyte").write_bytes(head(0x0803, n, 28, 28) + images.tobytes())
    (dir / f"{prefix}-labels-idx1-ubyte").write_bytes(head(0x0801, n) + labels.astype(np.uint8).tobytes())


def test_attribute_arrays_train_as_the_table_folder(small_builtin, tmp_path):
    """`rest data make colored-mnist --format subpopbench` (a metadata-table folder) ->
    Dataset.folder -> its arrays (with `attributes`) -> from_arrays: the same metrics.csv,
    group metrics and summary groups as training on the folder itself."""
    src = tmp_path / "mnist"
    src.mkdir()
    a = small_builtin.arrays("train")
    gray = a["images"].max(axis=3)
    write_idx(src, "train", gray[:500], a["labels"][:500])
    write_idx(src, "t10k", gray[500:650], a["labels"][500:650])
    data = tmp_path / "cm-subpop"
    run_cli(
        "data", "make", "colored-mnist", "--source", str(src), "--out", str(data),
        "--format", "subpopbench", "--conflict-pct", "5",
    )
    folder = rest.Dataset.folder(data)
    assert folder.num_classes == 10 and folder.image_shape == (28, 28, 3)
    splits = [folder.arrays(s) for s in ("train", "valid", "test")]
    assert all("attributes" in s and "bias" not in s for s in splits)
    assert len(splits[0]["labels"]) == 500
    arrays = rest.Dataset.from_arrays(*splits, conflict_pct=5)
    folder_run = rest.train(folder, out=tmp_path / "folder", method="upweight", **FAST)
    arrays_run = rest.train(arrays, out=tmp_path / "arrays", method="upweight", **FAST)
    assert folder_run.summary["test"]["groups"]
    assert folder_run.summary["groups"]["train_groups"]
    folder_csv = (folder_run.run_dir / "metrics.csv").read_text()
    assert (arrays_run.run_dir / "metrics.csv").read_text() == folder_csv
    for k in ("valid", "test", "groups", "upweight", "selected_epoch"):
        assert arrays_run.summary[k] == folder_run.summary[k], k


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s[0].update(attributes=s[0]["attributes"].astype(np.float32)), "1-D integer array"),
        (lambda s: s[1].update(attributes=s[1]["attributes"][:-1]), "has 299 entries but there are 300 images"),
        (lambda s: s[2].update(attributes=-s[2]["attributes"] - 1), "class indices >= 0"),
        (lambda s: s[0].update(attributes=s[0]["attributes"] + 100_000), "small integer codes"),
        (lambda s: s[0].update(attributes=s[0]["attributes"][:, None]), "1-D integer array"),
        (lambda s: s[0].update(bias=s[0]["attributes"]), "both `bias` and `attributes`"),
        (lambda s: s[1].update(bias=s[1].pop("attributes")), "every split needs the same kind"),
    ],
)
def test_bad_attribute_arrays_raise_value_error(attribute_splits, change, message):
    splits = [dict(s) for s in attribute_splits]
    change(splits)
    with pytest.raises(ValueError) as e:
        rest.Dataset.from_arrays(*splits)
    assert message in str(e.value), str(e.value)


def test_bad_minority_rules_raise_value_error(attribute_splits, small_arrays):
    def bad(message, **kw):
        with pytest.raises(ValueError) as e:
            rest.Dataset.from_arrays(*attribute_splits, **kw)
        assert message in str(e.value), str(e.value)

    bad("minority_share must be a share in (0, 1]", minority_share=0.0)
    bad("exclude each other", minority_share=0.1, minority_groups="0:1")
    l, a = next((l, a) for l in range(10) for a in range(10) if (l, a) not in set(train_pairs(attribute_splits)))
    bad(f"no training sample has label {l} and attribute {a}", minority_groups=f"{l}:{a}")
    bad("is not LABEL:ATTRIBUTE", minority_groups="0-1")
    bad("non-negative integers", minority_groups=[(0, -1)])
    bad("must be a string", minority_groups=3.5)
    bad("is empty", minority_groups=[])
    bad("samples in minority groups", minority_share=1e-9)
    tuples = [(s["images"], s["labels"], s["attributes"]) for s in attribute_splits]
    with pytest.raises(ValueError, match="give the splits `attributes` instead of `bias`"):
        rest.Dataset.from_arrays(*tuples, minority_share=0.1)
    ds = rest.Dataset.from_arrays(*attribute_splits)
    with pytest.raises(ValueError, match=r"give it to rest.Dataset.from_arrays\(\.\.\., minority_share"):
        rest.train(ds, minority_share=0.1)
