"""GPU check and benchmark of velotune's kernels against stock PyTorch, torch.compile and Liger-Kernel.

    PYTHONPATH=$PWD/.devsite:$PWD/src python bench/fused_kernels.py [--compile-budget 60] [--jsonl rows.jsonl]

1. Correctness, for bf16 / fp16 / fp32 at --check-tokens tokens (full hidden / vocab sizes): each
   output and gradient of velotune and of the stock PyTorch path is compared with a float64 run of
   the stock path; error = ||x - ref|| / ||ref||. Pass: velotune's error <= 1.5x stock's (or <= 1e-6,
   fp32 rounding noise).
2. Timing, bf16, Llama-3-8B shapes (hidden 4096, intermediate 14336, 32/8 heads of 128, vocab
   128256, --tokens tokens): forward+backward with `triton.testing.do_bench` medians, for stock eager,
   torch.compile of the stock code (time-boxed by --compile-budget seconds; 0 skips), Liger-Kernel
   (if importable) and velotune. Peak memory = max allocated during one fwd+bwd minus what was
   allocated before (inputs excluded).
Prints a compact table at the end; --out writes all numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from velotune.kernels.cross_entropy import cross_entropy  # noqa: E402
from velotune.kernels.fused_linear_ce import KeptRows, fused_linear_cross_entropy  # noqa: E402
from velotune.kernels.glu import geglu, glu_reference, swiglu  # noqa: E402
from velotune.kernels.rmsnorm import rms_norm, rms_norm_reference  # noqa: E402
from velotune.kernels.rope import apply_rope, apply_rope_, apply_rope_reference  # noqa: E402

try:
    from liger_kernel.transformers import functional as liger
except Exception as e:  # noqa: BLE001 - optional contender
    print(f"Liger-Kernel unavailable: {e!r}")
    liger = None

DEV = "cuda"


# ----------------------------------------------------------------------------------------------------
# cases: inputs(dtype, tokens) -> (leaves, extras); each contender fn(leaves, extras) -> outputs
# ----------------------------------------------------------------------------------------------------
class Case:
    def __init__(
        self, name, inputs, stock, ours, liger_fn=None, compile_ok=True, time_it=True, variants=None, graphs=True
    ):
        self.name, self.inputs, self.stock, self.ours, self.graphs = name, inputs, stock, ours, graphs
        self.liger, self.compile_ok, self.time_it = liger_fn, compile_ok, time_it
        self.variants = variants or {}  # extra velotune paths, timed and logged (not in the table)


def rand(*shape, dtype, scale=1.0, grad=True):
    return (torch.randn(*shape, device=DEV, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)


def rms_inputs(H):
    def make(dtype, n):
        return [rand(n, H, dtype=dtype), rand(H, dtype=dtype, scale=0.1)], {}

    return make


def rope_inputs(dtype, n, B=4, Hq=32, Hk=8, D=128):
    from transformers import LlamaConfig
    from velotune.kernels.rope import rope_cos_sin

    T = n // B
    cfg = LlamaConfig(
        hidden_size=Hq * D,
        num_attention_heads=Hq,
        num_key_value_heads=Hk,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_theta": 500000.0,
        },
    )
    pos = torch.arange(T, device=DEV)[None].expand(B, T)
    cos, sin = rope_cos_sin(cfg, pos, DEV, dtype=dtype)
    return [rand(B, T, Hq * D, dtype=dtype), rand(B, T, Hk * D, dtype=dtype)], {
        "cos": cos,
        "sin": sin,
        "shape": (B, T, Hq, Hk, D),
    }


def _qk(leaves, ex):
    B, T, Hq, Hk, D = ex["shape"]
    # clone: the projection output is a non-leaf in a model; every contender pays the same copy
    q = leaves[0].clone().view(B, T, Hq, D).transpose(1, 2)
    k = leaves[1].clone().view(B, T, Hk, D).transpose(1, 2)
    return q, k


def _rope_in_place(leaves, ex):
    """velotune's model path: the (cloned) projection outputs rotated in place, then viewed as heads."""
    B, T, Hq, Hk, D = ex["shape"]
    q, k = apply_rope_(leaves[0].clone(), leaves[1].clone(), ex["cos"], ex["sin"], D)
    return q.view(B, T, Hq, D).transpose(1, 2), k.view(B, T, Hk, D).transpose(1, 2)


