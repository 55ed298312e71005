"""velotune.kernels.launch: the specialisation key, and the CPU path (the JIT, nothing cached).

The cached CUDA path itself is checked on the GPU (tests/quant/test_quant_nf4.py: repeated and
misaligned launches of the dequant kernel stay bit-exact)."""
import torch

from velotune.kernels import force_triton
from velotune.kernels.glu import _glu_fwd_kernel
from velotune.kernels.launch import _spec, launch


def test_key_separates_what_triton_specialises_on():
    buf = torch.empty(64)
    assert _spec(buf) != _spec(buf[1:])                      # 16-byte aligned vs not
    assert _spec(buf) != _spec(buf.to(torch.bfloat16))       # dtype
    assert len({_spec(1), _spec(16), _spec(17), _spec(2**40)}) == 4   # ==1, %16, 32 vs 64 bit
    assert _spec(None) is None and _spec(True) is True and _spec(0.5) is float


def test_cpu_launch_runs_the_kernel_and_caches_nothing():
    g, u = torch.randn(37), torch.randn(37)
    h = torch.empty(37)
    with force_triton():
        launch(_glu_fwd_kernel, (1,), g, u, h, 37, ACT=0, BLOCK=64)
    torch.testing.assert_close(h, torch.nn.functional.silu(g) * u, rtol=1e-6, atol=1e-6)
    assert "_velotune_launch_cache" not in _glu_fwd_kernel.__dict__
