"""Where the memsets in front of cuBLAS GEMMs come from (8B QLoRA traces: ~20 per layer and step, each
with ~10 us of idle around it inside the CUDA graphs): a graph of the step's GEMM shapes, profiled,
under the cuBLAS settings given by the environment of this process.

    python bench/gemm_memsets.py            # run in subprocesses with each variant by the caller
"""
import os

import torch
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(4096, 4096, device=dev, dtype=bf)
    w_up = torch.randn(14336, 4096, device=dev, dtype=bf)
    w_dn = torch.randn(4096, 14336, device=dev, dtype=bf)
    acc = torch.randn(4096, 14336, device=dev, dtype=bf)

    def body():
        g = x @ w_up.t()                               # gate/up forward (beta 0)
        acc.addmm_(x, w_up.t())                        # an accumulating GEMM (beta 1)
        return g @ w_dn.t()                            # down

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
    evs = sorted([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA],
                 key=lambda e: e.time_range.start)
    memsets = [e for e in evs if "emset" in e.name]
    span = (evs[-1].time_range.end - evs[0].time_range.start) / 10
    busy = sum(e.time_range.end - e.time_range.start for e in evs) / 10
    env = {k: v for k, v in os.environ.items() if k.startswith(("CUBLAS", "TORCH_CUBLAS", "TORCH_BLAS"))}
    print(f"  {env or 'default'} blas={torch.backends.cuda.preferred_blas_library()}: per replay {span:.1f} us, "
          f"busy {busy:.1f} us, {len(memsets) / 10:.0f} memsets, kernels: "
          f"{sorted({e.name[:40] for e in evs if 'emset' not in e.name})}", flush=True)


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "lt":
        torch.backends.cuda.preferred_blas_library("cublaslt")
    main()
