"""LoRA training throughput and memory: velotune vs stock transformers+PEFT (SDPA) vs Liger-Kernel.

Random-weight model shapes (Llama; Qwen3, Gemma 3, Ministral by name) built directly on the GPU (no
download), batch 2 x 2048 random token ids, LoRA r=16 alpha=16 on all 7 projections, non-reentrant
gradient checkpointing, fused AdamW on the LoRA parameters, bf16. Each contender runs in its own
process (clean peak-memory figures).

    python bench/train.py                               # 8b and 1b; velotune, stock, liger (if importable)
    python bench/train.py --shapes 1b --impls velotune stock --steps 20 --warmup 5
    python bench/train.py --profile --shapes 8b --impls velotune    # per-category GPU time per step
    python bench/train.py --check                       # bf16 gradients: ours vs stock, both vs fp32
    python bench/train.py --shapes tiny --device cpu --steps 2 --warmup 1   # smoke test without a GPU
    python bench/train.py --shapes qwen3-8b gemma3-4b gemma3-12b --impls velotune stock   # other families

Reported per contender: tokens/s over the timed steps, peak torch.cuda.max_memory_allocated, MFU
(model FLOPs per token = 4 * N_matmul + 12 * layers * hidden * seq, against the card's bf16 matmul
rate measured in the same run), and the first step's loss (must agree to bf16 precision).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=False,
               rope_parameters={**_LLAMA3_ROPE, "factor": 8.0}),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
               tie_word_embeddings=True, rope_parameters={**_LLAMA3_ROPE, "factor": 32.0}),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=False),
    # Other families (the "config" key names the transformers config class), shapes of the published checkpoints
    "qwen3-8b": dict(config="Qwen3Config", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, tie_word_embeddings=False, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "gemma3-4b": dict(config="Gemma3TextConfig", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                      vocab_size=262208, max_position_embeddings=131072, sliding_window=1024, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, rope_parameters=_GEMMA3_ROPE),
    "gemma3-12b": dict(config="Gemma3TextConfig", hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                       vocab_size=262208, max_position_embeddings=131072, sliding_window=1024, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, rope_parameters=_GEMMA3_ROPE),
    "ministral-8b": dict(config="MinistralConfig", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072,
                         max_position_embeddings=32768, sliding_window=32768, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000000.0}),
}


def _config(shape: str):
    import transformers

    kw = dict(SHAPES[shape])
    cls = getattr(transformers, kw.pop("config", "LlamaConfig"))
    kw.setdefault("rms_norm_eps", 1e-5)
    return cls(**kw, bos_token_id=1, eos_token_id=2, use_cache=False)


def _n_matmul(config) -> int:
    """Parameters that take part in a matmul per token: decoder linears + lm_head (tied or not)."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    return L * per_layer + config.vocab_size * h


def _flops_per_token(config, seq: int) -> float:
    return 4 * _n_matmul(config) + 12 * config.num_hidden_layers * config.hidden_size * seq


def _build(impl: str, shape: str, device: str, dtype: torch.dtype, seq: int):
    """The model for one contender, LoRA attached, checkpointing on."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(_config(shape), dtype=dtype, attn_implementation="sdpa")
    if impl in ("velotune", "velotune_offload"):
        from velotune import FastLanguageModel
        from velotune.models import prepare_model

        model.velotune_compute_dtype = dtype
        model.max_seq_length = seq
        prepare_model(model, max_seq_length=seq)
        return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS,
                                                use_gradient_checkpointing="unsloth" if impl == "velotune_offload"
                                                else True, random_state=3407)
    from peft import LoraConfig, get_peft_model

    if impl == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        if "config" in SHAPES[shape]:
            raise SystemExit(f"liger: this bench patches Llama shapes only, not {shape}")

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)
    elif impl != "stock":
        raise SystemExit(f"unknown impl {impl!r}")
    torch.manual_seed(3407)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                                             bias="none", task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------ profiling categories
_CATEGORIES = (
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("fp32 GEMMs", ("f32f32", "sgemm", "gemm_f32", "tf32")),
    ("bf16 GEMMs", ("nvjet", "gemm", "xmma", "cutlass", "wgmma")),
    ("optimizer", ("adam", "multi_tensor")),
    ("copies and casts", ("copy", "cast", "to_copy", "memcpy", "memset", "fill", "cat_")),
    ("4-bit dequant", ("nf4", "dequantize")),
    ("triton (norm/rope/glu/CE)", ("triton", "_kernel")),
    ("elementwise and reductions", ("elementwise", "vectorized", "reduce", "unrolled", "softmax", "index")),
)


def _category(name: str) -> str:
    n = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in n for k in keys):
            return cat
    return "other"


def _profile(step, n_steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n_steps):
            step()
        torch.cuda.synchronize()
    per_cat: dict[str, float] = {}
    kernels: list[tuple[float, str]] = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if not us:
            continue
        ms = us / 1000.0 / n_steps
        per_cat[_category(e.key)] = per_cat.get(_category(e.key), 0.0) + ms
        kernels.append((ms, e.key))
    kernels.sort(reverse=True)
    return {"categories": per_cat, "top_kernels": [(round(ms, 2), k[:110]) for ms, k in kernels[:25]]}


def training_step(model, batch_size: int, seq: int, device: str, offload_optimizer: bool = False,
                  update_in_backward: bool = False):
    """(step, trainable params, optimizer, batch): one fused-AdamW step on a fixed random batch.
    offload_optimizer: velotune's OffloadedAdamW (moments in host memory, the same bits);
    update_in_backward: ... updating each chunk of adapters in backward once its gradients are final
    (this step has no gradient clipping or accumulation, so the same bits)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if offload_optimizer:
        from velotune.memory.offload_adamw import OffloadedAdamW

        opt = OffloadedAdamW(params, lr=1e-4, fused=device.startswith("cuda"), update_in_backward=update_in_backward)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device.startswith("cuda"))
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq), device=device, generator=g)
    batch = {"input_ids": ids, "labels": ids}

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, params, opt, batch


