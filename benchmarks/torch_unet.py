"""The study's U-Net in PyTorch, the reference of ``benchmarks/train_step.py``.

Written from the architecture (DESIGN.md: milesial-style DoubleConv =
(3x3 conv without bias -> BatchNorm -> ReLU) x 2, 2x2 max-pool down, 2x2
stride-2 transposed conv up to half the channels, skip concatenation, 1x1
output conv) to mirror ``bnjax.models.UNet`` layer for layer, with the same
loss (cross-entropy + soft Dice over both classes, as
``bnjax.train.segmentation_loss``) and Adam. Needs ``torch`` (CPU build).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class DoubleConv(nn.Sequential):
  def __init__(self, cin, cout):
    super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                     nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
  def __init__(self, features=64, depth=4, in_channels=1, num_classes=2):
    super().__init__()
    widths = [features * 2**i for i in range(depth + 1)]
    self.down = nn.ModuleList()
    cin = in_channels
    for w in widths[:-1]:
      self.down.append(DoubleConv(cin, w))
      cin = w
    self.bottleneck = DoubleConv(widths[-2], widths[-1])
    self.ups = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                             for i in reversed(range(depth)))
    self.dec = nn.ModuleList(DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(depth)))
    self.head = nn.Conv2d(widths[0], num_classes, 1)

  def forward(self, x):
    skips = []
    for block in self.down:
      x = block(x)
      skips.append(x)
      x = F.max_pool2d(x, 2)
    x = self.bottleneck(x)
    for up, block, skip in zip(self.ups, self.dec, reversed(skips)):
      x = block(torch.cat([skip, up(x)], dim=1))
    return self.head(x)


def segmentation_loss(logits, masks, eps=1e-6):
  """Cross-entropy + (1 - soft Dice averaged over images and both classes)."""
  ce = F.cross_entropy(logits, masks)
  probs = logits.softmax(1)
  onehot = F.one_hot(masks, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
  inter = (probs * onehot).sum((2, 3))
  total = probs.sum((2, 3)) + onehot.sum((2, 3))
  return ce + 1 - ((2 * inter + eps) / (total + eps)).mean()


def make_step(features, lr=1e-3):
  """(model, step(x, y) -> loss): one Adam step, forward + backward + update."""
  model = UNet(features).train()
  opt = torch.optim.Adam(model.parameters(), lr=lr)

  def step(x, y):
    opt.zero_grad(set_to_none=True)
    loss = segmentation_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss

  return model, step
