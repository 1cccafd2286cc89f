"""PyTorch timings of the models `rest` trains, for `rest bench --reference FILE`.

usage: python bench.py MODEL [--batch B] [--hw H] [--steps N] [--warmup W] [--threads T]
                       [--infer] [--device cpu|cuda|cuda:N] [--width W] [--stem imagenet|cifar]

MODEL: cnn | mlp (3x28x28 inputs) | resnet10 | resnet18 | resnet50 (--hw 32 by default).
Times a training step (forward, cross-entropy, backward, SGD with momentum 0.9) or, with
--infer, an inference batch (eval mode, no gradients), on random data, and prints one JSON
line: model, mode, batch, hw, threads, device, median/min/max milliseconds and the peak RSS,
the keys `rest bench --reference` joins on (CPU lines at equal thread counts). On a GPU the
device is synchronised after every step, so the times are of completed work.

Set up once (about 5 GB): python3 -m venv ~/.torchref && ~/.torchref/bin/pip install torch numpy
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["cnn", "mlp", "resnet10", "resnet18", "resnet50"])
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size (default 256; ResNets 64, as rest bench)")
    ap.add_argument("--hw", type=int, default=None, help="image size (default 28; ResNets 32)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--infer", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--stem", default="imagenet", choices=["imagenet", "cifar"])
    a = ap.parse_args()
    resnet = a.model.startswith("resnet")
    batch = a.batch or (64 if resnet else 256)
    hw = a.hw or (32 if resnet else 28)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"error: --device {a.device} but torch.cuda.is_available() is False")
    dev = torch.device(a.device)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = models.build(a.model, 10, 3, hw, a.width, a.stem).to(dev)
    x = torch.rand(batch, 3, hw, hw, device=dev)
    y = torch.arange(batch, device=dev) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    for it in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        if a.infer:
            model.eval()
            with torch.no_grad():
                model(x).argmax(1)
        else:
            model.train()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        sync()
        if it >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    rec = {
        "framework": f"pytorch-{torch.__version__}",
        "model": a.model, "batch": batch, "hw": hw,
        "mode": "infer" if a.infer else "train",
        "threads": a.threads, "device": dev.type,
        "median_ms": round(statistics.median(times), 3),
        "min_ms": round(min(times), 3), "max_ms": round(max(times), 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if dev.type == "cuda":
        rec["gpu"] = torch.cuda.get_device_name(dev)
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
