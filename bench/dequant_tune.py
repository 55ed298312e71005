"""NF4 dequantisation tile sweep (GPU): bytes per program and warps of the row-tiled kernel.

    PYTHONPATH=.devsite:src python bench/dequant_tune.py

(An output-major layout, also swept on 2026-12-01, lost by 8% and was removed:
`bench/results/dequant_tune_6fa591c.log`.) For the Llama-3-8B weight shapes in bf16: GB/s (0.5 B read + 2 B written per element, the absmax
ignored) of `_nf4_dequant_rows_kernel` for each (output elements per program, num_warps), and a
bit-for-bit check against the default launch (`dequantize_nf4_triton`). The default in
quant/dequant_kernel.py is whatever wins here.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from velotune.quant.dequant_kernel import (_kernel_args, _nf4_dequant_rows_kernel, _pair_table,  # noqa: E402
                                           dequantize_nf4_triton)
from velotune.quant.nf4 import quantize_nf4  # noqa: E402

PER_LAYER = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}   # weights of each shape in a layer
SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    total = {}
    for name, shape in SHAPES.items():
        w = (torch.randn(shape, device="cuda") * 0.02).bfloat16()
        nf4 = quantize_nf4(w)
        ref = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
        dequantize_nf4_triton(nf4, ref)
        n = nf4.numel
        absmax, code2, absmax2, offset, _ = _kernel_args(nf4)
        for layout, elems, warps in [("rows", e, w) for e in (1024, 2048, 4096, 8192) for w in (2, 4, 8)]:
            rows = elems // nf4.blocksize
            out = torch.empty_like(ref)
            grid = (triton.cdiv(triton.cdiv(n, nf4.blocksize), rows),)
            fn, table = _nf4_dequant_rows_kernel, _pair_table(nf4.device)

            def launch():
                fn[grid](nf4.packed, absmax, code2, absmax2, offset, table, out, n, BLOCKSIZE=nf4.blocksize,
                         BLOCKSIZE2=nf4.blocksize2, NESTED=True, ROWS=rows,
                         OUT_BF16=True, num_warps=warps, enable_fp_fusion=False)
            launch()
            same = torch.equal(out.view(torch.int16), ref.view(torch.int16))
            us = triton.testing.do_bench(launch, warmup=20, rep=200, return_mode="median") * 1000
            gbs = n * 2.5 / us / 1e3
            total.setdefault((layout, elems, warps), 0.0)
            total[(layout, elems, warps)] += us * PER_LAYER[name]
            print(f"{name:8s} {layout:4s} elems/prog {elems:6d} warps {warps}: {us:7.1f} us {gbs:7.0f} GB/s  "
                  f"bit-exact {same}", flush=True)
    print("one layer's 7 weights, us per dequantisation pass, best first:")
    for k, v in sorted(total.items(), key=lambda kv: kv[1]):
        print(k, f"{v:.1f}")


if __name__ == "__main__":
    main()
