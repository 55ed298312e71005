"""Fused linear CE: time and peak memory against the rows per chunk (GPU).

    PYTHONPATH=.devsite:src python bench/flce_chunks.py --rows 1046 1024 768 512

At Llama-3-8B's shape (16K tokens, hidden 4096, vocab 128256, bf16, 10% ignored labels), for a
frozen and a trainable lm_head, with and without dropping the ignored rows: forward+backward median
(triton.testing.do_bench) and the peak memory above the inputs, for each chunk size (the memory
budget is set to exactly rows x vocab x 2 bytes). Question it answers: does a chunk whose row count
is a multiple of cuBLAS' tile height (128/256) beat the default budget's 1046 rows? Also prints the
profiler's per-kernel time of one call at the first chunk size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import velotune.kernels.fused_linear_ce as fl  # noqa: E402
from velotune.kernels.fused_linear_ce import KeptRows, fused_linear_cross_entropy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1046, 1024, 768, 512, 1280])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--dw", nargs="+", default=["halves", "planes"],
                    help="trainable lm_head: dW accumulators to time (fused_linear_ce.DW_ACCUMULATOR)")
    ap.add_argument("--cases", nargs="+", default=["frozenW", "trainW"])
    args = ap.parse_args()
    torch.manual_seed(0)
    n, H, V = args.tokens, args.hidden, args.vocab
    h = (torch.randn(n, H, device="cuda") * 0.5).bfloat16().requires_grad_(True)
    w0 = (torch.randn(V, H, device="cuda") * 0.02).bfloat16()
    labels = torch.randint(0, V, (n,), device="cuda")
    labels[torch.rand(n, device="cuda") < 0.1] = -100
    print(f"{torch.cuda.get_device_name()}  tokens {n} hidden {H} vocab {V}")
    for case in args.cases:
        train_w = case == "trainW"
        w = w0.clone().requires_grad_(train_w)
        for drop, rows, acc in [(d, r, a) for d in (False, True) for r in args.rows
                                for a in (args.dw if train_w else ["-"])]:
            if acc != "-":
                fl.DW_ACCUMULATOR = acc
            budget = rows * V * 2

            def call():
                kept = KeptRows(labels).rows() if drop else None
                loss = fused_linear_cross_entropy(h, w, labels, memory_budget_bytes=budget, kept_rows=kept)
                loss.backward()
                h.grad = None
                w.grad = None

            call()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            call()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**30
            ms = triton.testing.do_bench(call, warmup=5, rep=40, return_mode="median")
            print(f"{case} dw={acc} drop={int(drop)} rows {rows:5d}: "
                  f"{ms:8.3f} ms  peak {peak:5.2f} GiB", flush=True)

        def stock():
            loss = F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=-100)
            loss.backward()
            h.grad = None
            w.grad = None
        ms = triton.testing.do_bench(stock, warmup=3, rep=20, return_mode="median")
        print(f"{'trainW' if train_w else 'frozenW'} stock: {ms:8.3f} ms", flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile
            fl.DW_ACCUMULATOR = args.dw[0]
            budget = args.rows[0] * V * 2
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                kept = KeptRows(labels).rows()
                fused_linear_cross_entropy(h, w, labels, memory_budget_bytes=budget, kept_rows=kept).backward()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))
            h.grad = None
            w.grad = None


if __name__ == "__main__":
    main()
