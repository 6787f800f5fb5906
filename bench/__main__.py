"""`python -m bench` (from the repository root): the benchmark suite, tritonbn.tools.bench.

A thin entry point: the logic lives in the installed package so tests and users import only
tritonbn. Without a GPU the kernels run in Triton's interpreter (smoke mode)."""
import sys

from tritonbn.tools.bench import main

sys.exit(main())
