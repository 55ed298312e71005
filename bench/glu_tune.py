"""Tile sweep of the three rank-r GLU kernels of the fused MLP (kernels/glu.py) at the 8B shape
(N = 4096 tokens, I = 14336, r = 16, bf16), each config timed in a CUDA graph (no host time),
against the bytes each must move at the card's copy bandwidth. Prints, per kernel, every config's
time and its largest difference to the default config's result (the splits change the fp32
summation order; the tiles of the backward do not).

    python bench/glu_tune.py [--quick]
"""
import argparse
import itertools

import torch
from group_casts import timed   # bench/: CUDA-graph timing without host time

from velotune.kernels import glu


def sweep(name, knobs: dict, configs, call, nbytes: int) -> None:
    """Each config of `knobs` (names of glu module constants) timed, and checked against the default's result."""
    defaults = {k: getattr(glu, k) for k in knobs}
    glu._PLANS.clear()
    ref = call().clone()
    rows = []
    for cfg in configs:
        for k, v in zip(knobs, cfg):
            setattr(glu, k, v)
        glu._PLANS.clear()
        try:
            out = call()
            diff = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()
            us = timed(call, reps=20)
        except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory...)
            print(f"  {name} {dict(zip(knobs, cfg))}: failed ({type(e).__name__}: {str(e)[:80]})", flush=True)
            continue
        rows.append((us, cfg, diff))
        print(f"  {name} {dict(zip(knobs, cfg))}: {us:7.1f} us ({nbytes / us / 1e6:4.2f} TB/s), "
              f"max rel diff {diff:.1e}", flush=True)
    for k, v in defaults.items():
        setattr(glu, k, v)
    glu._PLANS.clear()
    best = min(rows)
    d = [r for r in rows if r[1] == tuple(defaults.values())]
    print(f"BEST {name}: {dict(zip(knobs, best[1]))} {best[0]:.1f} us"
          + (f" (default {d[0][0]:.1f} us)" if d else ""), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, bf, N, I, r = "cuda", torch.bfloat16, 4096, 14336, 16
    gate = torch.randn(N, I, device=dev, dtype=bf)
    up = torch.randn(N, I, device=dev, dtype=bf)
    dh = torch.randn(N, I, device=dev, dtype=bf) * 0.01
    dhA = torch.randn(N, r, device=dev, dtype=bf) * 0.01
    A = torch.randn(r, I, device=dev, dtype=bf) * 0.01
    e = gate.element_size()
    print(f"{torch.cuda.get_device_name()}  N={N} I={I} r={r} bf16", flush=True)

    sweep("a_grad", ["LORA_A_BLOCK_I", "LORA_A_BLOCK_N", "LORA_A_SPLIT", "LORA_A_WARPS"],
          [c for c in itertools.product([64, 128], [64, 128], [1, 4, 8], [4, 8])
           if not (args.quick and c[3] == 8)],
          lambda: glu.glu_lora_a_grad(dhA, gate, up, "silu"), 2 * N * I * e)
    sweep("project", ["LORA_PROJECT_BLOCK_N", "LORA_PROJECT_BLOCK_I", "LORA_PROJECT_SPLIT", "LORA_PROJECT_WARPS"],
          [c for c in itertools.product([32, 64], [128, 256], [8, 16], [4, 8]) if not (args.quick and c[3] == 8)]
          + [(128, 64, 8, 4), (128, 64, 8, 8), (128, 128, 8, 8)],
          lambda: glu.glu_lora_project(gate, up, A, "silu"), 2 * N * I * e)
    g2, u2 = gate.clone(), up.clone()

    def bwd():     # in place into g2 / u2: refreshed from gate / up first (two copies, timed alike for every config)
        g2.copy_(gate)
        u2.copy_(up)
        return glu.glu_backward(dh, g2, u2, "silu", lora=(dhA, A))[0]

    copies = timed(lambda: (g2.copy_(gate), u2.copy_(up)), reps=20)
    print(f"  (the backward's timings include two refreshing copies: {copies:.1f} us)", flush=True)
    sweep("bwd_lora", ["LORA_BLOCK_N", "LORA_BLOCK_I", "LORA_BWD_WARPS"],
          [c for c in itertools.product([32, 64, 128], [64, 128, 256], [4, 8]) if c[0] * c[1] <= 16384],
          bwd, 5 * N * I * e)


if __name__ == "__main__":
    main()
