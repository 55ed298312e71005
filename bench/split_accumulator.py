"""Time the split fp32 dW accumulation (kernels/split_accumulator.py) at the fused-CE chunk shape.

    PYTHONPATH=src python bench/split_accumulator.py          # GPU

One chunk of Llama-3-8B's lm_head gradient: dW [128256, 4096] += dlogits_c^T @ hidden_c with
1046 rows (the default 256 MiB budget). Contenders: each tile config of the Triton kernel; cuBLAS
into an fp32 accumulator (the plain fp32 path); a bare cuBLAS bf16 GEMM with no accumulator (the
compute floor). `do_bench` medians.
"""
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from velotune.kernels.split_accumulator import CONFIG, accumulate_, combine_reference, new_accumulator  # noqa: E402

CONFIGS = [CONFIG, (128, 128, 64, 4, 3, "tma"), (128, 128, 64, 8, 3, "tma-planes"), (128, 128, 64, 8, 4, "tma-planes"),
           (128, 256, 64, 8, 3, "tma-planes")]


def main(rows=1046, V=128256, H=4096):
    g = torch.Generator(device="cuda").manual_seed(0)
    a = (torch.randn(rows, V, device="cuda", generator=g) * 1e-3).to(torch.bfloat16)
    b = torch.randn(rows, H, device="cuda", generator=g).to(torch.bfloat16)
    flops = 2 * rows * V * H
    acc = torch.zeros(V, H, device="cuda")
    ref = torch.addmm(acc, a.t(), b, out_dtype=torch.float32) if hasattr(torch, "addmm") else None
    hi, lo = new_accumulator(V, H, "cuda")
    print(f"chunk: {rows} rows, dW [{V}, {H}]; {torch.cuda.get_device_name()}", flush=True)
    for cfg in CONFIGS:
        for first in (False, True):   # first: the first chunk, planes written without being read
            hi.zero_(), lo.zero_()
            try:
                accumulate_(hi, lo, a, b, config=cfg, first=first)
                err = ((combine_reference(hi, lo) - ref).norm() / ref.norm()).item()
                ms = do_bench(lambda: accumulate_(hi, lo, a, b, config=cfg, first=first), warmup=5, rep=200)
            except Exception as e:  # noqa: BLE001 - a config the card cannot run
                print(f"  split {cfg} first={first}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
                break
            print(f"  split {cfg} first={first}: {ms:.3f} ms  {flops / ms / 1e9:.0f} TFLOP/s  "
                  f"rel err vs cuBLAS fp32 {err:.1e}", flush=True)
    ms = do_bench(lambda: torch.addmm(acc, a.t(), b, out_dtype=torch.float32, out=acc), warmup=5, rep=200)
    print(f"  cuBLAS into fp32 accumulator: {ms:.3f} ms  {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
    ms = do_bench(lambda: a.t() @ b, warmup=5, rep=200)
    print(f"  cuBLAS bf16, no accumulator: {ms:.3f} ms  {flops / ms / 1e9:.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