def glu_inputs(I):
    def make(dtype, n):
        return [rand(n, I, dtype=dtype, scale=2.0), rand(n, I, dtype=dtype)], {}

    return make


def ce_inputs(V):
    def make(dtype, n):
        labels = torch.randint(0, V, (n,), device=DEV)
        labels[torch.rand(n, device=DEV) < 0.1] = -100
        return [rand(n, V, dtype=dtype, scale=2.0)], {"labels": labels}

    return make


def flce_inputs(H, V, train_w):
    def make(dtype, n):
        labels = torch.randint(0, V, (n,), device=DEV)
        labels[torch.rand(n, device=DEV) < 0.1] = -100
        return [rand(n, H, dtype=dtype), rand(V, H, dtype=dtype, scale=H**-0.5, grad=train_w)], {"labels": labels}

    return make


def stock_ce(logits, labels, softcap=None):
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # ForCausalLMLoss: logits.float()
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return F.cross_entropy(z, labels, ignore_index=-100)


def build_cases(args):
    H, I, V = args.hidden, args.intermediate, args.vocab
    cases = [
        Case(
            "rmsnorm",
            rms_inputs(H),
            lambda L, e: rms_norm_reference(L[0], L[1], 1e-5),
            lambda L, e: rms_norm(L[0], L[1], 1e-5),
            (lambda L, e: liger.liger_rms_norm(L[0], L[1], 1e-5)) if liger else None,
        ),
        Case(
            "rmsnorm_gemma",
            rms_inputs(H),
            lambda L, e: rms_norm_reference(L[0], L[1], 1e-6, offset=1.0),
            lambda L, e: rms_norm(L[0], L[1], 1e-6, offset=1.0),
            (lambda L, e: liger.liger_rms_norm(L[0], L[1], 1e-6, offset=1.0, casting_mode="gemma")) if liger else None,
            time_it=False,
        ),
        Case(
            "rope",
            rope_inputs,
            lambda L, e: apply_rope_reference(*_qk(L, e), e["cos"], e["sin"]),
            _rope_in_place,
            (lambda L, e: liger.liger_rope(*_qk(L, e), e["cos"], e["sin"])) if liger else None,
            variants={"ours_out_of_place": lambda L, e: apply_rope(*_qk(L, e), e["cos"], e["sin"])},
        ),
        Case(
            "swiglu",
            glu_inputs(I),
            lambda L, e: glu_reference(L[0], L[1], "silu"),
            lambda L, e: swiglu(L[0], L[1]),
            (lambda L, e: liger.liger_swiglu(L[0], L[1])) if liger else None,
        ),
        Case(
            "geglu_tanh",
            glu_inputs(I),
            lambda L, e: glu_reference(L[0], L[1], "gelu_tanh"),
            lambda L, e: geglu(L[0], L[1], "tanh"),
            (lambda L, e: liger.liger_geglu(L[0], L[1])) if liger else None,
        ),
        Case(
            "geglu_erf",
            glu_inputs(I),
            lambda L, e: glu_reference(L[0], L[1], "gelu"),
            lambda L, e: geglu(L[0], L[1]),
            None,
            time_it=False,
        ),
        Case(
            "cross_entropy",
            ce_inputs(V),
            lambda L, e: stock_ce(L[0], e["labels"]),
            lambda L, e: cross_entropy(L[0], e["labels"]),
            (lambda L, e: liger.liger_cross_entropy(L[0], e["labels"])) if liger else None,
            graphs=False,
        ),
        Case(
            "ce_softcap30",
            ce_inputs(V),
            lambda L, e: stock_ce(L[0], e["labels"], softcap=30.0),
            lambda L, e: cross_entropy(L[0], e["labels"], softcap=30.0),
            None,
            time_it=False,
        ),
        *[
            Case(
                f"flce_{name}",
                flce_inputs(H, V, trainable),
                lambda L, e: stock_ce(F.linear(L[0], L[1]), e["labels"]),
                # ours = the training forward's path: the 10% ignored rows dropped before the matmuls
                # (KeptRows inside the timed call, with its wait for the count; in training it is made
                # before the decoder layers); the variant runs every row through the matmuls
                lambda L, e: fused_linear_cross_entropy(
                    L[0], L[1], e["labels"], kept_rows=KeptRows(e["labels"]).rows()
                ),
                (lambda L, e: liger.liger_fused_linear_cross_entropy(L[0], L[1], e["labels"])) if liger else None,
                compile_ok=False,
                graphs=False,
                variants={"ours_all_rows": lambda L, e: fused_linear_cross_entropy(L[0], L[1], e["labels"])},
            )
            for name, trainable in (("frozenW", False), ("trainW", True))
        ],
    ]
    if args.only:
        cases = [c for c in cases if c.name in args.only.split(",")]
    return cases


