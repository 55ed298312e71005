"""Is a training step bound by the host (Python launching kernels) or by the GPU?

    PYTHONPATH=.devsite:src python bench/host_overhead.py --impls velotune-qlora velotune-lora

For each contender (8B shape, 2 x 2048 tokens, as bench/qlora.py builds it), after warm-up:
  * enqueue ms: time until `step()` returns (the host has queued everything), vs wall ms after a
    synchronize: when they are equal, the GPU waited for the host;
  * GPU busy ms: the sum of kernel times on the compute stream (torch.profiler, copies on the side
    streams excluded), and the kernel count per step;
  * the host functions that take the time (cProfile of one step, by own time).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from qlora import build  # noqa: E402
from train import _config, training_step  # noqa: E402


def measure(impl: str, args) -> None:
    config = _config("8b")
    velotune = impl.startswith("velotune")
    model = build(impl, config, "cuda", torch.bfloat16, args.seq, cuda_graphs=args.cuda_graphs,
                  recompute=args.recompute, offload_embedding=args.offload_embedding and velotune)
    step, _, opt, batch = training_step(model, args.batch, args.seq, "cuda",
                                        offload_optimizer=args.offload_optimizer and velotune,
                                        update_in_backward=args.optimizer_in_backward)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    enq, wall = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        enq.append(t1 - t0)
        wall.append(t2 - t0)
    t0 = time.perf_counter()           # as bench/qlora.py times: no synchronize between the steps
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    back_to_back = (time.perf_counter() - t0) / args.steps
    n_tok = args.batch * args.seq
    if args.gaps:
        try:
            gaps(model, opt, batch, args)
        except Exception as e:  # a diagnostic: report and go on with the rest
            print(f"  gaps failed: {type(e).__name__}: {e}", flush=True)
    graphs = getattr(model, "velotune_layer_graphs", None)
    tag = f" [layer graphs {graphs.stats}]" if graphs is not None else ""
    print(f"{impl}{tag}: enqueue {1e3 * sum(enq) / len(enq):.1f} ms, wall {1e3 * sum(wall) / len(wall):.1f} ms/step "
          f"({n_tok * len(wall) / sum(wall):.0f} tok/s); back to back {1e3 * back_to_back:.1f} ms/step "
          f"({n_tok / back_to_back:.0f} tok/s)", flush=True)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    busy = copies = 0.0
    n = 0
    top = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0.0) or 0.0
        if not us:
            continue
        if "Memcpy DtoH" in e.key or "Memcpy HtoD" in e.key:
            copies += us
        else:
            busy += us
            n += e.count
            top.append((us, e.count, e.key))
    print(f"  GPU kernels on the compute stream: {busy / 1e3:.1f} ms, {n} launches/step; "
          f"offload copies (side streams) {copies / 1e3:.1f} ms", flush=True)
    for us, count, key in sorted(top, reverse=True)[:args.kernels]:
        print(f"    {us / 1e3:8.2f} ms  {count:5d}x  {key[:100]}", flush=True)
    if args.no_cprofile:
        del model, step
        torch.cuda.empty_cache()
        return

    pr = cProfile.Profile()
    torch.cuda.synchronize()
    pr.enable()
    step()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("tottime").print_stats(args.top)
    st.sort_stats("cumulative").print_stats(args.top)
    text = s.getvalue()
    print("\n".join(line[:160] for line in text.splitlines() if line.strip()), flush=True)
    del model, step
    torch.cuda.empty_cache()


def gaps(model, opt, batch, args) -> None:
    """Where the compute stream sits idle: one profiled step, its phases marked (forward through the
    decoder layers, forward of the final norm + loss, backward, optimizer). Per phase: wall, kernel
    time on the busiest stream, and idle time; then the kernels that most often waited (the idle
    time before each, summed by kernel name): the host launched them late."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    marks = {}

    def phase(name):
        if "cur" in marks:
            marks["cur"].__exit__(None, None, None)
        marks["cur"] = record_function("phase:" + name) if name else None
        if name:
            marks["cur"].__enter__()
        else:
            marks.pop("cur")

    norm = model.get_base_model().model.norm if hasattr(model, "get_base_model") else model.model.norm
    hook = norm.register_forward_pre_hook(lambda *a: phase("loss") if torch.is_grad_enabled() else None)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):             # two steps back to back: the second one's start shows the boundary
            phase("layers")
            loss = model(**batch).loss
            phase("backward")
            loss.backward()
            phase("optimizer")
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        phase(None)
    hook.remove()
    evs = list(prof.profiler.kineto_results.events())
    ranges = sorted((e.start_ns(), e.start_ns() + e.duration_ns(), e.name()[6:]) for e in evs
                    if e.name().startswith("phase:"))
    launch_at = {e.correlation_id(): e.start_ns() for e in evs
                 if e.device_type() == torch.autograd.DeviceType.CPU and e.name().startswith("cuda")}
    kernels = [e for e in evs if e.device_type() == torch.autograd.DeviceType.CUDA and "emcpy" not in e.name()
               and "emset" not in e.name()]
    by_stream = {}
    for e in kernels:
        by_stream.setdefault(e.device_resource_id(), []).append(e)
    main = max(by_stream.values(), key=lambda ks: sum(k.duration_ns() for k in ks))
    main.sort(key=lambda k: k.start_ns())

    def phase_of(t):
        for a, b, name in ranges:
            if a <= t <= b:
                return name
        return "?"

    busy, idle, waited, after = {}, {}, {}, {}
    big: list = []                     # (gap ns, the kernel after it) for the timeline below
    prev_end, prev_name = None, ""
    for k in main:
        t = launch_at.get(k.correlation_id()) or launch_at.get(k.linked_correlation_id()) or k.start_ns()
        name = phase_of(t)
        busy[name] = busy.get(name, 0) + k.duration_ns()
        if prev_end is not None and k.start_ns() > prev_end:
            gap = k.start_ns() - prev_end
            idle[name] = idle.get(name, 0) + gap
            key = k.name()[:70]
            c, t = waited.get(key, (0, 0))
            waited[key] = (c + 1, t + gap)
            pair = prev_name[:45] + " -> " + k.name()[:45]
            c, t = after.get(pair, (0, 0))
            after[pair] = (c + 1, t + gap)
            if gap >= 20_000:
                big.append((gap, k))
        if prev_end is None or k.start_ns() + k.duration_ns() > prev_end:
            prev_end, prev_name = k.start_ns() + k.duration_ns(), k.name()
    for a, b, name in ranges:
        print(f"  phase {name:<10} wall {(b - a) / 1e6:8.1f} ms | kernels launched in it {busy.get(name, 0) / 1e6:8.1f} ms"
              f" | stream idle before them {idle.get(name, 0) / 1e6:7.1f} ms", flush=True)
    print(f"  stream idle in all {sum(idle.values()) / 1e6:.1f} ms over {len(main)} kernels; most waited-for:", flush=True)
    for key, (c, t) in sorted(waited.items(), key=lambda kv: -kv[1][1])[:args.gaps]:
        print(f"    {t / 1e6:7.2f} ms  {c:5d}x  {key}", flush=True)
    print("  the same idle by the kernel that ran before it (two steps, so a per-step figure is half):", flush=True)
    for key, (c, t) in sorted(after.items(), key=lambda kv: -kv[1][1])[:args.gaps]:
        print(f"    {t / 1e6:7.2f} ms  {c:5d}x  {key}", flush=True)
    _timeline(evs, main, big[:args.timeline])
    if args.dump:
        _dump(evs, ranges, args.dump)


