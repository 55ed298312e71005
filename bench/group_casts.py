"""Kernel time of the two multi-tensor copies a graphed 8B layer makes, each way it can be done, in
CUDA graphs (no host time): the adapters of a projection group cast fp32 -> bf16 into one flat
buffer (lora/fused._cast_together), and a layer's 14 LoRA gradients stored into the static buffer
(layer_graphs._Entry._store_grads).

    python bench/group_casts.py
"""
import torch


def timed(fn, reps: int = 200) -> float:
    """Microseconds per call of fn, replayed from a CUDA graph of `reps` calls (no host time)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(5):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / (5 * reps)


def main() -> None:
    dev, r, H, I, kv = "cuda", 16, 4096, 14336, 1024
    groups = {   # (A shapes, B shapes) of the 8B groups, fp32 masters
        "qkv": ([(r, H)] * 3, [(H, r), (kv, r), (kv, r)]),
        "gate_up+A_down": ([(r, H)] * 2 + [(r, I)], [(I, r)] * 2),
        "o": ([(r, H)], [(H, r)]),
    }
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    for name, (As, Bs) in groups.items():
        ts = [torch.randn(s, device=dev) for s in As + Bs]
        n = sum(t.numel() for t in ts)
        flat = torch.empty(n, dtype=torch.bfloat16, device=dev)
        views, off = [], 0
        for t in ts:
            views.append(flat[off:off + t.numel()].view(t.shape))
            off += t.numel()
        fe = timed(lambda: torch._foreach_copy_(views, ts))
        ct = timed(lambda: torch.cat([t.reshape(-1) for t in ts]).to(torch.bfloat16))
        print(f"  cast {name:16s} {n / 1e6:5.2f} M elements: foreach_copy_ {fe:6.1f} us, cat + to {ct:6.1f} us")
    shapes = [(r, H), (H, r), (r, H), (kv, r), (r, H), (kv, r), (r, H), (H, r),
              (r, H), (I, r), (r, H), (I, r), (r, I), (H, r)]
    grads = [torch.randn(s, device=dev) for s in shapes]
    buf = torch.empty(sum(g.numel() for g in grads), device=dev)
    views, off = [], 0
    for g in grads:
        views.append(buf[off:off + g.numel()].view(g.shape))
        off += g.numel()
    fe = timed(lambda: torch._foreach_copy_(views, grads))
    ct = timed(lambda: torch.cat([g.reshape(-1) for g in grads], out=buf))
    print(f"  store 14 gradients {buf.numel() / 1e6:5.2f} M fp32: foreach_copy_ {fe:6.1f} us, cat(out=) {ct:6.1f} us")

    # the adapter gradients' GEMMs (lora/fused._mm_to): bf16 result + cast vs cuBLAS writing fp32
    N = 4096
    x = torch.randn(N, H, device=dev, dtype=torch.bfloat16)
    for out_dim in (H, kv, I):
        dy = torch.randn(N, out_dim, device=dev, dtype=torch.bfloat16)
        xa = torch.randn(N, r, device=dev, dtype=torch.bfloat16)
        cast = timed(lambda: (dy.t() @ xa).float())
        f32 = timed(lambda: torch.mm(dy.t(), xa, out_dtype=torch.float32))
        print(f"  dB [{out_dim}, {r}] over {N} rows: bf16 GEMM + cast {cast:6.1f} us, out_dtype fp32 {f32:6.1f} us")
    dxa = torch.randn(N, 3 * r, device=dev, dtype=torch.bfloat16)
    cast = timed(lambda: (dxa.t() @ x).float())
    f32 = timed(lambda: torch.mm(dxa.t(), x, out_dtype=torch.float32))
    print(f"  dA [{3 * r}, {H}] over {N} rows: bf16 GEMM + cast {cast:6.1f} us, out_dtype fp32 {f32:6.1f} us")


if __name__ == "__main__":
    main()
