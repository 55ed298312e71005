"""bf16 LoRA training throughput and memory: velotune vs stock transformers + PEFT vs Liger-Kernel.

Random-weight shapes built on the GPU (8b: Llama-3.1-8B, 1b: Llama-3.2-1B; qwen3-8b, gemma3-4b, gemma3-12b,
ministral-8b, pythia-6.9b, aya-8b: bench/common.py SHAPES), batch 2 x 2048 random token ids, LoRA r=16
alpha=16 on all 7 projections, non-reentrant gradient checkpointing (velotune:
`use_gradient_checkpointing=True`), fused AdamW on the LoRA parameters. Each contender runs in its own
process (clean peak-memory figures).

    python bench/train.py                                   # 8b and 1b; velotune, stock, liger (if importable)
    python bench/train.py --shapes 8b --impls velotune stock --profile   # + GPU time per step by category
    python bench/train.py --check                           # bf16 gradients: velotune vs stock, both vs fp32
    python bench/train.py --shapes tiny --device cpu --steps 2 --warmup 1   # the code path without a GPU
    python bench/train.py --shapes qwen3-8b gemma3-4b gemma3-12b --impls velotune stock   # other families
    python bench/train.py --shapes pythia-6.9b aya-8b --impls velotune velotune_offload stock
                            # the generic path: models without a family file (GPT-NeoX, Cohere shapes)

Reported per contender: tokens/s over the timed steps, peak torch.cuda.max_memory_allocated, MFU
(flops_per_token in bench/common.py against the card's bf16 matmul rate measured in the same run) and
the first step's loss (must agree to bf16 precision).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

# velotune: transformers' checkpointing like the others; velotune_offload: offloaded checkpointing (the default
# memory settings of bench/common.py)
IMPLS = {"velotune": "velotune-lora", "velotune_offload": "velotune-lora", "stock": "stock-lora", "liger": "liger-lora"}
TARGETS, _config = common.TARGETS, common.config  # as bench/sft.py imports them from here


def worker(args) -> dict:
    device = args.device
    cfg = common.config(args.shape)
    # velotune with non-reentrant checkpointing like the others (bench/qlora.py times its memory options)
    memory = {"use_gradient_checkpointing": True} if args.impl == "velotune" else None
    model = common.build(IMPLS[args.impl], cfg, device, torch.bfloat16, args.seq, memory)
    step, params, _, _ = common.training_step(model, args.batch, args.seq, device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = common.timed_steps(step, args.warmup, args.steps, device)
    out = {
        "impl": args.impl,
        "shape": args.shape,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_s": args.batch * args.seq * args.steps / t["seconds"],
        "ms_per_step": t["ms_per_step"],
        "first_loss": t["first_loss"],
        "last_loss": t["last_loss"],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "flops_per_token": common.flops_per_token(cfg, args.seq),
        "n_trainable": sum(p.numel() for p in params),
    }
    if args.profile and cuda:
        out["profile"] = common.profile(step, 3)
    return out


def measure_peak_tflops() -> float:
    """bf16 dense matmul rate of this card (median of 20 timed 8192^3 products, CUDA events)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    times.sort()
    return 2 * 8192**3 / times[len(times) // 2] / 1e12


# ------------------------------------------------------------------ bf16 exactness check
def check(device: str) -> dict:
    """One forward/backward with non-zero LoRA weights on a small Llama with padding and ignored labels:
    loss and LoRA-gradient errors of velotune bf16 and stock bf16 against an fp32 reference computed
    from the very same (bf16-representable) weights."""
    import copy

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from velotune import FastLanguageModel
    from velotune.models import prepare_model

    small = device == "cpu"  # the CPU run only smoke-tests this code
    cfg = LlamaConfig(
        hidden_size=64 if small else 1024,
        intermediate_size=96 if small else 2816,
        num_hidden_layers=4,
        num_attention_heads=4 if small else 16,
        num_key_value_heads=2 if small else 4,
        vocab_size=512 if small else 32000,
        max_position_embeddings=4096,
        use_cache=False,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        ref_base = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    results = {}
    B, T = 2, 64 if small else 1024
    g = torch.Generator(device=device).manual_seed(2)
    ids = torch.randint(3, cfg.vocab_size, (B, T), device=device, generator=g)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[1, -T // 5 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : T // 16] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    fast = copy.deepcopy(ref_base)
    fast.velotune_compute_dtype = torch.bfloat16
    prepare_model(fast, max_seq_length=T)
    fast = FastLanguageModel.get_peft_model(
        fast, r=16, lora_alpha=16, target_modules=common.TARGETS, use_gradient_checkpointing=True
    )
    lora_cfg = copy.deepcopy(fast.peft_config["default"])
    gen = torch.Generator(device=device).manual_seed(3)
    lora_values = {
        n: (torch.randn(p.shape, device=device, generator=gen) * 0.02).to(torch.bfloat16)
        for n, p in fast.named_parameters()
        if "lora_" in n
    }
    models = {"velotune_bf16": fast}
    stock = get_peft_model(copy.deepcopy(ref_base), copy.deepcopy(lora_cfg))
    stock.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    models["stock_bf16"] = stock
    models["reference_fp32"] = get_peft_model(copy.deepcopy(ref_base).float(), copy.deepcopy(lora_cfg))
    grads = {}
    for name, m in models.items():
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n in lora_values:
                    p.copy_(lora_values[n].to(p.dtype))
        m.train()
        loss = m(**batch).loss
        loss.backward()
        grads[name] = (loss.item(), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None})
    ref_loss, ref_grads = grads.pop("reference_fp32")
    for name, (loss, gs) in grads.items():
        errs = [((gs[n] - r).norm() / r.norm()).item() for n, r in ref_grads.items()]
        results[name] = {
            "loss": loss,
            "loss_rel_err": abs(loss - ref_loss) / abs(ref_loss),
            "grad_rel_err_max": max(errs),
            "grad_rel_err_mean": sum(errs) / len(errs),
            "n_grads": len(errs),
        }
    ours, theirs = results["velotune_bf16"], results["stock_bf16"]
    results["verdict"] = (
        "PASS"
        if ours["grad_rel_err_max"] <= 1.5 * theirs["grad_rel_err_max"]
        and ours["grad_rel_err_mean"] <= 1.5 * theirs["grad_rel_err_mean"]
        and ours["loss_rel_err"] <= 1.5 * theirs["loss_rel_err"] + 1e-3
        else "FAIL"
    )
    results["reference_loss"] = ref_loss
    return results


def _liger_importable() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401

        return True
    except Exception:  # noqa: BLE001 - an optional contender
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["8b", "1b"], choices=list(common.SHAPES))
    ap.add_argument("--impls", nargs="+", default=["velotune", "stock", "liger"], choices=list(IMPLS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true", help="GPU ms per step by kernel category (3 profiled steps)")
    ap.add_argument("--check", action="store_true", help="bf16 gradient error vs fp32: velotune vs stock")
    common.add_output_args(ap)
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "SHAPE"), help=argparse.SUPPRESS)
    ap.add_argument("--peak-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.peak_worker:
        print("RESULT " + json.dumps({"tflops": measure_peak_tflops()}), flush=True)
        return 0
    if args.worker:
        args.impl, args.shape = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    if args.check:
        res = check(args.device)
        print("bf16 check (errors vs fp32 reference on identical weights):")
        for k in ("velotune_bf16", "stock_bf16"):
            r = res[k]
            print(
                f"  {k:<14} loss {r['loss']:.5f} rel {r['loss_rel_err']:.2e}  grad rel err max "
                f"{r['grad_rel_err_max']:.3e} mean {r['grad_rel_err_mean']:.3e} ({r['n_grads']} LoRA grads)"
            )
        print(f"  verdict: {res['verdict']} (ours <= 1.5x stock's own error)", flush=True)

    impls = [i for i in args.impls if i != "liger" or _liger_importable()]
    if "liger" in args.impls and "liger" not in impls:
        print("liger-kernel not importable: skipped")
    card = common.card(args.device)
    peak = None
    if args.device.startswith("cuda"):
        r = common.run_worker(__file__, ["--peak-worker"])
        peak = r and r["tflops"]
        print(f"{card}: measured bf16 matmul {peak:.0f} TFLOP/s" if peak else "peak measurement failed")
    argv = [
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--device",
        args.device,
    ] + (["--profile"] if args.profile else [])
    rows = []
    for shape in args.shapes:
        res = {}
        for impl in impls:
            r = common.run_worker(__file__, ["--worker", impl, shape, *argv])
            if r is None:
                continue
            res[impl] = r
            r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / (peak * 1e12) if peak else None
            r["matmul_tflops"] = peak
            print(
                f"[{shape}] {impl:<9} {r['tokens_per_s']:>9.0f} tok/s  {r['ms_per_step']:>7.1f} ms/step"
                + (f"  peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "")
                + (f"  MFU {100 * r['mfu']:.1f}%" if r["mfu"] else "")
                + f"  first loss {r['first_loss']:.5f}  last {r['last_loss']:.5f}",
                flush=True,
            )
            if "profile" in r:
                common.print_profile(f"{impl}, {shape}", r.pop("profile"))
        for name, v in res.items():
            if name == "stock" or "stock" not in res:
                continue
            s = res["stock"]
            v["speedup_vs_stock"] = v["tokens_per_s"] / s["tokens_per_s"]
            v["memory_vs_stock"] = v["peak_gib"] / s["peak_gib"] if v["peak_gib"] and s["peak_gib"] else None
            print(
                f"[{shape}] {name} / stock: {v['speedup_vs_stock']:.2f}x tokens/s"
                + (f", {v['memory_vs_stock']:.2f}x peak memory" if v["memory_vs_stock"] else ""),
                flush=True,
            )
        rows += res.values()
    common.write_rows(args.jsonl, "train", rows, args.commit, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
