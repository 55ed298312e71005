"""Do CUDA-graphed decoder layers train like eager ones at a real shape? (GPU diagnostic)

    PYTHONPATH=.devsite:src python bench/graphs_check.py --layers 2 --steps 8 [--recompute mlp]

Llama-3-8B's layer shape with few layers, bf16 LoRA r=16 as bench/qlora.py builds it, one fixed
random batch (2 x 2048, no attention mask, as the throughput bench), fused AdamW: per-step loss and
the largest LoRA-gradient difference, eager offloaded checkpointing vs `cuda_graphs=True`, under
the default SDPA backends and under the math backend (deterministic).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from qlora import build  # noqa: E402
from train import _config  # noqa: E402


def run(graphs: bool, args, backend):
    config = _config("8b")
    config.num_hidden_layers = args.layers
    model = build(args.impl, config, "cuda", torch.bfloat16, args.seq, cuda_graphs=graphs, recompute=args.recompute)
    model.train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in params], lr=1e-4, fused=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device="cuda", generator=g)
    out = []
    ctx = contextlib.nullcontext()
    if backend == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        ctx = sdpa_kernel(SDPBackend.MATH)
    with ctx:
        for _ in range(args.steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            out.append((loss.item(), {n: p.grad.float().clone() for n, p in params}))
            opt.step()
            opt.zero_grad(set_to_none=True)
    stats = getattr(model, "velotune_layer_graphs", None)
    return out, (stats.stats if stats is not None else None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--impl", default="velotune-lora")
    ap.add_argument("--backends", nargs="+", default=["default", "math"])
    ap.add_argument("--recompute", default="layer", choices=["layer", "mlp"], help="get_peft_model(recompute=)")
    ap.add_argument("--control", action="store_true",
                    help="eager against eager (two fresh models): how far a backend alone moves the numbers")
    args = ap.parse_args()
    second = "eager again" if args.control else "graphs"
    for backend in args.backends:
        ref, _ = run(False, args, backend)
        got, stats = run(not args.control, args, backend)
        print(f"[{args.impl} recompute={args.recompute} {backend} sdpa, eager vs {second}] graph stats {stats}, "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        for i, ((lr, gr), (lg, gg)) in enumerate(zip(ref, got)):
            worst = max(((gg[n] - gr[n]).abs().max().item() / max(gr[n].abs().max().item(), 1e-30), n)
                        for n in gr)
            print(f"  step {i}: loss eager {lr:.6f} {second} {lg:.6f}  worst rel grad diff {worst[0]:.3e} "
                  f"({worst[1]})", flush=True)


if __name__ == "__main__":
    main()
