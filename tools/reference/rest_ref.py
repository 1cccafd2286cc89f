"""A compact PyTorch implementation of REST's recipe, to check `rest` against on the same images.

usage: python rest_ref.py DATA [--model cnn] [--density 0.05] [--upweight 80] [--epochs 20]
                          [--batch-size 256] [--lr 0.01] [--seed 42] [--threads 2] [--out FILE]

DATA is a folder written by `rest data export --data DIR --conflict-pct PCT --out DATA`:
{train,valid,test}_{images,labels,bias}.npy (uint8 NHWC images; a sample is bias-aligned when
its label equals its bias attribute). The recipe, as `rest train` runs it by default:

- the model with PyTorch's default initialisation (models.py); images scaled to [0, 1];
- ERK initial layer densities (score (sum of dims) / (product of dims), layers that would
  exceed density 1 made dense and the rest rescaled) and uniformly random initial masks over
  every conv and linear weight; density 1 trains dense;
- re-weighting by weighted sampling with replacement: each epoch draws len(train) samples,
  bias-conflicting ones with weight LAMBDA (--upweight; 1 = plain ERM);
- SGD with momentum 0.9, cross-entropy; after every step the masks are multiplied into the
  weights and the momentum buffers;
- RigL mask updates every --update-frequency steps (scaled down so that a run has at least 10),
  up to the last step: each layer drops round(rate * active) of its active weights of smallest
  magnitude and regrows as many, among the positions inactive before the update, where the
  dense gradient of that step is largest; regrown weights start at 0 with zero momentum; the
  rate decays from --prune-rate (0.5) to 0.005 by a cosine over the run;
- ReduceLROnPlateau on the validation loss (factor 0.1, patience 5, relative threshold 1e-4);
- model selection by validation worst-group accuracy (the lower of the bias-aligned and the
  bias-conflicting accuracy; the earlier epoch on ties); the test split evaluated once, on the
  selected epoch's weights.

Prints (and with --out writes) a JSON object shaped like `rest`'s summary.json: the selected
epoch, its validation metrics, the test metrics (accuracy, aligned, conflicting, worst_group,
unbiased = mean over (label, bias) cells, loss), the final density and the wall time.
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402


def load_split(root, name):
    def npy(kind):
        path = os.path.join(root, f"{name}_{kind}.npy")
        if not os.path.isfile(path):
            sys.exit(f"error: {path} is missing: give a folder written by `rest data export`")
        return np.load(path)
    images = torch.from_numpy(npy("images")).permute(0, 3, 1, 2).float().div_(255.0)
    labels = torch.from_numpy(npy("labels").astype(np.int64))
    bias = torch.from_numpy(npy("bias").astype(np.int64))
    if not (len(images) == len(labels) == len(bias)):
        sys.exit(f"error: {root}: {name} images, labels and bias differ in length")
    return images, labels, bias


def erk_densities(shapes, density):
    """Per-layer densities of ERK for a total `density` (iterative water filling)."""
    numel = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense = [False] * len(shapes)
    budget = density * sum(numel)
    while True:
        free = [i for i in range(len(shapes)) if not dense[i]]
        left = budget - sum(numel[i] for i in range(len(shapes)) if dense[i])
        eps = left / sum(raw[i] * numel[i] for i in free)
        over = [i for i in free if eps * raw[i] > 1.0]
        if not over:
            return [1.0 if dense[i] else eps * raw[i] for i in range(len(shapes))]
        for i in over:
            dense[i] = True


def group_metrics(preds, labels, bias, loss):
    correct = (preds == labels).float()
    aligned = labels == bias

    def acc(m):
        return correct[m].mean().item() if m.any() else None

    cells = [acc((labels == y) & (bias == b)) for y in labels.unique() for b in bias.unique()]
    cells = [c for c in cells if c is not None]
    a, c = acc(aligned), acc(~aligned)
    return {
        "n": len(labels), "loss": loss, "accuracy": correct.mean().item(),
        "aligned": a, "conflicting": c,
        "worst_group": min(x for x in (a, c) if x is not None),
        "worst_cell": min(cells), "unbiased": sum(cells) / len(cells),
    }


@torch.no_grad()
def evaluate(model, split, batch=1000):
    images, labels, bias = split
    model.eval()
    preds, loss = [], 0.0
    for i in range(0, len(images), batch):
        logits = model(images[i:i + batch])
        loss += F.cross_entropy(logits, labels[i:i + batch], reduction="sum").item()
        preds.append(logits.argmax(1))
    return group_metrics(torch.cat(preds), labels, bias, loss / len(images))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--upweight", type=float, default=80.0)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--update-frequency", type=int, default=1000)
    ap.add_argument("--prune-rate", type=float, default=0.5)
    ap.add_argument("--final-prune-rate", type=float, default=0.005)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the summary JSON here")
    a = ap.parse_args()
    if not 0.0 < a.density <= 1.0:
        sys.exit(f"error: --density must be in (0, 1], got {a.density}")
    if not a.upweight > 0.0:
        sys.exit(f"error: --upweight must be positive, got {a.upweight}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    start = time.time()
    train, valid, test = (load_split(a.data, s) for s in ("train", "valid", "test"))
    n, c, h, w = train[0].shape
    classes = int(max(train[1].max(), valid[1].max(), test[1].max()).item()) + 1
    model = models.build(a.model, classes, c, h)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum)
    weights = [p for _, p in models.maskable(model)]

    sparse = a.density < 1.0
    steps_per_epoch = math.ceil(n / a.batch_size)
    total = steps_per_epoch * a.epochs
    freq = a.update_frequency
    if (total - 1) // freq < 10:
        freq = max((total - 1) // 10, 1)
    masks = []
    if sparse:
        dens = erk_densities([tuple(p.shape) for p in weights], a.density)
        for p, d in zip(weights, dens):
            k = round(d * p.numel())
            m = torch.zeros(p.numel())
            m[torch.randperm(p.numel())[:k]] = 1.0
            masks.append(m.view_as(p))
        with torch.no_grad():
            for p, m in zip(weights, masks):
                p.mul_(m)

    def rate(step):
        if step >= total:
            return a.final_prune_rate
        return a.final_prune_rate + (a.prune_rate - a.final_prune_rate) * (
            1 + math.cos(math.pi * step / total)) / 2

    sample_w = torch.where(train[1] == train[2], 1.0, a.upweight).double()
    lr, best_loss, bad = a.lr, float("inf"), 0
    best, best_score, best_epoch, step = None, -1.0, None, 0
    for epoch in range(1, a.epochs + 1):
        model.train()
        order = torch.multinomial(sample_w, n, replacement=True)
        for i in range(0, n, a.batch_size):
            idx = order[i:i + a.batch_size]
            x, y = train[0][idx], train[1][idx]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            update = sparse and step % freq == 0 and step < total
            with torch.no_grad():
                for p, m in zip(weights, masks):
                    if update:
                        g, flat_m = p.grad.flatten(), m.flatten()
                        active = int(flat_m.sum().item())
                        inactive = flat_m == 0
                        k = min(round(rate(step) * active), int(inactive.sum().item()))
                        if k > 0:
                            mag = p.detach().abs().flatten().masked_fill(inactive, float("inf"))
                            drop = torch.topk(mag, k, largest=False).indices
                            score = g.abs().masked_fill(~inactive, -1.0)
                            grow = torch.topk(score, k).indices
                            flat_m[drop] = 0.0
                            flat_m[grow] = 1.0
                            p.view(-1)[grow] = 0.0
                            buf = opt.state[p].get("momentum_buffer")
                            if buf is not None:
                                buf.view(-1)[grow] = 0.0
                    p.mul_(m)
                    buf = opt.state[p].get("momentum_buffer")
                    if buf is not None:
                        buf.mul_(m)
        val = evaluate(model, valid)
        if val["worst_group"] > best_score or best_epoch is None:
            best_score, best_epoch = val["worst_group"], epoch
            best = (copy.deepcopy(model.state_dict()), val)
        if val["loss"] < best_loss * (1 - 1e-4):
            best_loss, bad = val["loss"], 0
        else:
            bad += 1
            if bad > 5:
                bad, lr = 0, lr * 0.1
                for g in opt.param_groups:
                    g["lr"] = lr
        print(f"epoch {epoch}/{a.epochs}: valid acc {val['accuracy']:.3f} worst-group "
              f"{val['worst_group']:.3f} loss {val['loss']:.4f} lr {lr:g}", file=sys.stderr)
    model.load_state_dict(best[0])
    kept = sum(int((p != 0).sum().item()) for p in weights)
    summary = {
        "framework": f"pytorch-{torch.__version__}", "model": a.model, "density": a.density,
        "upweight": a.upweight, "seed": a.seed, "epochs": a.epochs,
        "selected_epoch": best_epoch, "valid": best[1], "test": evaluate(model, test),
        "final_density": kept / sum(p.numel() for p in weights),
        "update_frequency": freq if sparse else None,
        "wall_time_s": time.time() - start,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
