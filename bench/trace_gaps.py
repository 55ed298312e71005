"""Read a `bench/host_overhead.py --dump` event file off the machine: where the compute stream of
two profiled steps is busy (kernels, device copies, memsets) and idle, the idle split into gaps of
< 20 us (between a graph's nodes) and longer ones (listed, with what ran next), and GPU time by
kernel name.

    python bench/trace_gaps.py bench/results/trace_7f2cbc2.jsonl.gz [--stream 7] [--top 30]
"""
import argparse
import collections
import gzip
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dump")
    ap.add_argument("--stream", type=int, default=7, help="the compute stream's id in the dump")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    events = [json.loads(line) for line in gzip.open(args.dump, "rt")]
    main_ = sorted((e for e in events if e["k"] == "cuda" and e["r"] == args.stream
                    and not e["n"].startswith(("phase:", "Optimizer."))), key=lambda e: e["t"])
    steps = 2
    t0, t1 = main_[0]["t"], max(e["t"] + e["d"] for e in main_)

    def kind(name):
        return "memcpy" if name.startswith("Memcpy") else "memset" if name.startswith("Memset") else "kernel"

    edges = sorted([(e["t"], 1, kind(e["n"])) for e in main_] + [(e["t"] + e["d"], -1, kind(e["n"])) for e in main_])
    active, cover, last = collections.Counter(), collections.Counter(), None
    for t, d, k in edges:
        if last is not None and t > last:
            cover[tuple(sorted(c for c, n in active.items() if n > 0))] += t - last
        active[k] += d
        last = t
    print(f"span {(t1 - t0) / steps / 1e6:.1f} ms per step; the compute stream was busy with:")
    for what, ns in cover.most_common():
        print(f"  {ns / steps / 1e6:8.2f} ms  {' + '.join(what) or 'nothing (idle)'}")
    small, big, end = 0, [], None
    for e in main_:
        if end is not None and e["t"] > end:
            gap = e["t"] - end
            if gap < 20_000:
                small += gap
            else:
                big.append(((end - t0) / 1e6, gap / 1e3, e["n"][:60]))
        end = e["t"] + e["d"] if end is None else max(end, e["t"] + e["d"])
    print(f"idle in gaps < 20 us: {small / steps / 1e6:.2f} ms per step; {len(big)} longer gaps "
          f"({sum(g for _, g, _ in big) / steps / 1e3:.2f} ms per step):")
    for at, gap, name in big:
        print(f"  at {at:9.2f} ms  {gap:8.1f} us  before {name}")
    time, count = collections.Counter(), collections.Counter()
    for e in main_:
        time[e["n"][:70]] += e["d"]
        count[e["n"][:70]] += 1
    print("GPU time by name (per step):")
    for name, ns in time.most_common(args.top):
        print(f"  {ns / steps / 1e6:8.2f} ms  {count[name] / steps:6.0f}x  {name}")


if __name__ == "__main__":
    main()
