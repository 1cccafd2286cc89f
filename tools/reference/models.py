"""The networks `rest` trains, in PyTorch, with PyTorch's default initialisation.

- cnn:  REST's Colored-MNIST CNN: three 4x4 stride-2 convolutions (padding 1, no bias) with
        BatchNorm and ReLU (64, 128, 256 channels), global average pooling, a linear classifier.
- mlp:  LfF's MLP: flatten, 3 hidden layers of 100 with ReLU, a linear classifier.
- resnet10/18/50: torchvision-style ResNet v1.5 (BasicBlock or Bottleneck) of variable width
        (`width` channels in the first stage), with the ImageNet stem (7x7/2 conv + 3x3/2 max
        pool) or the CIFAR stem (3x3/1 conv), as REST's `resnet18vw` and `rest --model resnetN`.

The layer names follow PyTorch; what matters for comparisons with `rest` is the computation.
"""
import torch.nn as nn
import torch.nn.functional as F


def cnn(classes=10, in_ch=3):
    layers, c = [], in_ch
    for o in (64, 128, 256):
        layers += [nn.Conv2d(c, o, 4, 2, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
        c = o
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def mlp(classes=10, in_features=3 * 28 * 28, hidden=100):
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, classes),
    )


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut(cin, planes, stride)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        cout = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, 1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # v1.5: the stride sits on the 3x3 convolution.
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = shortcut(cin, cout, stride)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + self.shortcut(x))


def shortcut(cin, cout, stride):
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))


DEPTHS = {10: (Basic, (1, 1, 1, 1)), 18: (Basic, (2, 2, 2, 2)), 50: (Bottleneck, (3, 4, 6, 3))}


def resnet(depth=18, width=64, stem="imagenet", classes=10, in_ch=3):
    block, counts = DEPTHS[depth]
    if stem == "imagenet":
        layers = [nn.Conv2d(in_ch, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    elif stem == "cifar":
        layers = [nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                  nn.ReLU(inplace=True)]
    else:
        raise ValueError(f"stem must be imagenet or cifar, got {stem!r}")
    c = width
    for stage, n in enumerate(counts):
        planes = width * 2 ** stage
        for b in range(n):
            layers.append(block(c, planes, 2 if stage > 0 and b == 0 else 1))
            c = planes * block.expansion
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def build(name, classes=10, in_ch=3, hw=28, width=64, stem="imagenet"):
    """The model `rest train --model NAME` trains, for images of `in_ch` x `hw` x `hw`."""
    if name == "cnn":
        return cnn(classes, in_ch)
    if name == "mlp":
        return mlp(classes, in_ch * hw * hw)
    if name.startswith("resnet") and name[6:].isdigit() and int(name[6:]) in DEPTHS:
        return resnet(int(name[6:]), width, stem, classes, in_ch)
    raise ValueError(f"unknown model {name!r}: cnn, mlp, resnet10, resnet18 or resnet50")


def maskable(model):
    """The weights `rest` masks: every convolution's and linear layer's weight, in order."""
    return [(n, p) for n, p in model.named_parameters()
            if n.endswith("weight") and p.dim() in (2, 4)]
