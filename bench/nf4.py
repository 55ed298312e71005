"""NF4 dequantisation: velotune's Triton kernel against bitsandbytes, bit for bit and in time.

For the Llama-3.1-8B projection shapes (double-quantised absmax, block size 64), in bf16, fp16 and
fp32: whether velotune's dequantisation equals bitsandbytes' (and velotune's torch reference) bit for
bit, and in bf16/fp16 the time per weight (`triton.testing.do_bench` medians) of each, the bytes per
second (0.5 B read + 2 B written per element), a GEMM of 4096 tokens against the dequantised weight,
and the same GEMM with the dequantisation in front (the overhead a separate dequantisation costs).

    python bench/nf4.py
    python bench/nf4.py --cpu-smoke        # small shapes on the CPU: the bit-exactness check only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

GPU_SHAPES = {
    "q/o [4096,4096]": (4096, 4096),
    "k/v [1024,4096]": (1024, 4096),
    "gate/up [14336,4096]": (14336, 4096),
    "down [4096,14336]": (4096, 14336),
}
CPU_SHAPES = {"[128,192]": (128, 192), "[64,256]": (64, 256)}


def run(device: str) -> list[dict]:
    import bitsandbytes.functional as bnbF

    from velotune.quant.nf4 import NF4Weight, dequantize_nf4, dequantize_nf4_reference

    cuda = device.startswith("cuda")
    shapes, tokens = (GPU_SHAPES, 4096) if cuda else (CPU_SHAPES, 16)
    if cuda:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms
    else:

        def bench(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1000

    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for label, shape in shapes.items():
            g = torch.Generator(device=device).manual_seed(len(rows))
            w = (torch.randn(shape, device=device, generator=g) * 0.02).to(dtype)
            q, st = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            nf4 = NF4Weight.from_bnb(q, st)
            ref = bnbF.dequantize_4bit(q, st)
            ours = dequantize_nf4(nf4)
            row = {
                "dtype": str(dtype).split(".")[-1],
                "weight": label,
                "bit_exact": torch.equal(ours, ref) and torch.equal(ours, dequantize_nf4_reference(nf4)),
                "mismatches": int((ours != ref).sum()),
            }
            if dtype != torch.float32:
                buf = torch.empty_like(ours)
                t_ours = bench(lambda: dequantize_nf4(nf4, out=buf))
                t_bnb = bench(lambda: bnbF.dequantize_4bit(q, st, out=buf if cuda else None))  # CPU: no out=
                x = torch.randn(tokens, shape[1], device=device, dtype=dtype)
                t_mm = bench(lambda: x @ buf.t())
                t_both = bench(lambda: x @ dequantize_nf4(nf4, out=buf).t())
                moved = w.numel() // 2 + w.numel() * buf.element_size() + st.absmax.numel()
                row.update(
                    ours_us=1000 * t_ours,
                    bnb_us=1000 * t_bnb,
                    ours_GBps=moved / (t_ours * 1e6),
                    matmul_us=1000 * t_mm,
                    dequant_plus_matmul_us=1000 * t_both,
                    overhead_pct=100 * (t_both - t_mm) / t_mm,
                )
            rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cpu-smoke", action="store_true", help="small shapes on the CPU")
    common.add_output_args(ap)
    args = ap.parse_args()
    if args.cpu_smoke:
        args.device = "cpu"
    rows = run(args.device)
    print(f"NF4 dequantisation, {common.card(args.device)}: velotune Triton vs bitsandbytes")
    print(
        f"{'dtype':<9}{'weight':<22}{'bit-exact':<11}{'ours us':>9}{'bnb us':>9}{'GB/s':>8}"
        f"{'matmul us':>11}{'deq+mm us':>11}{'overhead':>10}"
    )
    for r in rows:
        t = (
            (
                f"{r['ours_us']:>9.1f}{r['bnb_us']:>9.1f}{r['ours_GBps']:>8.0f}{r['matmul_us']:>11.1f}"
                f"{r['dequant_plus_matmul_us']:>11.1f}{r['overhead_pct']:>9.1f}%"
            )
            if "ours_us" in r
            else ""
        )
        exact = str(r["bit_exact"]) + ("" if r["bit_exact"] else f" ({r['mismatches']})")
        print(f"{r['dtype']:<9}{r['weight']:<22}{exact:<11}{t}")
    common.write_rows(args.jsonl, "nf4", rows, args.commit, args.device)
    return 0 if all(r["bit_exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