def _dump(evs, ranges, path) -> None:
    """Every profiled event (host and device) as gzipped JSON lines, for reading off the machine:
    kind (cpu/cuda), name, resource (stream or thread), start and duration in ns, correlation ids."""
    import gzip
    import json

    with gzip.open(path, "wt") as f:
        for a, b, name in ranges:
            f.write(json.dumps({"k": "phase", "n": name, "t": a, "d": b - a}) + "\n")
        for e in evs:
            cuda = e.device_type() == torch.autograd.DeviceType.CUDA
            f.write(json.dumps({"k": "cuda" if cuda else "cpu", "n": e.name()[:120], "r": e.device_resource_id(),
                                "t": e.start_ns(), "d": e.duration_ns(), "c": e.correlation_id(),
                                "l": e.linked_correlation_id()}) + "\n")
    print(f"  wrote {len(evs)} events to {path}", flush=True)


def _timeline(evs, main, gaps) -> None:
    """For each of the first idle gaps of >= 20 us on the busiest stream: everything on the device
    (kernels and copies, every stream) that ended in the 300 us before the waiting kernel started or
    was running then, times relative to that start. What ended just before it is what it waited for."""
    if not gaps:
        return
    main_id = main[0].device_resource_id()
    dev = [e for e in evs if e.device_type() == torch.autograd.DeviceType.CUDA]
    for gap, k in gaps:
        t0 = k.start_ns()
        print(f"  idle {gap / 1e3:.0f} us before {k.name()[:60]} (stream {main_id}); device events around it:",
              flush=True)
        near = [e for e in dev if t0 - 300_000 <= e.start_ns() + e.duration_ns() <= t0 + 5_000
                or e.start_ns() <= t0 <= e.start_ns() + e.duration_ns()]
        for e in sorted(near, key=lambda e: e.start_ns() + e.duration_ns())[-12:]:
            print(f"    stream {e.device_resource_id():>3}  {(e.start_ns() - t0) / 1e3:9.1f} .. "
                  f"{(e.start_ns() + e.duration_ns() - t0) / 1e3:8.1f} us  {e.name()[:70]}", flush=True)


