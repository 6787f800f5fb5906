"""Development harnesses, run from a checkout of the repository (``python -m bench.<name>``):
the GPU window, the compile check, the static performance model and host timing. Not part of
the installed package: they import tritonbn, tritonbn never imports them.

Keep this file free of imports: ``python -m bench.gpu_window`` must start with the standard
library alone."""
