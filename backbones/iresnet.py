"""Improved ResNet ("iresnet") of insightface: r18, r34, r50, r100, r200.

Parameter names follow insightface ``recognition/arcface_torch/backbones/iresnet.py`` so published
checkpoints load unchanged. ``width`` sets the stem/stage-1 width (stages w, 2w, 4w, 8w; 64 is the
published network) and ``input_size`` the input side; the flattened map feeding ``fc`` has
8w·k² values, k being the input side after four stride-2 stages (7 for 112 px, 4 for 56, 2 for 32).
"""
import numbers

import torch
from torch import nn

from utils.errors import UserError

IRESNET_LAYERS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}


def check_int(value, minimum, what):
    """``value`` as an int ≥ ``minimum``; anything else raises UserError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UserError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_input_size(input_size):
    return check_int(input_size, 16, "input_size (e.g. 112, 56, 32)")


def check_width(width):
    return check_int(width, 1, "network width (64 = published)")


def check_images(x, input_size):
    """Raise UserError unless ``x`` is a batch of 3×S×S images with S = ``input_size``."""
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != input_size or x.shape[3] != input_size:
        raise UserError(f"backbone expects images of shape (B, 3, {input_size}, {input_size}), "
                        f"got {tuple(x.shape)}")


def run_head(head, x, fp32):
    """``head(x)``; with ``fp32``, in fp32 outside any autocast (the published final layers under AMP)."""
    if not fp32:
        return head(x)
    with torch.autocast(x.device.type, enabled=False):
        return head(x.float())


def downsampled_size(size, stages):
    """Side after ``stages`` stride-2 convolutions (kernel 3, padding 1): ceil(size / 2) each time."""
    for _ in range(stages):
        size = (size + 1) // 2
    return size


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN, plus the (projected) input."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """Stem conv3×3 + BN + PReLU, four stride-2 stages of IBasicBlocks, BN2d → dropout → fc → BN1d.

    The final ``features`` BatchNorm1d has its scale fixed to 1 (``requires_grad=False``). With
    ``fp32_head`` (set by the training config's ``backbone_amp = "body"``) ``fc`` and ``features`` run
    in fp32 outside autocast.
    """

    fp32_head = False

    def __init__(self, layers, num_features=512, dropout=0.0, width=64, input_size=112):
        super().__init__()
        self.input_size = check_input_size(input_size)
        check_width(width)
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-05)
        self.prelu = nn.PReLU(width)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1])
        self.layer3 = self._make_layer(widths[2], layers[2])
        self.layer4 = self._make_layer(widths[3], layers[3])
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-05)
        self.dropout = nn.Dropout(p=dropout)
        side = downsampled_size(input_size, 4)
        self.fc = nn.Linear(widths[3] * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _make_layer(self, planes, blocks):
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=1e-05),
        )
        stage = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        stage += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        self.inplanes = planes
        return nn.Sequential(*stage)

    def forward(self, x):
        check_images(x, self.input_size)
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x).flatten(1))
        return run_head(lambda t: self.features(self.fc(t)), x, self.fp32_head)


def iresnet(name, num_features=512, dropout=0.0, width=64, input_size=112):
    """The iresnet of depth ``name`` (one of :data:`IRESNET_LAYERS`)."""
    return IResNet(IRESNET_LAYERS[name], num_features, dropout, width, input_size)