# ----------------------------------------------------------------------------------------------------
def fwd_bwd(fn, leaves, extras, gouts=None):
    """Outputs and the gradients of <outputs, gouts> w.r.t. the leaves that require grad."""
    outs = fn(leaves, extras)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if gouts is None:
        gouts = [torch.randn_like(o) if o.dim() else torch.tensor(0.7, device=DEV, dtype=o.dtype) for o in outs]
    wanted = [x for x in leaves if x.requires_grad]
    grads = torch.autograd.grad(outs, wanted, [g.to(o.dtype) for g, o in zip(gouts, outs)])
    return [o.detach() for o in outs] + list(grads), gouts


def fresh(leaves, dtype=None):
    return [x.detach().clone().to(dtype or x.dtype).requires_grad_(x.requires_grad) for x in leaves]


def rel(a, ref):
    a, ref = a.double(), ref.double()
    if torch.isnan(a).any() or torch.isinf(a).any():
        return float("inf")
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check(case, dtype, n):
    torch.manual_seed(0)
    leaves, ex = case.inputs(dtype, n)
    ex64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in ex.items()}
    ref, gouts = fwd_bwd(case.stock, fresh(leaves, torch.float64), ex64)
    gouts = [g.double() for g in gouts]
    stock, _ = fwd_bwd(case.stock, fresh(leaves), ex, gouts)
    e_stock = max(rel(a, r) for a, r in zip(stock, ref))
    e_ours = 0.0
    for fn in (case.ours, *case.variants.values()):  # every velotune path must pass
        ours, _ = fwd_bwd(fn, fresh(leaves), ex, gouts)
        e_ours = max(e_ours, max(rel(a, r) for a, r in zip(ours, ref)))
    ok = e_ours <= 1.5 * e_stock or e_ours <= 1e-6
    return {"case": case.name, "dtype": str(dtype).split(".")[-1], "err_stock": e_stock, "err_ours": e_ours, "ok": ok}