# ------------------------------------------------------------------ one contender, in its own process
def worker(args) -> dict:
    device, dtype = args.device, torch.bfloat16
    model = _build(args.impl, args.shape, device, dtype, args.seq)
    config = model.config
    step, params, opt, batch = training_step(model, args.batch, args.seq, device)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    first_loss = None
    for i in range(args.warmup):
        loss = step()
        if i == 0:
            first_loss = loss.item()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    tokens = args.batch * args.seq * args.steps
    out = {"impl": args.impl, "shape": args.shape, "tokens_per_s": tokens / elapsed,
           "ms_per_step": 1000 * elapsed / args.steps, "first_loss": first_loss, "last_loss": loss.item(),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
           "flops_per_token": _flops_per_token(config, args.seq), "n_trainable": sum(p.numel() for p in params)}
    if device.startswith("cuda"):  # where the peak is: end of forward vs during backward
        torch.cuda.reset_peak_memory_stats()
        loss = model(**batch).loss
        out["peak_fwd_gib"] = torch.cuda.max_memory_allocated() / 2**30
        loss.backward()
        opt.zero_grad(set_to_none=True)
        out["after_step_gib"] = torch.cuda.memory_allocated() / 2**30
    if args.profile and device.startswith("cuda"):
        out["profile"] = _profile(step, 3)
    if args.impl.startswith("velotune"):
        from velotune.models import report

        out["report"] = report(model)
    return out


