"""Attention over a packed row of samples (padding-free batches): which implementation to keep.

At the 8B attention shape (32 query heads, 8 K/V heads, head dim 128, bf16), for a batch of 8
samples drawn from bench/sft.py's length mixes, forward + backward of:

  flash_varlen     torch.nn.attention.varlen.varlen_attn (one flash launch, cu_seqlens, native GQA)
  per_sample       SDPA on each sample's slice (is_causal; velotune's reference path)
  block_mask_sdpa  one SDPA call with a block-diagonal causal boolean mask [N, N] (K/V repeated)
  flex             flex_attention with a document mask (compiled; skipped where it fails)
  padded_sdpa      what a padded batch costs: [8, T] with a padding mask (stock's layout), for scale

Each is checked against an fp32 per-sample reference (output and dq, dk, dv; relative error of
the norms), next to the bf16 per-sample path's own error, and with --window W also with a sliding
window (Mistral-style; flash as window_size=(W - 1, 0)).

    PYTHONPATH=.devsite:src python bench/varlen_attention.py [--mix short long] [--window 256] [--out r.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from velotune.models.padding_free import _varlen  # noqa: E402
from velotune.models.varlen_attention import flash_capabilities, flash_varlen, per_sample  # noqa: E402

HQ, HK, D = 32, 8, 128


def block_mask_sdpa(q, k, v, varlen, *, scaling, n_rep, window=None):
    n = q.shape[0]
    seg = torch.repeat_interleave(
        torch.arange(len(varlen.lengths), device=q.device), torch.tensor(varlen.lengths, device=q.device)
    )
    i = torch.arange(n, device=q.device)
    mask = (seg[:, None] == seg[None, :]) & (i[None, :] <= i[:, None])
    if window is not None:
        mask &= i[None, :] > i[:, None] - window
    rep = lambda x: x[:, :, None].expand(n, HK, n_rep, D).reshape(n, HK * n_rep, D)  # noqa: E731
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        rep(k).transpose(0, 1)[None],
        rep(v).transpose(0, 1)[None],
        attn_mask=mask,
        scale=scaling,
    )
    return o[0].transpose(0, 1)


_FLEX: dict = {}


def flex(q, k, v, varlen, *, scaling, n_rep, window=None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    n = q.shape[0]
    seg = torch.repeat_interleave(
        torch.arange(len(varlen.lengths), device=q.device), torch.tensor(varlen.lengths, device=q.device)
    )

    def doc(b, h, qi, ki):
        ok = (seg[qi] == seg[ki]) & (ki <= qi)
        return ok & (ki > qi - window) if window is not None else ok

    bm = create_block_mask(doc, None, None, n, n, device=q.device)
    o = _FLEX["fn"](
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        block_mask=bm,
        scale=scaling,
        enable_gqa=True,
    )
    return o[0].transpose(0, 1)


def padded_sdpa(q, k, v, varlen, *, scaling, n_rep, window=None):
    """The padded layout's cost: scatter into [B, T], masked SDPA (K/V repeated, as stock), gather back."""
    B, T = len(varlen.lengths), varlen.max_len
    idx = torch.cat([torch.arange(n, device=q.device) + b * T for b, n in enumerate(varlen.lengths)])

    def pad(x, h):
        out = x.new_zeros(B * T, h, D).index_copy(0, idx, x)
        return out.view(B, T, h, D).transpose(1, 2)

    valid = torch.zeros(B * T, dtype=torch.bool, device=q.device)
    valid[idx] = True
    i = torch.arange(T, device=q.device)
    mask = (i[None, :] <= i[:, None])[None, None] & valid.view(B, 1, 1, T)
    if window is not None:
        mask = mask & (i[None, :] > i[:, None] - window)
    mask = mask | ~valid.view(B, 1, T, 1)  # padding query rows attend to everything (no NaN)
    rep = lambda x: x[:, :, None].expand(B, HK, n_rep, T, D).reshape(B, HK * n_rep, T, D)  # noqa: E731
    o = torch.nn.functional.scaled_dot_product_attention(
        pad(q, HQ), rep(pad(k, HK)), rep(pad(v, HK)), attn_mask=mask, scale=scaling
    )
    return o.transpose(1, 2).reshape(B * T, HQ, D).index_select(0, idx)


def _time(fn, q, k, v, do, iters: int) -> float:
    for _ in range(3):
        o = fn()
        torch.autograd.grad(o, (q, k, v), do)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        o = fn()
        torch.autograd.grad(o, (q, k, v), do)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def run(mix: str, window, iters: int, seed: int) -> list[dict]:
    from sft import lengths

    lens = lengths(mix, 8, seed)
    varlen = _varlen(lens, "cuda")
    n = sum(lens)
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(n, h, D, device="cuda", dtype=torch.bfloat16, generator=g) for h in (HQ, HK, HK))
    do = torch.randn(n, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    scaling, n_rep = D**-0.5, HQ // HK
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref_o = per_sample(*ref_in, varlen, scaling=scaling, n_rep=n_rep, window=window)
    ref = (ref_o, *torch.autograd.grad(ref_o, ref_in, do.float()))
    cands = {"per_sample": per_sample, "block_mask_sdpa": block_mask_sdpa, "flex": flex, "padded_sdpa": padded_sdpa}
    if flash_capabilities()[0] is not None:
        cands = {"flash_varlen": flash_varlen, **cands}
    rows = []
    for name, fn in cands.items():
        call = lambda: fn(q, k, v, varlen, scaling=scaling, n_rep=n_rep, window=window)  # noqa: B023,E731
        row = {"impl": name, "mix": mix, "window": window, "tokens": n, "lengths": lens, "max_len": max(lens)}
        try:
            o = call()
            grads = torch.autograd.grad(o, (q, k, v), do)
            row["rel_err"] = {t: _rel(a, b) for t, a, b in zip(("o", "dq", "dk", "dv"), (o, *grads), ref)}
            row["ms_fwd_bwd"] = _time(call, q, k, v, do, iters)
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run here is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mix", nargs="+", default=["short", "long"])
    p.add_argument("--window", type=int, nargs="*", default=[256], help="also run with these sliding windows")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args()
    fn, params = flash_capabilities()
    print(
        f"torch {torch.__version__}, {torch.cuda.get_device_name()}, varlen_attn: "
        f"{'yes ' + str(sorted(params)) if fn else 'no'}",
        flush=True,
    )
    rows = []
    for mix in args.mix:
        for window in [None, *args.window]:
            rows += run(mix, window, args.iters, args.seed)
    print(f"{'mix':<6}{'window':>7}{'tokens':>8}{'impl':>17}{'ms fwd+bwd':>12}  rel err o / dq / dk / dv vs fp32")
    for r in rows:
        err = r.get("rel_err")
        errs = " / ".join(f"{err[t]:.1e}" for t in ("o", "dq", "dk", "dv")) if err else r.get("error", "")
        ms = f"{r['ms_fwd_bwd']:.3f}" if "ms_fwd_bwd" in r else "-"
        print(f"{r['mix']:<6}{r['window']!s:>7}{r['tokens']:>8}{r['impl']:>17}{ms:>12}  {errs}")
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