def bench(fn, leaves, ex, rep_ms, graphs=True):
    gouts = None

    def step():
        nonlocal gouts
        _, gouts = fwd_bwd(fn, leaves, ex, gouts)

    step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    ms = triton.testing.do_bench(step, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median")
    fwd = triton.testing.do_bench(
        lambda: fn(leaves, ex), warmup=max(25, rep_ms // 4), rep=rep_ms // 2, return_mode="median"
    )
    graph = float("nan")
    if graphs:  # GPU time alone: fwd+bwd captured in a CUDA graph, replayed (no host overhead)
        try:
            graph = triton.testing.do_bench_cudagraph(step, rep=rep_ms, return_mode="median")
        except Exception as e:  # noqa: BLE001 - e.g. a host sync inside the contender
            print(f"    (no CUDA graph timing: {type(e).__name__}: {str(e)[:120]})", flush=True)
            torch.cuda.synchronize()
    return ms, peak / 2**30, fwd, graph


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--check-tokens", type=int, default=1024)
    ap.add_argument("--compile-budget", type=float, default=60.0, help="seconds for torch.compile; 0 skips")
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph (GPU time only) timing")
    ap.add_argument("--out", default="", help="all numbers (checks and timings) as one JSON file")
    common.add_output_args(ap)
    args = ap.parse_args()
    t0 = time.time()
    cases = build_cases(args)
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "args": vars(args),
        "checks": [],
        "timings": [],
    }

    if not args.skip_check:
        for case in cases:
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                r = check(case, dtype, args.check_tokens)
                results["checks"].append(r)
                print(
                    f"check {r['case']:14s} {r['dtype']:9s} stock {r['err_stock']:.2e} ours "
                    f"{r['err_ours']:.2e} {'ok' if r['ok'] else 'FAIL'}",
                    flush=True,
                )
                torch.cuda.empty_cache()
        print(f"[checks done in {time.time() - t0:.0f}s]", flush=True)

    compile_spent = 0.0
    for case in cases:
        if not case.time_it:
            continue
        torch.manual_seed(0)
        leaves, ex = case.inputs(torch.bfloat16, args.tokens)
        rep = 400 if case.name.startswith("flce") else 150
        row = {"case": case.name}
        contenders = [("stock", case.stock), ("liger", case.liger), ("ours", case.ours), *case.variants.items()]
        for name, fn in contenders:
            if fn is None:
                continue
            torch.cuda.empty_cache()
            try:
                # CUDA-graph timing for the sub-millisecond kernels only (host overhead matters there;
                # some contenders of the large cases sync with the host and cannot be captured)
                row[name] = bench(fn, leaves, ex, rep, graphs=case.graphs and not args.no_graphs)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  {case.name}/{name} failed: {e!r}", flush=True)
        if case.compile_ok and compile_spent < args.compile_budget:
            t = time.time()
            try:
                compiled = torch.compile(case.stock, dynamic=False)
                torch.cuda.empty_cache()
                row["compile"] = bench(compiled, leaves, ex, rep, graphs=case.graphs and not args.no_graphs)
            except Exception as e:  # noqa: BLE001
                print(f"  {case.name}/compile failed: {e!r}", flush=True)
            compile_spent += time.time() - t
        results["timings"].append(row)
        print(
            f"time {case.name}: "
            + ", ".join(
                f"{k} {v[0]:.3f} ms (fwd {v[2]:.3f}, graph {v[3]:.3f}) {v[1]:.2f} GiB"
                for k, v in row.items()
                if k != "case"
            ),
            flush=True,
        )
        del leaves, ex
        torch.cuda.empty_cache()

    print(
        f"\n{results['device']}, torch {torch.__version__}, triton {triton.__version__}, "
        f"tokens {args.tokens}, {time.time() - t0:.0f}s"
    )
    print(
        "| kernel | stock ms | compile ms | liger ms | velotune ms | vs stock | vs liger "
        "| graph ms stock/compile/liger/ours | peak GiB stock/liger/ours |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["timings"]:

        def ms(k):
            return f"{r[k][0]:.3f}" if k in r else "-"

        def gib(k):
            return f"{r[k][1]:.2f}" if k in r else "-"

        def gms(k):
            return f"{r[k][3]:.3f}" if k in r and r[k][3] == r[k][3] else "-"

        vs = f"{r['ours'][0] / r['stock'][0]:.2f}x" if "ours" in r and "stock" in r else "-"
        vl = f"{r['ours'][0] / r['liger'][0]:.2f}x" if "ours" in r and "liger" in r else "-"
        print(
            f"| {r['case']} | {ms('stock')} | {ms('compile')} | {ms('liger')} | {ms('ours')} | {vs} | {vl} | "
            f"{gms('stock')}/{gms('compile')}/{gms('liger')}/{gms('ours')} | "
            f"{gib('stock')}/{gib('liger')}/{gib('ours')} |"
        )
    bad = [c for c in results["checks"] if not c["ok"]]
    print(
        f"correctness: {len(results['checks']) - len(bad)}/{len(results['checks'])} ok"
        + (
            "".join(
                f"\n  FAIL {c['case']} {c['dtype']}: ours {c['err_ours']:.2e} stock {c['err_stock']:.2e}" for c in bad
            )
        )
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    # one row per timed kernel: (median ms, peak GiB, forward ms, graph ms) per contender
    common.write_rows(
        args.jsonl,
        "fused_kernels",
        [
            {
                "kernel": r["case"],
                "tokens": args.tokens,
                "dtype": "bf16",
                **{
                    k: {"ms": v[0], "peak_gib": v[1], "graph_ms": v[3] if v[3] == v[3] else None}
                    for k, v in r.items()
                    if k != "case"
                },
                "checks_ok": f"{len(results['checks']) - len(bad)}/{len(results['checks'])}",
            }
            for r in results["timings"]
        ],
        args.commit,
    )


if __name__ == "__main__":
    main()
