"""MobileFaceNet ("mbf") as in insightface arcface_torch (blocks (1, 4, 6, 2), scale 2).

Parameter names follow insightface ``backbones/mobilefacenet.py``. Every channel count is a
multiple of ``width`` (64 = published: 128-channel stages, 512-channel ``conv_sep``); the global
depthwise ("GDC") kernel equals the side of the final feature map (7 for 112 px, 4 for 56, 2 for 32).
"""
from torch import nn

from backbones.iresnet import check_images, check_input_size, check_width, downsampled_size, run_head


class ConvBlock(nn.Module):
    """Conv → BN → PReLU."""

    def __init__(self, in_c, out_c, kernel=1, stride=1, padding=0, groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x):
        return self.layers(x)


class LinearBlock(nn.Module):
    """Conv → BN (no activation)."""

    def __init__(self, in_c, out_c, kernel=1, stride=1, padding=0, groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x):
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1×1 expand to ``groups`` channels, 3×3 depthwise, 1×1 linear project."""

    def __init__(self, in_c, out_c, residual=False, stride=1, groups=1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups),
            ConvBlock(groups, groups, kernel=3, stride=stride, padding=1, groups=groups),
            LinearBlock(groups, out_c),
        )

    def forward(self, x):
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_block`` residual DepthWise blocks at constant width."""

    def __init__(self, c, num_block, groups):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, True, 1, groups) for _ in range(num_block)])

    def forward(self, x):
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv (kernel = map side) → flatten → dropout → Linear → BatchNorm1d."""

    def __init__(self, channels, side, embedding_size, dropout=0.0):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(channels, channels, kernel=side, groups=channels),
            nn.Flatten(),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x):
        x = self.dropout(self.layers[1](self.layers[0](x)))
        return self.layers[3](self.layers[2](x))


class MobileFaceNet(nn.Module):
    """MobileFaceNet: four stride-2 steps (stem, three DepthWise), residual stages, 1×1 conv, GDC.

    With ``fp32_head`` the 1×1 conv and GDC run in fp32 outside autocast (as the published model).
    """

    fp32_head = False

    def __init__(self, num_features=512, dropout=0.0, width=64, input_size=112,
                 blocks=(1, 4, 6, 2), scale=2):
        super().__init__()
        self.input_size = check_input_size(input_size)
        w = check_width(width)
        c1, c2 = w * scale, 2 * w * scale
        self.layers = nn.ModuleList([
            ConvBlock(3, c1, kernel=3, stride=2, padding=1),
            ConvBlock(c1, c1, kernel=3, stride=1, padding=1, groups=w)
            if blocks[0] == 1 else Residual(c1, blocks[0], 2 * w),
            DepthWise(c1, c1, stride=2, groups=2 * w),
            Residual(c1, blocks[1], 2 * w),
            DepthWise(c1, c2, stride=2, groups=4 * w),
            Residual(c2, blocks[2], 4 * w),
            DepthWise(c2, c2, stride=2, groups=8 * w),
            Residual(c2, blocks[3], 4 * w),
        ])
        self.conv_sep = ConvBlock(c2, 8 * w)
        self.features = GDC(8 * w, downsampled_size(input_size, 4), num_features, dropout)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        check_images(x, self.input_size)
        for layer in self.layers:
            x = layer(x)
        return run_head(lambda t: self.features(self.conv_sep(t)), x, self.fp32_head)
