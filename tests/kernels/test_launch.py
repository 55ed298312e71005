"""kernels/launch.py: plans replay a compiled kernel; the key decides when the JIT runs again."""
import torch
import triton
import triton.language as tl

from velotune.kernels import launch as launch_mod
from velotune.kernels.launch import aligned, launch


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


def test_a_full_plan_dict_is_cleared(monkeypatch):
    monkeypatch.setattr(launch_mod, "MAX_PLANS", 2)
    plans = {("a",): object(), ("b",): object()}

    class Compiled(triton.compiler.CompiledKernel):     # what the JIT returns on a GPU
        def __init__(self):
            pass

    class FakeTensor:
        is_cuda = True

    class Fn:
        arg_names = ["X", "Y", "a", "n", "BLOCK"]

        def __getitem__(self, grid):
            return lambda *a, **k: Compiled()

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    launch(plans, ("c",), Fn(), (1,), (FakeTensor(), FakeTensor(), 2.0, 10), dict(BLOCK=16), (0, 1))
    assert list(plans) == [("c",)]
    plan = plans[("c",)]
    assert plan.values == [None, None, 2.0, 10, 16] and plan.grid == (1, 1, 1)
