"""The MLP forward's GLU with the down adapter's A (GPU): two passes over gate and up
(glu_lora_project, then glu_forward over gate) against one (glu_forward_project), at the Llama-3-8B
shape (4096 tokens, I = 14336, r = 16, bf16), and whether they give the same bits.

    PYTHONPATH=.devsite:src python bench/mlp_pieces.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from velotune.kernels.glu import glu_forward, glu_forward_project, glu_lora_project  # noqa: E402


def main(N: int = 4096, I: int = 14336, r: int = 16) -> None:
    print(torch.cuda.get_device_name(), f"N={N} I={I} r={r} bf16", flush=True)
    g = torch.Generator("cuda").manual_seed(0)
    gate0 = torch.randn(N, I, device="cuda", generator=g).bfloat16() * 2
    up = torch.randn(N, I, device="cuda", generator=g).bfloat16()
    A = (torch.randn(r, I, device="cuda", generator=g) / 4).bfloat16()
    gate = gate0.clone()

    def two_passes():
        hA = glu_lora_project(gate, up, A, "silu")
        return glu_forward(gate, up, "silu", out=gate), hA

    def one_pass():
        return glu_forward_project(gate, up, A, "silu", out=gate)

    gate.copy_(gate0)
    h2, hA2 = (t.clone() for t in two_passes())
    gate.copy_(gate0)
    h1, hA1 = one_pass()
    print(f"same bits: h {torch.equal(h1, h2)}, hA {torch.equal(hA1, hA2)}", flush=True)
    moved = 3 * N * I * 2          # gate and up read, h written (bytes of one pass)
    for name, fn in (("two passes", two_passes), ("one pass", one_pass)):
        us = triton.testing.do_bench(fn, warmup=20, rep=200, return_mode="median") * 1000
        print(f"  {name:10s} {us:8.1f} us  ({moved / us / 1e3:6.0f} GB/s of one pass's bytes)", flush=True)


if __name__ == "__main__":
    main()
