"""Is a training step bound by the host (Python launching kernels) or by the GPU?

    PYTHONPATH=.devsite:src python bench/host_overhead.py --impls velotune-qlora velotune-lora [--gaps 14]

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402


def measure(impl: str, args) -> None:
    velotune = impl.startswith("velotune")
    memory = common.memory_options(args) if velotune else None
    model = common.build(impl, common.config("8b"), "cuda", torch.bfloat16, args.seq, memory)
    step, _, opt, batch = common.training_step(
        model, args.batch, args.seq, "cuda", optimizer=args.optimizer if velotune else "adamw"
    )
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
    t0 = time.perf_counter()  # as bench/qlora.py times: no synchronize between the steps
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
    print(
        f"{impl}{tag}: enqueue {1e3 * sum(enq) / len(enq):.1f} ms, wall {1e3 * sum(wall) / len(wall):.1f} ms/step "
        f"({n_tok * len(wall) / sum(wall):.0f} tok/s); back to back {1e3 * back_to_back:.1f} ms/step "
        f"({n_tok / back_to_back:.0f} tok/s)",
        flush=True,
    )

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
    print(
        f"  GPU kernels on the compute stream: {busy / 1e3:.1f} ms, {n} launches/step; "
        f"offload copies (side streams) {copies / 1e3:.1f} ms",
        flush=True,
    )
    for us, count, key in sorted(top, reverse=True)[: args.kernels]:
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
        for _ in range(2):  # two steps back to back: the second one's start shows the boundary
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
    ranges = sorted(
        (e.start_ns(), e.start_ns() + e.duration_ns(), e.name()[6:]) for e in evs if e.name().startswith("phase:")
    )
    launch_at = {
        e.correlation_id(): e.start_ns()
        for e in evs
        if e.device_type() == torch.autograd.DeviceType.CPU and e.name().startswith("cuda")
    }
    kernels = [
        e
        for e in evs
        if e.device_type() == torch.autograd.DeviceType.CUDA and "emcpy" not in e.name() and "emset" not in e.name()
    ]
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
        if prev_end is None or k.start_ns() + k.duration_ns() > prev_end:
            prev_end, prev_name = k.start_ns() + k.duration_ns(), k.name()
    for a, b, name in ranges:
        print(
            f"  phase {name:<10} wall {(b - a) / 1e6:8.1f} ms | kernels launched in it "
            f"{busy.get(name, 0) / 1e6:8.1f} ms"
            f" | stream idle before them {idle.get(name, 0) / 1e6:7.1f} ms",
            flush=True,
        )
    print(
        f"  stream idle in all {sum(idle.values()) / 1e6:.1f} ms over {len(main)} kernels; most waited-for:", flush=True
    )
    for key, (c, t) in sorted(waited.items(), key=lambda kv: -kv[1][1])[: args.gaps]:
        print(f"    {t / 1e6:7.2f} ms  {c:5d}x  {key}", flush=True)
    print("  the same idle by the kernel that ran before it (two steps, so a per-step figure is half):", flush=True)
    for key, (c, t) in sorted(after.items(), key=lambda kv: -kv[1][1])[: args.gaps]:
        print(f"    {t / 1e6:7.2f} ms  {c:5d}x  {key}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", nargs="+", default=["velotune-qlora", "velotune-lora"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--kernels", type=int, default=0, help="list this many GPU kernels by time")
    ap.add_argument("--no-cprofile", action="store_true")
    ap.add_argument(
        "--gaps", type=int, default=0, help="profile one step's idle GPU time by phase; list this many kernels"
    )
    ap.add_argument(
        "--recompute", choices=["layer", "mlp"], help="velotune: get_peft_model(recompute=); default: the library's"
    )
    ap.add_argument("--cuda-graphs", action="store_true", help="velotune: get_peft_model(cuda_graphs=True)")
    ap.add_argument("--offload-embedding", action="store_true", help="velotune: get_peft_model(offload_embedding=True)")
    ap.add_argument("--optimizer", default="adamw", choices=common.OPTIMIZERS, help="velotune contenders' optimizer")
    args = ap.parse_args()
    for impl in args.impls:
        measure(impl, args)


if __name__ == "__main__":
    main()
