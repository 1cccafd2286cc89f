"""PyTorch reference timings on a GPU, for `rest bench --device cuda --reference FILE`.

usage: python torch_gpu_ref.py MODEL [--batch B] [--hw H] [--steps N] [--warmup W] [--infer]
                               [--device cuda|cpu] [--torch-ref PATH]
The models are those of the project's CPU reference script (shared/bench/torch_ref.py, found
next to the repository or given with --torch-ref), timed the same way (forward, cross-entropy,
backward, SGD momentum 0.9; or inference with --infer) with the device synchronised after every
step. Prints one JSON line with the keys `rest bench --reference` joins on.
"""
import argparse, importlib.util, json, os, statistics, sys, time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CANDIDATES = [
    os.path.join(REPO, "shared", "bench", "torch_ref.py"),
    os.path.join(os.path.dirname(REPO), "shared", "bench", "torch_ref.py"),
]


def load_models(path):
    paths = [path] if path else CANDIDATES
    for p in paths:
        if p and os.path.isfile(p):
            spec = importlib.util.spec_from_file_location("torch_ref", p)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return {"cnn": mod.cnn, "mlp": mod.mlp, "resnet18": mod.resnet18}
    sys.exit("error: cannot find shared/bench/torch_ref.py (looked in: %s); pass --torch-ref PATH"
             % ", ".join(paths))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=["cnn", "mlp", "resnet18"])
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--hw", type=int, default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--infer", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--torch-ref", default=None)
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device %s but torch.cuda.is_available() is False" % a.device)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    models = load_models(a.torch_ref)
    batch = a.batch or (64 if a.model == "resnet18" else 256)
    hw = a.hw or (32 if a.model == "resnet18" else 28)
    model = models[a.model]().to(dev)
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
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(json.dumps({"framework": f"pytorch-{torch.__version__}", "model": a.model, "batch": batch,
                      "hw": hw, "mode": "infer" if a.infer else "train",
                      "threads": torch.get_num_threads(), "device": dev.type, "gpu": name,
                      "median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3),
                      "max_ms": round(max(times), 3)}))


if __name__ == "__main__":
    main()
