"""Why the fused linear CE keeps an fp32 dW accumulator: the error of accumulating lm_head's weight
gradient over row chunks in bf16 (what Liger-Kernel does) against fp32, CPU, a scaled-down shape.

    python bench/flce_accumulation.py        # ~1 min on 2 cores

Stock computes dW = dlogits^T @ X in ONE GEMM (fp32 accumulation, one rounding to bf16). A chunked
loss computes it as a sum over k row chunks; each chunk's product is exact to fp32 inside the GEMM,
and what differs is the running sum: kept in fp32 (velotune) it is rounded once at the end, kept in
bf16 it is rounded k times. Error = ||dW - dW_float64|| / ||dW_float64||; the project's bound is
1.5x stock's own error. CPU bf16 GEMMs accumulate in fp32 and round once, like cuBLAS.
"""
import torch


def main(N=8192, H=256, V=16384, seed=0):
    torch.manual_seed(seed)
    X = torch.randn(N, H).bfloat16()
    W = (torch.randn(V, H) * H ** -0.5).bfloat16()
    labels = torch.randint(0, V, (N,))

    def dlogits(rows, lab, dtype):   # (softmax - onehot) / N, as the loss's backward produces it
        z = rows.to(dtype) @ W.to(dtype).t()
        p = torch.softmax(z if dtype == torch.float64 else z.float(), -1)
        p[torch.arange(len(lab)), lab] -= 1
        return (p / N).to(dtype)

    ref = dlogits(X.double(), labels, torch.float64).t() @ X.double()

    def err(a):
        return ((a.double() - ref).norm() / ref.norm()).item()

    stock = err(dlogits(X, labels, torch.bfloat16).t() @ X)
    print(f"stock, one GEMM          {stock:.3e}")
    for k in (2, 4, 8, 16):
        C = N // k
        acc32, acc16 = torch.zeros(V, H), torch.zeros(V, H, dtype=torch.bfloat16)
        for s in range(0, N, C):
            part = dlogits(X[s:s + C], labels[s:s + C], torch.bfloat16).float().t() @ X[s:s + C].float()
            acc32 += part
            acc16 = (acc16.float() + part).bfloat16()   # addmm into a bf16 output: one rounding per chunk
        e32, e16 = err(acc32.bfloat16()), err(acc16)
        print(f"k={k:<2} chunks: fp32 running sum {e32:.3e} ({e32 / stock:.2f}x stock), "
              f"bf16 running sum {e16:.3e} ({e16 / stock:.2f}x stock)")


if __name__ == "__main__":
    main()
