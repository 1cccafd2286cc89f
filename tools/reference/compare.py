"""Side-by-side accuracy of `rest` runs and `rest_ref.py` runs of the same setting.

usage: python compare.py --rest RUN_DIR [RUN_DIR ...] --ref REF_JSON [REF_JSON ...] [--name NAME]

Reads each `rest` run's summary.json and each reference summary (rest_ref.py --out), and
prints a Markdown table row per metric (test unbiased, bias-conflicting and worst-group
accuracy in %, wall time in s): mean ± sample std over the runs of each side, the difference
of the means, and whether they agree: |difference| <= 2 points, or < one pooled standard
deviation.
"""
import argparse
import json
import math
import os
import statistics
import sys


def load(path):
    p = os.path.join(path, "summary.json") if os.path.isdir(path) else path
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot read {p}: {e}")


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rest", nargs="+", required=True)
    ap.add_argument("--ref", nargs="+", required=True)
    ap.add_argument("--name", default="")
    a = ap.parse_args()
    rest = [load(p) for p in a.rest]
    ref = [load(p) for p in a.ref]
    print(f"| {a.name} | rest (n={len(rest)}) | PyTorch reference (n={len(ref)}) | difference | agree |")
    print("|---|---|---|---|---|")
    for key, label in [("unbiased", "unbiased %"), ("conflicting", "conflicting %"),
                       ("worst_group", "worst-group %")]:
        r = [100 * s["test"][key] for s in rest]
        q = [100 * s["test"][key] for s in ref]
        (mr, sr), (mq, sq) = mean_std(r), mean_std(q)
        pooled = math.sqrt((sr ** 2 + sq ** 2) / 2)
        diff = mr - mq
        agree = abs(diff) <= 2.0 or abs(diff) < pooled
        print(f"| {label} | {mr:.2f} ± {sr:.2f} | {mq:.2f} ± {sq:.2f} | {diff:+.2f} | "
              f"{'yes' if agree else 'NO'} |")
    (wr, _), (wq, _) = mean_std([s["wall_time_s"] for s in rest]), mean_std(
        [s["wall_time_s"] for s in ref])
    print(f"| wall time s | {wr:.1f} | {wq:.1f} | {wq / wr:.1f}x | |")


if __name__ == "__main__":
    main()
