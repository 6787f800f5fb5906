"""Run in a process whose Triton loads tritonbn's do-nothing CUDA driver (tests/bench/test_host.py):
launches of every plan of the compile check's CI subset, through Triton's own path, through the
direct path, and through a Site's kept launch (its second call), recorded at cuLaunchKernelEx
and compared byte for byte."""
import ctypes
import json
import os
import sys

from bench import host

host.use_driver()

import bench.compile_check as cc  # noqa: E402
import torch  # noqa: E402
from tritonbn import direct_launch, launch  # noqa: E402

# bytes of one kernel parameter of each runtime type, as Triton's launcher passes it
SIZES = {"i1": 1, "i8": 1, "u8": 1, "i16": 2, "u16": 2, "fp16": 2, "bf16": 2, "i32": 4, "u32": 4,
         "fp32": 4, "i64": 8, "u64": 8, "fp64": 8}
lib = ctypes.CDLL(os.path.join(os.environ["TRITONBN_HOST_DRIVER"], "libcuda.so.1"))
buf = ctypes.create_string_buffer(1 << 20)


def param_sizes(compiled) -> list[int]:
    sig = compiled.src.signature
    names = compiled.src.fn.arg_names
    sizes = []
    for name in names:
        ty = sig[name]
        if ty == "constexpr":
            continue
        sizes.append(8 if ty.startswith("*") else SIZES[ty])
    return sizes + [8, 8]          # then the global and profile scratch pointers


def recorded(sizes, fn) -> bytes:
    arr = (ctypes.c_int * len(sizes))(*sizes)
    lib.tbn_record_start(len(sizes), arr)
    fn()
    n = lib.tbn_record_read(buf, len(buf))
    return buf.raw[:n]


def main(limit: int) -> None:
    checked = direct = kept = c_direct = 0
    seen = set()
    for prob in cc.problems("ci")[:limit]:
        for kernel, grid, args, kwargs in cc.capture(prob, cc.TARGETS["sm90"]):
            key = (kernel.fn.__name__, str([type(a).__name__ for a in args]), str(kwargs))
            options = {**kwargs, **launch.COMPILE_OPTIONS}
            compiled = kernel[grid](*args, **options)           # compiles (or loads) it
            sizes = param_sizes(compiled)
            theirs = recorded(sizes, lambda: kernel[grid](*args, **options))
            tensors, ints, floats = args.groups
            constants = direct_launch.Constants(options)
            direct_launch.clear()
            direct_launch.launch(kernel, grid, tensors, ints, floats, constants)  # its entry
            entry = next(iter(direct_launch._cache[id(kernel)].values()))
            ours = recorded(sizes, lambda: direct_launch.launch(kernel, grid, tensors, ints,
                                                                floats, constants))
            assert ours == theirs, (prob.name, kernel.fn.__name__, len(ours), len(theirs))
            assert len(theirs) == 28 + sum(sizes)
            site = direct_launch.Site(kernel, grid, ints, floats, constants)
            site(tensors)                               # finds its entry; keeps it if aligned
            again = recorded(sizes, lambda: site(tensors))
            assert again == theirs, (prob.name, kernel.fn.__name__, "site")
            if site._fast is not None:
                kept += 1
                c_direct += site._fast[2] is not entry[0]     # Triton's C function itself
            checked += 1
            direct += entry is not direct_launch._NOT_SUPPORTED
            seen.add(key)
    # A kept Site handed a pointer that is not 16-byte aligned: the full lookup, which compiles
    # the specialization without the divisibility hint (a second entry), not the kept launch.
    first = tensors[0]
    shifted = torch.empty(first.numel() + 1, dtype=first.dtype)[1:].view(first.shape)
    entries = len(direct_launch._cache[id(kernel)])
    site((shifted, *tensors[1:]))
    misaligned = len(direct_launch._cache[id(kernel)]) - entries
    print(json.dumps({"launches": checked, "direct": direct, "distinct": len(seen),
                      "kept": kept, "c_direct": c_direct, "misaligned_entries": misaligned}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10**9)
