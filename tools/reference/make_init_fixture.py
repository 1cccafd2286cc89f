"""Writes the `--init-from` test fixtures: tiny ResNets with torchvision's parameter names,
ImageNet stem and 5 classes, saved by PyTorch as state dicts, with their eval-mode logits on two
fixed 3x32x32 inputs, which `rest` must reproduce within 1e-4:

- `tests/fixtures/init/resnet18w4.pth` (+ `-logits.json`): BasicBlocks [2, 2, 2, 2], width 4;
- `tests/fixtures/init/resnet50w2.pth` (+ `-logits.json`): Bottlenecks [3, 4, 6, 3]
  (1x1, 3x3 with the stride, 1x1 with expansion 4: torchvision's v1.5), width 2.

The module tree mirrors torchvision.models.resnet (conv1, bn1, layer1..layer4 of blocks with
conv1/bn1/conv2/bn2 (/conv3/bn3 in Bottlenecks) and downsample.0/.1, fc) so that the state
dict's names are torchvision's; torchvision itself fixes the width at 64, which would make the
fixtures 45 and 100 MB.

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


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, 1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        idt = x if self.downsample is None else self.downsample(x)
        return self.relu(out + idt)


BasicBlock.expansion = 1


class ResNet(nn.Module):
    def __init__(self, blocks=(2, 2, 2, 2), width=4, classes=5, block=BasicBlock):
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
                layer.append(block(cin, planes, 2 if i > 0 and b == 0 else 1))
                cin = planes * block.expansion
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


def write(name, model, kind, width):
    """Randomises `model`'s BatchNorms (continuing torch's seeded draws), saves its state dict as `<name>.pth` and its
    eval-mode logits as `<name>-logits.json`."""
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
    torch.save(model.state_dict(), os.path.join(out, f"{name}.pth"))
    with open(os.path.join(out, f"{name}-logits.json"), "w") as f:
        json.dump(
            {
                "model": kind,
                "width": width,
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


def main():
    # The ResNet-18's draws are those of the first version of this script (seed 0, the
    # weights, then the BatchNorms), so its fixture keeps its values.
    torch.manual_seed(0)
    write("resnet18w4", ResNet(), "resnet18", 4)
    torch.manual_seed(1)
    r50 = ResNet(blocks=(3, 4, 6, 3), width=2, block=Bottleneck)
    write("resnet50w2", r50, "resnet50", 2)


if __name__ == "__main__":
    main()
