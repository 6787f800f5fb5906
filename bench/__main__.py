"""`python -m bench` (from the repository root): the benchmark suite, tritonbn.benchmark.

A thin entry point: the logic lives in the installed package so tests and users import only
tritonbn. Without a GPU it re-runs itself under the Triton interpreter (smoke mode)."""
import os
import sys

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    # the interpreter must be on before triton is imported: re-run this module with it
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "bench", *sys.argv[1:]],
              dict(os.environ, TRITON_INTERPRET="1"))

from tritonbn.benchmark import main  # noqa: E402

sys.exit(main())