def measure_peak_tflops() -> float:
    """bf16 dense matmul rate of this card (median of timed 8192^3 products)."""
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
    cfg = LlamaConfig(hidden_size=64 if small else 1024, intermediate_size=96 if small else 2816, num_hidden_layers=4,
                      num_attention_heads=4 if small else 16, num_key_value_heads=2 if small else 4,
                      vocab_size=512 if small else 32000, max_position_embeddings=4096, use_cache=False,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        ref_base = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    results = {}
    B, T = 2, 64 if small else 1024
    g = torch.Generator(device=device).manual_seed(2)
    ids = torch.randint(3, cfg.vocab_size, (B, T), device=device, generator=g)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    mask[1, -T // 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :T // 16] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    fast = copy.deepcopy(ref_base)
    fast.velotune_compute_dtype = torch.bfloat16
    prepare_model(fast, max_seq_length=T)
    fast = FastLanguageModel.get_peft_model(fast, r=16, lora_alpha=16, target_modules=TARGETS,
                                            use_gradient_checkpointing=True)
    lora_cfg = copy.deepcopy(fast.peft_config["default"])
    gen = torch.Generator(device=device).manual_seed(3)
    lora_values = {n: (torch.randn(p.shape, device=device, generator=gen) * 0.02).to(torch.bfloat16)
                   for n, p in fast.named_parameters() if "lora_" in n}
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
        results[name] = {"loss": loss, "loss_rel_err": abs(loss - ref_loss) / abs(ref_loss),
                         "grad_rel_err_max": max(errs), "grad_rel_err_mean": sum(errs) / len(errs),
                         "n_grads": len(errs)}
    ours, theirs = results["velotune_bf16"], results["stock_bf16"]
    results["verdict"] = ("PASS" if ours["grad_rel_err_max"] <= 1.5 * theirs["grad_rel_err_max"]
                          and ours["grad_rel_err_mean"] <= 1.5 * theirs["grad_rel_err_mean"]
                          and ours["loss_rel_err"] <= 1.5 * theirs["loss_rel_err"] + 1e-3 else "FAIL")
    results["reference_loss"] = ref_loss
    return results


# ------------------------------------------------------------------ orchestration
def _run_worker(argv: list[str]) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"worker {argv} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}", flush=True)
    return None


def _liger_importable() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
        return True
    except Exception:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["8b", "1b"], choices=list(SHAPES))
    ap.add_argument("--impls", nargs="*", default=["velotune", "stock", "liger"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true", help="print per-category GPU ms/step (3 profiled steps)")
    ap.add_argument("--check", action="store_true", help="bf16 gradient error vs fp32: velotune vs stock")
    ap.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "?"))
    ap.add_argument("--json", type=Path, help="also write all results to this file")
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

    all_results: dict = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": args.commit}
    if args.check:
        res = check(args.device)
        all_results["check"] = res
        print("bf16 check (errors vs fp32 reference on identical weights):")
        for k in ("velotune_bf16", "stock_bf16"):
            r = res[k]
            print(f"  {k:<14} loss {r['loss']:.5f} rel {r['loss_rel_err']:.2e}  grad rel err max "
                  f"{r['grad_rel_err_max']:.3e} mean {r['grad_rel_err_mean']:.3e} ({r['n_grads']} LoRA grads)")
        print(f"  verdict: {res['verdict']} (ours <= 1.5x stock's own error)", flush=True)

    impls = [i for i in args.impls if i != "liger" or _liger_importable()]
    if "liger" in args.impls and "liger" not in impls:
        print("liger-kernel not importable: skipped")
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    peak = None
    if args.device.startswith("cuda"):
        r = _run_worker(["--peak-worker"])
        peak = r and r["tflops"]
        print(f"{card}: measured bf16 matmul {peak:.0f} TFLOP/s" if peak else "peak measurement failed")
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
              "--seq", str(args.seq), "--device", args.device] + (["--profile"] if args.profile else [])
    rows = []
    for shape in args.shapes:
        res = {}
        for impl in impls:
            r = _run_worker(["--worker", impl, shape, *common])
            if r is None:
                continue
            res[impl] = r
            mfu = r["flops_per_token"] * r["tokens_per_s"] / (peak * 1e12) if peak else None
            r["mfu"] = mfu
            peak_s = (f"{r['peak_gib']:.2f} GiB (fwd {r['peak_fwd_gib']:.2f}, resting {r['after_step_gib']:.2f})"
                      if r["peak_gib"] is not None else "-")
            print(f"[{shape}] {impl:<9} {r['tokens_per_s']:>9.0f} tok/s  {r['ms_per_step']:>7.1f} ms/step  "
                  f"peak {peak_s}  MFU {mfu * 100 if mfu else float('nan'):.1f}%  "
                  f"first loss {r['first_loss']:.5f}  last {r['last_loss']:.5f}", flush=True)
            if "report" in r:
                print("   " + r["report"].replace("\n", "\n   "))
            if "profile" in r:
                cats = r["profile"]["categories"]
                total = sum(cats.values())
                print(f"   GPU time per step by category ({impl}, {shape}): total {total:.1f} ms")
                for cat, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
                    print(f"     {cat:<30} {ms:>8.1f} ms  {100 * ms / total:5.1f}%")
                print("   top kernels (ms/step):")
                for ms, k in r["profile"]["top_kernels"]:
                    print(f"     {ms:>7.2f}  {k}")
        all_results[shape] = res
        for name in [k for k in res if k.startswith("velotune")]:
            if "stock" not in res:
                break
            v, s = res[name], res["stock"]
            speed = v["tokens_per_s"] / s["tokens_per_s"]
            mem = v["peak_gib"] / s["peak_gib"] if v["peak_gib"] and s["peak_gib"] else float("nan")
            print(f"[{shape}] {name} / stock: {speed:.2f}x tokens/s, {mem:.2f}x peak memory; first-step losses "
                  f"{v['first_loss']:.4f} vs {s['first_loss']:.4f}", flush=True)
            rows.append(f"| {card} | {all_results['date']} | {args.commit} | {shape} ({name}) | {s['tokens_per_s']:.0f} | "
                        f"{v['tokens_per_s']:.0f} | {speed:.2f}x | {s['peak_gib']:.2f} | {v['peak_gib']:.2f} | "
                        f"{mem:.2f}x |" if v["peak_gib"] else f"| {card} | {shape} | {speed:.2f}x |")
    if rows:
        print("\nBENCHMARKS.md rows:\n" + "\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(all_results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
