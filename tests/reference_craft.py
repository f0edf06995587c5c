"""PyTorch reference for vldm.models.craft: EasyOCR's CRAFT, copied for the parity tests.

Copied from EasyOCR 1.7.2 (https://github.com/JaidedAI/EasyOCR, Apache License 2.0): `CRAFT` and
`double_conv` from `easyocr/craft.py` (itself from clovaai/CRAFT-pytorch, Copyright (c)
2019-present NAVER Corp., MIT License, header kept below), `vgg16_bn` and `init_weights` from
`easyocr/model/modules.py`. Changes: Python 3 `super()`, string statements as comments, and
torchvision (not installable here, so `pretrained=True` raises) replaced by
`_torchvision_vgg16_bn_features`, the layer list of torchvision's `vgg16_bn().features`
(torchvision `vgg.py`, BSD 3-Clause: cfg 'D' with batch norm), so that slice indices and
state-dict keys are torchvision's. easyocr itself is not a test dependency: its requirements pull
torchvision and possibly a CUDA build of torch.
"""

# Copyright (c) 2019-present NAVER Corp.
# MIT License

# pylint: disable=missing-class-docstring,consider-using-f-string
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

# torchvision `vgg.py` cfgs['D'].
_VGG16_CFG = [
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
]


def _torchvision_vgg16_bn_features():
  """torchvision's `make_layers(cfgs['D'], batch_norm=True)`."""
  layers = []
  in_channels = 3
  for v in _VGG16_CFG:
    if v == "M":
      layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
    else:
      conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
      layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
      in_channels = v
  return nn.Sequential(*layers)


# ---- easyocr/model/modules.py ------------------------------------------------------------------


def init_weights(modules):
  for m in modules:
    if isinstance(m, nn.Conv2d):
      init.xavier_uniform_(m.weight.data)
      if m.bias is not None:
        m.bias.data.zero_()
    elif isinstance(m, nn.BatchNorm2d):
      m.weight.data.fill_(1)
      m.bias.data.zero_()
    elif isinstance(m, nn.Linear):
      m.weight.data.normal_(0, 0.01)
      m.bias.data.zero_()


class vgg16_bn(torch.nn.Module):

  def __init__(self, pretrained=True, freeze=True):
    super().__init__()
    if pretrained:
      raise NotImplementedError("The reference has no torchvision weights to download.")
    vgg_pretrained_features = _torchvision_vgg16_bn_features()

    self.slice1 = torch.nn.Sequential()
    self.slice2 = torch.nn.Sequential()
    self.slice3 = torch.nn.Sequential()
    self.slice4 = torch.nn.Sequential()
    self.slice5 = torch.nn.Sequential()
    for x in range(12):  # conv2_2
      self.slice1.add_module(str(x), vgg_pretrained_features[x])
    for x in range(12, 19):  # conv3_3
      self.slice2.add_module(str(x), vgg_pretrained_features[x])
    for x in range(19, 29):  # conv4_3
      self.slice3.add_module(str(x), vgg_pretrained_features[x])
    for x in range(29, 39):  # conv5_3
      self.slice4.add_module(str(x), vgg_pretrained_features[x])

    # fc6, fc7 without atrous conv
    self.slice5 = torch.nn.Sequential(
        nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
        nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6),
        nn.Conv2d(1024, 1024, kernel_size=1),
    )

    if not pretrained:
      init_weights(self.slice1.modules())
      init_weights(self.slice2.modules())
      init_weights(self.slice3.modules())
      init_weights(self.slice4.modules())

    init_weights(self.slice5.modules())  # no pretrained model for fc6 and fc7

    if freeze:
      for param in self.slice1.parameters():  # only first conv
        param.requires_grad = False

  def forward(self, X):
    h = self.slice1(X)
    h_relu2_2 = h
    h = self.slice2(h)
    h_relu3_2 = h
    h = self.slice3(h)
    h_relu4_3 = h
    h = self.slice4(h)
    h_relu5_3 = h
    h = self.slice5(h)
    h_fc7 = h
    vgg_outputs = namedtuple("VggOutputs", ["fc7", "relu5_3", "relu4_3", "relu3_2", "relu2_2"])
    out = vgg_outputs(h_fc7, h_relu5_3, h_relu4_3, h_relu3_2, h_relu2_2)
    return out


# ---- easyocr/craft.py --------------------------------------------------------------------------


class double_conv(nn.Module):

  def __init__(self, in_ch, mid_ch, out_ch):
    super().__init__()
    self.conv = nn.Sequential(
        nn.Conv2d(in_ch + mid_ch, mid_ch, kernel_size=1),
        nn.BatchNorm2d(mid_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid_ch, out_ch, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )

  def forward(self, x):
    x = self.conv(x)
    return x


class CRAFT(nn.Module):

  def __init__(self, pretrained=False, freeze=False):
    super().__init__()

    # Base network
    self.basenet = vgg16_bn(pretrained, freeze)

    # U network
    self.upconv1 = double_conv(1024, 512, 256)
    self.upconv2 = double_conv(512, 256, 128)
    self.upconv3 = double_conv(256, 128, 64)
    self.upconv4 = double_conv(128, 64, 32)

    num_class = 2
    self.conv_cls = nn.Sequential(
        nn.Conv2d(32, 32, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 16, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, num_class, kernel_size=1),
    )

    init_weights(self.upconv1.modules())
    init_weights(self.upconv2.modules())
    init_weights(self.upconv3.modules())
    init_weights(self.upconv4.modules())
    init_weights(self.conv_cls.modules())

  def forward(self, x):
    # Base network
    sources = self.basenet(x)

    # U network
    y = torch.cat([sources[0], sources[1]], dim=1)
    y = self.upconv1(y)

    y = F.interpolate(y, size=sources[2].size()[2:], mode="bilinear", align_corners=False)
    y = torch.cat([y, sources[2]], dim=1)
    y = self.upconv2(y)

    y = F.interpolate(y, size=sources[3].size()[2:], mode="bilinear", align_corners=False)
    y = torch.cat([y, sources[3]], dim=1)
    y = self.upconv3(y)

    y = F.interpolate(y, size=sources[4].size()[2:], mode="bilinear", align_corners=False)
    y = torch.cat([y, sources[4]], dim=1)
    feature = self.upconv4(y)

    y = self.conv_cls(feature)

    return y.permute(0, 2, 3, 1), feature
