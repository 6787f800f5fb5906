"""Find the batch-norm layer of a float16 model closest to float16's limit (65,504), then fix it.

What it shows:
  * tritonbn.overflow.monitor(model): turns on per-channel overflow counters in every tritonbn
    layer's forward kernel (counted in the same pass that writes the output) and reports, per
    layer, how many outputs overflowed and the headroom left below 65,504;
  * why it happens: the output is gamma * x_hat + beta, so a large gamma pushes it past 65,504
    even though the input is tame; here one layer's gamma is set to 30,000 on purpose;
  * the fix: tritonbn.overflow.set_policy(model, overflow="saturate") stores +-65,504 instead
    of inf, in the kernels' own store.

Run it:
  GPU:  python examples/float16_headroom.py --batch 64 --size 56
  CPU:  python examples/float16_headroom.py --batch 2 --size 8
On CPU the kernels run in Triton's interpreter (slow): keep the sizes tiny. There, NumPy also
warns "overflow encountered in cast": that is the overflow this example provokes.
"""
import argparse

import torch
from torch import nn

import tritonbn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch", type=int, default=8, help="images per forward pass")
parser.add_argument("--size", type=int, default=16, help="image height and width")
parser.add_argument("--steps", type=int, default=3, help="forward passes to monitor")
args = parser.parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)


class SmallNet(nn.Module):
    """Three conv -> batch norm blocks; the last block's output is what we look at."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))


# 1. A float16 model with tritonbn's batch norm. bn3's gamma is huge: its output overflows.
model = tritonbn.convert_model(SmallNet()).to(device).half()
with torch.no_grad():
    model.bn3.weight.fill_(30000.0)
x = torch.randn(args.batch, 3, args.size, args.size, device=device).half()

# 2. Monitor a few training-mode forward passes: the report accumulates over all of them.
with torch.no_grad(), tritonbn.overflow.monitor(model) as report:
    for _ in range(args.steps):
        y = model(x)
print(f"{args.steps} forward passes, float16, input {tuple(x.shape)} on {device}:")
print(report.table())
print(f"closest to the edge: {report.closest_to_edge()}")
print(f"inf values in the output (default policy, overflow='propagate'): {int(y.isinf().sum())}")

# 3. The fix: saturate at +-65,504 instead of producing inf (NaN stays NaN either way).
tritonbn.overflow.set_policy(model, overflow="saturate")
with torch.no_grad():
    y = model(x)
max_half = torch.finfo(torch.float16).max
print(f"inf values in the output after set_policy(overflow='saturate'): {int(y.isinf().sum())} "
      f"({int((y.abs() == max_half).sum())} values are now +-{max_half:.0f})")
if not y.isinf().any():
    print("no inf after saturate")
