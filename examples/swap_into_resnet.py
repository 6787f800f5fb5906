"""Swap tritonbn into a torchvision ResNet and train it for a few steps.

What it shows:
  * tritonbn.convert_model(model) turns every torch.nn.BatchNorm2d into tritonbn.BatchNorm2d,
    in place (same parameters and buffers, so an optimizer built before still works);
  * with --fuse, tritonbn.fuse(model) instead returns a new torch.fx GraphModule in which each
    BN -> ReLU and BN -> add -> ReLU runs as one fused batch-norm op (build the optimizer on it);
  * channels_last activations, and bfloat16 autocast on a GPU;
  * tritonbn.count_launches(): how many Triton kernel launches the training steps made.
The data is synthetic (random images and labels), so the loss only shows that training runs.

Run it (needs torchvision: pip install torchvision):
  GPU:  python examples/swap_into_resnet.py --model resnet50 --fuse
  CPU:  python examples/swap_into_resnet.py --batch 2 --image-size 32 --steps 2
On CPU the kernels run in Triton's interpreter (slow, float32): keep the sizes tiny.
"""
import argparse
import sys

import torch

import tritonbn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50"])
parser.add_argument("--steps", type=int, default=5, help="SGD steps to run")
parser.add_argument("--batch", type=int, help="images per step (default: 64 on a GPU, 2 on CPU)")
parser.add_argument("--image-size", type=int,
                    help="image height and width (default: 224 on a GPU, 32 on CPU)")
parser.add_argument("--fuse", action="store_true",
                    help="use tritonbn.fuse instead of tritonbn.convert_model")
args = parser.parse_args()

try:
    import torchvision
except ImportError as e:
    sys.exit(f"this example needs torchvision ({e}): pip install torchvision")

cuda = torch.cuda.is_available()
device = "cuda" if cuda else "cpu"
batch = args.batch or (64 if cuda else 2)
size = args.image_size or (224 if cuda else 32)
torch.manual_seed(0)  # the same weights and data every run

# 1. A plain torchvision ResNet (random weights), in channels_last memory format.
model = getattr(torchvision.models, args.model)(weights=None, num_classes=10)
model = model.to(device, memory_format=torch.channels_last)

# 2. Swap tritonbn in: either class-swap the BN layers in place, or fuse BN -> [add ->] ReLU.
if args.fuse:
    model = tritonbn.fuse(model)  # a new module; the original is left as it was
else:
    tritonbn.convert_model(model)  # in place; returns the same model
layers = [m for m in model.modules() if isinstance(m, tritonbn.TritonNorm)]
fused = [m for m in layers if isinstance(m, tritonbn.BatchNormAct2d)]
print(f"{args.model}: {len(layers)} tritonbn batch-norm layers, {len(fused)} of them fused "
      f"with their add/ReLU")
print(f"training on {device} ({'bfloat16 autocast' if cuda else 'float32'}), batch {batch}, "
      f"{size}x{size} images, channels_last")

# 3. Train a few SGD steps on random images and labels. Build the optimizer after fuse().
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
loss_fn = torch.nn.CrossEntropyLoss()
model.train()
with tritonbn.count_launches() as launches:
    for step in range(1, args.steps + 1):
        images = torch.randn(batch, 3, size, size, device=device)
        images = images.to(memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (batch,), device=device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        print(f"step {step}/{args.steps}: loss {loss.item():.4f}")

# 4. The Counter is filled when the `with` block ends: kernel name -> launches.
print(f"Triton kernel launches: {sum(launches.values())}")
for name, count in sorted(launches.items()):
    print(f"  {name:28} {count}")
