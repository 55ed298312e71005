"""Launching a Triton kernel with less host work than `kernel[grid](...)`.

Why: a QLoRA step of an 8B model launches ~1,100 Triton kernels (about 640 of them NF4
dequantisations), and on the H200 the step was bound by the host: the time until `step()` returned
(all work queued) was ~97% of the wall time (`bench/host_overhead.py`). Triton's JIT launcher costs
tens of microseconds per call in Python: it binds the arguments, computes their specialisation,
looks the compiled kernel up, and only then calls the C launcher.

`launch(kernel, grid, *args, **constexprs)` does the lookup once per *specialisation key* and
afterwards calls the compiled kernel's launcher directly. The key holds everything the JIT
specialises on, conservatively: for each tensor its dtype and whether its address is 16-byte
aligned; for each int whether it is 1, divisible by 16, and fits 32 bits; every constexpr and launch
option; the device. Two calls with the same key would get the same compiled kernel from the JIT,
so the result is the same binary run on the same arguments. The first call of every key goes through
the JIT (which compiles if needed, and is also the path under the Triton interpreter on CPU, where
nothing is cached).
"""
from __future__ import annotations

import torch
import triton
from triton import knobs

# launch options: not kernel arguments, but part of what is compiled
_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg"})


def _spec(a):
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return (a == 1, a % 16 == 0, -2**31 <= a < 2**31, a < 2**63)
    if isinstance(a, float):
        return float
    raise TypeError(f"launch: unsupported argument type {type(a).__name__}")


class _Entry:
    __slots__ = ("compiled", "order")

    def __init__(self, compiled, order):
        self.compiled = compiled
        self.order = order        # per kernel parameter: ("arg", i) positional, or ("kw", name)


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, with a cached compiled-kernel lookup (see the module docstring).
    args: the kernel's runtime arguments in order (tensors, ints, floats, None); kwargs: constexprs
    and launch options."""
    first = args[0] if args else None
    if not (isinstance(first, torch.Tensor) and first.is_cuda):
        kernel[grid](*args, **kwargs)        # CPU / interpreter: the JIT path, nothing cached
        return
    device = torch.cuda.current_device()     # where the JIT launches too
    cache = kernel.__dict__.setdefault("_velotune_launch_cache", {})
    key = (device, tuple(_spec(a) for a in args), tuple(sorted(kwargs.items())))
    entry = cache.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        if isinstance(compiled, triton.compiler.CompiledKernel):
            names = kernel.arg_names
            order = [("arg", i) if i < len(args) else ("kw", n) for i, n in enumerate(names)]
            if all(kind == "arg" or i in kwargs for kind, i in order):   # no parameter left to its default
                cache[key] = _Entry(compiled, order)
        return
    values = [args[i] if kind == "arg" else kwargs[i] for kind, i in entry.order]
    k = entry.compiled
    stream = torch.cuda.current_stream(device).cuda_stream
    g = tuple(grid) + (1, 1)
    k.run(g[0], g[1], g[2], stream, k.function, k.packed_metadata, k.launch_metadata(g[:3], stream, *values),
          knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *values)
