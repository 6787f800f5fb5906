"""Tune tritonbn's kernel plans for the batch-norm shapes of one model.

What it shows:
  * tritonbn.tools.shapes.shapes_from_model(model, input_shape): the input shape of every
    batch-norm layer, found by a forward pass on a meta-device copy (nothing is computed and
    the model is not changed);
  * tritonbn.tools.tune: sweep kernel plans for those shapes (training forward, eval forward,
    backward; contiguous and channels_last), print the results, and merge the best plans into
    a JSON tuning table;
  * how to use the table: run your training with TRITONBN_TUNING_TABLE=<table> set.

The table (and the <table>.lock file written beside it) goes into a new temporary folder, whose
path the script prints, unless --table names where to write or merge it: running the example
leaves nothing in the folder it is run from.

Run it:
  GPU:  python examples/tune_for_a_model.py --model resnet50 --input-shape 256,3,224,224
  CPU:  python examples/tune_for_a_model.py --model tiny --max-candidates 2
Without a GPU this is smoke mode: the shapes are shrunk to tiny ones and run in Triton's CPU
interpreter, so the timings mean nothing; it shows the workflow only. --model takes a
torchvision model name (pip install torchvision) or "tiny", a small conv net defined below.
"""
import argparse
import os
import tempfile

import torch

from tritonbn import tuning_table  # importing tritonbn picks the GPU, or the CPU interpreter
from tritonbn.tools import shapes, tune
from tritonbn.tools.timing import SMOKE_LABEL, smoke_mode

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="resnet18", help="a torchvision model name, or 'tiny'")
parser.add_argument("--input-shape", default="256,3,224,224", help="N,C,H,W of the model input")
parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                    help="activation dtype to tune (float16 plans also serve bfloat16)")
parser.add_argument("--table", help="tuning table to write or merge into (default: tuning.json, "
                                    "or tuning-smoke.json without a GPU, in a new temporary "
                                    "folder)")
parser.add_argument("--max-candidates", type=int,
                    help="plans tried per problem, the heuristic's included "
                         "(default: all; 3 in smoke mode)")
args = parser.parse_args()
smoke = smoke_mode()
if args.table:
    table_path = args.table
else:   # a fresh folder: nothing lands where the script is run, nothing there is overwritten
    table_path = os.path.join(tempfile.mkdtemp(prefix="tritonbn-tuning-"),
                              "tuning-smoke.json" if smoke else "tuning.json")
print(f"tuning table: {table_path}" + ("" if args.table else
                                       " (a new temporary folder; --table PATH to choose)"))


def tiny_net():
    """Conv -> BN -> ReLU twice, at two resolutions: enough for a few batch-norm shapes."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))


# 1. The model: a torchvision one (random weights are enough: only shapes matter) or the tiny net.
model, name = tiny_net(), "tiny conv net"
if args.model != "tiny":
    try:
        import torchvision
        model, name = torchvision.models.get_model(args.model, weights=None), args.model
    except ImportError:
        print(f"torchvision is not installed (pip install torchvision): tuning the tiny conv net "
              f"instead of {args.model}")
    except ValueError as e:  # torchvision does not know that name
        parser.error(f"--model: {e}")

# 2. The shapes its batch norms see, and how many layers see each.
input_shape = shapes.parse_shape(args.input_shape)
found = shapes.shapes_from_model(model, input_shape)
print(f"{name} on input {input_shape}: {sum(n for _, n in found)} batch-norm layers, "
      f"{len(found)} distinct input shapes")
for shape, layers in found:
    print(f"  {str(shape):24} seen by {layers} layer(s)")
to_tune = [shape for shape, _ in found]

# 3. Without a GPU, shrink the shapes as `tritonbn tune` does: the interpreter is far too slow
#    for real ones. tune() does not shrink them itself.
if smoke:
    print(SMOKE_LABEL)
    to_tune = list(dict.fromkeys(shapes.smoke_shape(s) for s in to_tune))
    print(f"smoke mode: tuning the tiny shapes {to_tune} instead")

# 4. Refuse a bad --table now, not after the sweep; then sweep and print the results.
tuning_table.check_target(table_path)
problems = tune.problems_for(to_tune, ops=("fwd_train", "fwd_eval", "bwd_train"),
                             dtypes=(args.dtype,), layouts=("contiguous", "channels_last"))
print(f"tuning {len(problems)} problems (op x shape x layout)")
results = tune.tune(problems, max_candidates=args.max_candidates, show_progress=True)
print(tune.format_results(results))

# 5. Merge the best plans into the table; the dispatcher reads it when pointed at it.
table = tune.write_table(results, table_path)
print(f"wrote {len(results)} entries to {table_path} ({len(table.entries)} in the table)")
print(f"use it:       TRITONBN_TUNING_TABLE={table_path} python your_training.py")
print(f"see a plan:   TRITONBN_TUNING_TABLE={table_path} tritonbn info --shape "
      f"{','.join(map(str, to_tune[0]))}")
if smoke:
    print(SMOKE_LABEL)
