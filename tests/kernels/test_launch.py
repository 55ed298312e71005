"""kernels/launch.py: plans replay a compiled kernel; the key decides when the JIT runs again."""

import torch
import triton
import triton.language as tl

from velotune.kernels import launch as launch_mod
import pytest

from velotune.kernels.launch import aligned, launch, launch_named


@triton.jit
def _axpy(X, Y, a, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=m) * a + tl.load(Y + offs, mask=m), mask=m)


def test_aligned_looks_at_every_address():
    buf = torch.zeros(64)
    assert aligned(buf, buf[4:])
    assert not aligned(buf, buf[1:])


def test_interpreter_launches_run_the_jit_and_make_no_plan():
    """CPU tensors (the interpreter) never get a plan; the launch itself happens every time."""
    plans = {}
    x, y = torch.ones(10), torch.zeros(10)
    for i in range(3):
        launch(plans, ("k",), _axpy, (1,), (x, y, 2.0, 10), dict(BLOCK=16), (0, 1))
        assert torch.equal(y, torch.full((10,), 2.0 * (i + 1)))
    assert plans == {}


def test_launch_named_orders_the_arguments_by_the_kernel_signature(monkeypatch):
    """Arguments by name, in any order: positions, constexprs, slots (the tensors) and key come from
    the kernel's signature; a missing or unknown name is an error, never a shifted argument."""
    x, y = torch.ones(10), torch.zeros(10)
    seen = []
    real = launch_mod.launch
    monkeypatch.setattr(launch_mod, "launch", lambda *a, **k: seen.append(a) or real(*a, **k))
    launch_named({}, _axpy, (1,), dict(n=10, BLOCK=16, a=3.0, Y=y, X=x))
    assert torch.equal(y, torch.full((10,), 3.0))
    ((plans, key, fn, grid, args, consts, slots),) = seen
    assert args == (x, y, 3.0, 10) and consts == {"BLOCK": 16} and slots == (0, 1)
    assert key == (_axpy, -1, (1,), (torch.float32, torch.float32, 3.0, 10), (16,), ())
    with pytest.raises(ValueError, match=r"missing \['a'\]"):
        launch_named({}, _axpy, (1,), dict(X=x, Y=y, n=10, BLOCK=16))
    with pytest.raises(ValueError, match=r"unknown \['b'\]"):
        launch_named({}, _axpy, (1,), dict(X=x, Y=y, a=1.0, b=2, n=10, BLOCK=16))


class _Compiled(triton.compiler.CompiledKernel):  # what the JIT returns on a GPU
    def __init__(self):
        pass


class _GpuTensor:  # a CUDA tensor's address, as far as launch() looks
    is_cuda = True

    def __init__(self, ptr):
        self.ptr = ptr

    def data_ptr(self):
        return self.ptr


class _Fn:
    arg_names = ["X", "Y", "a", "n", "BLOCK"]

    def __init__(self):
        self.jit_calls = 0

    def __getitem__(self, grid):
        def run(*a, **k):
            self.jit_calls += 1
            return _Compiled()

        return run


def test_a_full_plan_dict_is_cleared(monkeypatch):
    monkeypatch.setattr(launch_mod, "MAX_PLANS", 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    plans = {("a",): object(), ("b",): object()}
    launch(plans, ("c",), _Fn(), (1,), (_GpuTensor(0), _GpuTensor(64), 2.0, 10), dict(BLOCK=16), (0, 1))
    assert list(plans) == [("c",)]
    plan = plans[("c",)]
    assert plan.values == [None, None, 2.0, 10, 16] and plan.grid == (1, 1, 1)


def test_unaligned_tensors_always_go_through_the_jit(monkeypatch):
    """Alignment is part of the JIT's specialisation: a plan made for aligned tensors must never
    serve an unaligned one, so unaligned launches neither make nor use plans."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    plans, fn = {}, _Fn()
    for _ in range(2):
        launch(plans, ("k",), fn, (1,), (_GpuTensor(0), _GpuTensor(8), 2.0, 10), dict(BLOCK=16), (0, 1))
    assert plans == {} and fn.jit_calls == 2


def test_empty_launch_hook_chains_are_passed_as_none():
    """Triton 3.6's hook chains are never None; empty ones are handed to the launcher as None (it then
    skips them and the launch metadata); a hook someone added is passed on and would be called."""
    from triton import knobs

    from velotune.kernels.launch import launch_hooks

    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if not hasattr(enter, "calls"):  # an older Triton: plain None-or-callable hooks
        assert launch_hooks() == (enter, leave)
        return
    assert not enter.calls and not leave.calls and launch_hooks() == (None, None)
    seen = []

    def hook(metadata):
        seen.append(metadata)

    enter.add(hook)
    try:
        got_enter, got_leave = launch_hooks()
        assert got_enter is enter and got_leave is None
        got_enter("meta")
        assert seen == ["meta"]
    finally:
        enter.remove(hook)
    assert launch_hooks() == (None, None)
