"""Launch plans: a compiled Triton kernel launched again without the JIT's per-call dispatch.

A training step is bound by host time (docs/perf-notes.md), and Triton's JIT spends tens of
microseconds per launch binding and specialising the arguments before it finds the compiled kernel
(`bench/host_overhead.py` measures it). Where a caller can
name cheaply everything that decides the compiled kernel, a plan replays it:

    plans = {}
    launch_named(plans, kernel, grid, dict(X=x, n=n, BLOCK=1024), num_warps=4)   # every parameter by name
    launch(plans, key, kernel, grid, args, consts, slots, num_warps=4)          # the same, spelled out

The first call with a `key` goes through the JIT (`kernel[grid](*args, **consts, ...)`); the kernel
it compiled is kept with every parameter value in signature order. Later calls with the same key
replace only the arguments at `slots` (the tensors) and call the compiled kernel's own launcher:
the very binary the JIT chose, with the same arguments.

`launch_named` derives the rest from the kernel's parameter names: the positional arguments in
signature order, the constexprs, the slots (the tensor arguments) and the key (the kernel, the
device, the grid, every non-tensor argument, the tensors' dtypes, the constexprs and the options);
a missing or unknown name is a ValueError, so adding a parameter to a kernel cannot shift a call.
With `launch` the key is the caller's contract: it must determine the device, the grid, every
non-slot argument, the constexprs, and the slot tensors' dtypes. The other thing the JIT specialises
the slot tensors on, 16-byte alignment of the address, is checked here: plans serve aligned tensors
only. Plans hold no tensors (the slots are emptied), are only made for CUDA launches (the
interpreter runs the JIT path), and a dict past MAX_PLANS is cleared.
"""

from __future__ import annotations

import inspect

import torch
import triton
from triton import knobs

MAX_PLANS = 64


def aligned(*tensors: torch.Tensor) -> bool:
    """All addresses 16-byte aligned (what Triton specialises pointer arguments on)."""
    acc = 0
    for t in tensors:
        acc |= t.data_ptr()
    return acc % 16 == 0


class LaunchPlan:
    """One compiled launch; `plan(*slot_tensors)` repeats it with new tensors at the slots."""

    __slots__ = ("kernel", "grid", "values", "slots", "device")

    def __init__(self, compiled, fn, grid, args, consts, slots):
        self.kernel = compiled
        self.grid = (tuple(grid) + (1, 1))[:3]
        # the launcher takes every parameter in signature order, constexprs included (as the JIT passes them)
        self.values = [args[i] if i < len(args) else consts[name] for i, name in enumerate(fn.arg_names)]
        for i in slots:  # never hold a tensor: it may be a view of a buffer since replaced
            self.values[i] = None
        self.slots = tuple(slots)
        self.device = torch.cuda.current_device()

    def __call__(self, *tensors) -> None:
        k, (g0, g1, g2) = self.kernel, self.grid
        values = list(self.values)
        for i, t in zip(self.slots, tensors):
            values[i] = t
        stream = torch._C._cuda_getCurrentRawStream(self.device)
        enter, leave = launch_hooks()
        meta = None if enter is None and leave is None else k.launch_metadata(self.grid, stream, *values)
        k.run(g0, g1, g2, stream, k.function, k.packed_metadata, meta, enter, leave, *values)


def launch_hooks():
    """(enter, exit) launch hooks to hand the launcher, None for a chain with nothing in it.

    Triton 3.6 keeps its hooks as `HookChain`s that are never None, so its JIT builds the launch
    metadata and the launcher calls both (empty) chains on every launch: three Python calls per
    launch for nothing. The launcher skips a None hook (and then never reads the metadata), so an
    empty chain is passed as None; a profiler that added a hook (proton, say) still gets its calls."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if enter is not None and not getattr(enter, "calls", True):
        enter = None
    if leave is not None and not getattr(leave, "calls", True):
        leave = None
    return enter, leave


def launch(plans: dict, key, fn, grid, args, consts: dict, slots, **options) -> None:
    """`fn[grid](*args, **consts, **options)`, replayed from `plans[key]` after the first time.
    Only CUDA launches whose slot tensors are all 16-byte aligned use plans (alignment is part of
    the JIT's specialisation, so the key leaves it out); others always go through the JIT."""
    tensors = [args[i] for i in slots]
    planned = tensors[0].is_cuda and aligned(*tensors)
    if planned:
        plan = plans.get(key)
        if plan is not None:
            plan(*tensors)
            return
    compiled = fn[grid](*args, **consts, **options)
    if planned and isinstance(compiled, triton.compiler.CompiledKernel):
        if len(plans) >= MAX_PLANS:
            plans.clear()
        plans[key] = LaunchPlan(compiled, fn, grid, args, consts, slots)


_CONSTEXPRS: dict = {}  # kernel -> (names of its runtime parameters, names of its constexprs), in order


def _split_params(fn) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The kernel's runtime and constexpr parameter names (JIT: `params`; the interpreter: the
    annotations of the Python function, `tl.constexpr`)."""
    split = _CONSTEXPRS.get(fn)
    if split is None:
        params = getattr(fn, "params", None)
        if params is not None:
            flags = [p.is_constexpr for p in params]
        else:
            sig = inspect.signature(fn.fn)
            flags = ["constexpr" in str(sig.parameters[name].annotation) for name in fn.arg_names]
        names = list(fn.arg_names)
        split = _CONSTEXPRS[fn] = (
            tuple(n for n, c in zip(names, flags) if not c),
            tuple(n for n, c in zip(names, flags) if c),
        )
    return split


def launch_named(plans: dict, fn, grid, named: dict, **options) -> None:
    """`fn[grid](...)` with every parameter given by name in `named` (constexprs included), replayed
    from `plans` like `launch`: the slots are the tensor arguments, and the key is derived (the
    kernel, the first tensor's device, the grid, every other argument's value, the tensors' dtypes,
    the constexprs, the options). All non-tensor arguments must be hashable."""
    runtime, constexprs = _split_params(fn)
    if len(named) != len(runtime) + len(constexprs) or any(n not in named for n in runtime + constexprs):
        want = set(runtime + constexprs)
        raise ValueError(
            f"{getattr(fn, '__name__', fn)}: missing {sorted(want - set(named))}, unknown {sorted(set(named) - want)}"
        )
    args = tuple(named[n] for n in runtime)
    consts = {n: named[n] for n in constexprs}
    slots = tuple(i for i, v in enumerate(args) if isinstance(v, torch.Tensor))
    key = (
        fn,
        args[slots[0]].get_device(),
        tuple(grid),
        tuple(v.dtype if isinstance(v, torch.Tensor) else v for v in args),
        tuple(consts.values()),
        tuple(sorted(options.items())),
    )
    launch(plans, key, fn, grid, args, consts, slots, **options)