def launch_cost() -> None:
    """Host µs per launch: a tiny Triton kernel through its JIT launcher, and a tiny torch op."""
    from velotune.quant.dequant_kernel import dequantize_nf4_triton
    from velotune.quant.nf4 import quantize_nf4

    w = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    nf4 = quantize_nf4(w)
    out = torch.empty_like(w)
    x = torch.randn(64, device="cuda")
    for name, fn in [("torch add_", lambda: x.add_(1.0)),
                     ("NF4 dequant, 64 x 64 weight (whole call)", lambda: dequantize_nf4_triton(nf4, out.view(-1)))]:
        if fn is None:
            continue
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(2000):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        print(f"  host cost per launch, {name}: {1e6 * (t1 - t0) / 2000:.1f} us", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", nargs="+", default=["velotune-qlora", "velotune-lora"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--kernels", type=int, default=0, help="list this many GPU kernels by time")
    ap.add_argument("--no-cprofile", action="store_true")
    ap.add_argument("--gaps", type=int, default=0, help="profile one step's idle GPU time by phase; list this many kernels")
    ap.add_argument("--cuda-graphs", action="store_true", help="velotune: decoder layers as CUDA graphs")
    ap.add_argument("--recompute", default="layer", choices=["layer", "mlp"], help="velotune: get_peft_model(recompute=)")
    ap.add_argument("--timeline", type=int, default=0,
                    help="with --gaps: for this many idle gaps of >= 20 us, every device event (all streams) around them")
    ap.add_argument("--offload-embedding", action="store_true", help="velotune: the input embeddings in host memory")
    ap.add_argument("--optimizer-in-backward", action="store_true",
                    help="velotune, with --offload-optimizer: OffloadedAdamW(update_in_backward=True)")
    ap.add_argument("--dump", help="with --gaps: write every profiled event to this .jsonl.gz")
    ap.add_argument("--saved-sets", type=int, default=0, help="graphed recompute='mlp': layer_graphs.SAVED_SETS")
    ap.add_argument("--offload-optimizer", action="store_true", help="velotune: OffloadedAdamW")
    args = ap.parse_args()
    if args.saved_sets:
        from velotune.memory import layer_graphs
        layer_graphs.SAVED_SETS = args.saved_sets
    launch_cost()
    for impl in args.impls:
        measure(impl, args)


if __name__ == "__main__":
    main()
