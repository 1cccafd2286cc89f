"""Writes the `--init-from` test fixture: a tiny ResNet-18 (BasicBlocks [2, 2, 2, 2], width 4,
ImageNet stem, 5 classes) with torchvision's parameter names, saved by PyTorch as a state dict
(`tests/fixtures/init/resnet18w4.pth`), and its eval-mode logits on two fixed 3x32x32 inputs
(`tests/fixtures/init/resnet18w4-logits.json`), which `rest` must reproduce within 1e-4.

The module tree mirrors torchvision.models.resnet (conv1, bn1, layer1..layer4 of blocks with
conv1/bn1/conv2/bn2 and downsample.0/.1, fc) so that the state dict's names are torchvision's;
torchvision itself fixes the width at 64, which would make the fixture 45 MB.

Run: python tools/reference/make_init_fixture.py   (PyTorch 2.x, CPU)
"""
import json
import os

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        idt = x if self.downsample is None else self.downsample(x)
        return self.relu(out + idt)


class ResNet(nn.Module):
    def __init__(self, blocks=(2, 2, 2, 2), width=4, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, n in enumerate(blocks):
            planes = width << i
            layer = []
            for b in range(n):
                layer.append(BasicBlock(cin, planes, 2 if i > 0 and b == 0 else 1))
                cin = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def inputs(n=2, c=3, h=32, w=32):
    """The fixed inputs, exact in f32: ((7n + 13c + 17y + 19x) mod 23) / 11 - 1."""
    x = torch.zeros(n, c, h, w)
    for a in range(n):
        for b in range(c):
            for y in range(h):
                for z in range(w):
                    x[a, b, y, z] = ((7 * a + 13 * b + 17 * y + 19 * z) % 23) / 11.0 - 1.0
    return x


def main():
    torch.manual_seed(0)
    model = ResNet()
    # Non-trivial BatchNorm statistics and affine parameters, so that eval mode matters.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    with torch.no_grad():
        logits = model(inputs())
    out = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "init")
    os.makedirs(out, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(out, "resnet18w4.pth"))
    with open(os.path.join(out, "resnet18w4-logits.json"), "w") as f:
        json.dump(
            {
                "model": "resnet18",
                "width": 4,
                "stem": "imagenet",
                "classes": 5,
                "input": [2, 3, 32, 32],
                "input_formula": "((7n + 13c + 17y + 19x) mod 23) / 11 - 1",
                "torch": torch.__version__,
                "logits": logits.tolist(),
            },
            f,
            indent=1,
        )
        f.write("\n")


if __name__ == "__main__":
    main()
