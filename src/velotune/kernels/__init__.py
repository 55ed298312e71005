"""Hand-written Triton kernels with manual backward passes.

Each module holds one kernel: Triton forward + backward, a `torch.autograd.Function`, and a
plain-PyTorch reference. Dispatch is explicit and stated here once:

* CUDA tensors run the Triton kernels.
* CPU tensors run the torch reference (same math, same saved tensors),
  unless `force_triton()` is active -- tests use it together with `TRITON_INTERPRET=1`
  (set before triton is imported, in tests/conftest.py) to run the Triton code on CPU.
"""

from __future__ import annotations

import contextlib

import torch

_FORCE_TRITON = False


def triton_enabled(t: torch.Tensor) -> bool:
    """Should a kernel taking `t` run its Triton implementation? Not for float64 (references, on the
    GPU too): the kernels compute in fp32 at most, so float64 takes the torch path and stays float64."""
    return (t.is_cuda or _FORCE_TRITON) and t.dtype != torch.float64


@contextlib.contextmanager
def force_triton(enabled: bool = True):
    """Run Triton kernels on CPU tensors (only meaningful under the Triton interpreter)."""
    global _FORCE_TRITON
    prev, _FORCE_TRITON = _FORCE_TRITON, enabled
    try:
        yield
    finally:
        _FORCE_TRITON = prev
