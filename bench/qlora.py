"""QLoRA (NF4) throughput, memory and maximum context: velotune vs stock transformers+bitsandbytes+PEFT.

Random-weight Llama-3.1-8B shape built on the GPU in bf16; for the 4-bit contenders every decoder
linear is quantised there to NF4 with double quantisation (bitsandbytes' `Params4bit`, what
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`
produces). LoRA r=16 alpha=16 on all 7 projections, fused AdamW on the LoRA parameters, batch 2 x 2048
random token ids. Each contender runs in its own process (clean peak-memory figures).

  velotune-qlora   FastLanguageModel path on the 4-bit model, use_gradient_checkpointing="unsloth"
  velotune-lora    the same on the bf16 model (the 16-bit reference QLoRA must keep up with)
  stock-qlora      prepare_model_for_kbit_training (non-reentrant checkpointing) + get_peft_model
  stock-lora       bf16 model + get_peft_model + non-reentrant checkpointing

    python bench/qlora.py                                   # throughput table (all four contenders)
    python bench/qlora.py --dequant                         # NF4 dequant: bit-exact vs bitsandbytes, timing,
                                                            # separate vs fused into the GEMM (M=4096 and 1)
    python bench/qlora.py --max-context --card-gib 78 --gpus 2   # longest trainable sequence, batch 1
    python bench/qlora.py --mem-trace --impls velotune-qlora   # what is alive at the peak
    python bench/qlora.py --cpu-smoke                       # every code path on a tiny config, on CPU

Peak memory is torch.cuda.max_memory_allocated over the timed steps (after building the model;
reset before the first step). Graphed contenders ("-graphs", --cuda-graphs): their replays run in the
graph pool's memory without allocating it, so their peak is the allocated peak of the timed steps
plus the whole pool (`_graph_pool_bytes`).

Max context (batch 1), per contender in one process: one training step at each of --ctx-probes
lengths; peak memory is linear in the length (flash/cuDNN attention, no [T, T] or [T, V] tensors in
velotune), so a least-squares line through the probes predicts the longest length that fits the
allocator cap (--card-gib emulates a smaller card with `set_per_process_memory_fraction`), and for
offloaded checkpointing also the host RAM the pinned layer inputs need. Then ONE step runs at that
length (5% under the fit, rounded down to 1024; on OOM 4% shorter, up to 3 times): the reported maximum is a length
that trained, with the tokens/s of that step. A step predicted (quadratic fit of the probe times)
to overrun the time box is shortened and marked time-boxed. --gpus N runs contenders side by side,
one GPU each.
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
sys.path.insert(0, str(ROOT / "bench"))

# shapes, FLOP counts and the timed step are shared with the LoRA benchmark
from train import SHAPES, TARGETS, _config, _flops_per_token, _profile, training_step  # noqa: E402

IMPLS = ("velotune-qlora", "velotune-lora", "stock-qlora", "stock-lora", "velotune-qlora-mlp", "velotune-lora-mlp",
         "velotune-qlora-graphs", "velotune-lora-graphs", "velotune-qlora-mlp-graphs", "velotune-lora-mlp-graphs")
# "-mlp": the same contender with get_peft_model(recompute="mlp"), "-graphs" with cuda_graphs=True, so
# the modes can run interleaved in one call (--rounds); --recompute and --cuda-graphs set the modes of
# the plain velotune names.
# For the CPU smoke test: the tiny shape with the block-friendly intermediate size (a multiple of 64).
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=1 << 20, tie_word_embeddings=False)


# ------------------------------------------------------------------ building the contenders
def quantize_linears_(model, compute_dtype: torch.dtype) -> int:
    """Replace every decoder projection (an nn.Linear named in TARGETS) by a bitsandbytes NF4
    `Linear4bit` quantised on the weight's own device; frees each 16-bit weight as it goes."""
    import bitsandbytes as bnb

    n = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and type(child) is torch.nn.Linear:
                dev = child.weight.device
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      quant_storage=torch.uint8, device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", blocksize=64, quant_storage=torch.uint8, module=q
                                             ).to(dev)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, q)
                del child
                n += 1
    model.is_loaded_in_4bit = True  # what transformers sets on a bitsandbytes-4-bit model
    return n


def build(impl: str, config, device: str, dtype: torch.dtype, seq: int, offload_embedding: bool = False,
          cuda_graphs: bool = False, recompute: str = "layer", mlp_row_blocks: int = 0):
    from transformers import AutoModelForCausalLM

    if impl.endswith("-graphs"):
        impl, cuda_graphs = impl[:-len("-graphs")], True
    if impl.endswith("-mlp"):
        impl, recompute = impl[:-len("-mlp")], "mlp"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if impl.endswith("qlora"):
        quantize_linears_(model, dtype)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if impl.startswith("velotune"):
        from velotune import FastLanguageModel
        from velotune.models import prepare_model

        model.velotune_compute_dtype = dtype
        model.max_seq_length = seq
        prepare_model(model, max_seq_length=seq)
        return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS,
                                                use_gradient_checkpointing="unsloth", random_state=3407,
                                                offload_embedding=offload_embedding, cuda_graphs=cuda_graphs,
                                                recompute=recompute,
                                                mlp_row_blocks=(mlp_row_blocks or 1) if recompute == "mlp" else 1)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if impl == "stock-qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    torch.manual_seed(3407)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                                            bias="none", task_type="CAUSAL_LM"))


# ------------------------------------------------------------------ one contender, in its own process
def worker(args) -> dict:
    device, dtype = args.device, (torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    config = _config(args.shape) if args.shape != "smoke" else _smoke_config()
    cuda = device.startswith("cuda")
    t_build = time.perf_counter()
    if args.unfused_lora_backward:
        from velotune.kernels import glu
        glu.FUSED_LORA = False
    if args.ce_budget_mib:
        from velotune.models import loss
        loss.CE_MEMORY_BUDGET = int(args.ce_budget_mib * 2**20)
    if args.checkpointed_mlp:
        from velotune.models import mlp
        mlp.RECOMPUTED_MLP = False
    if args.host_gather_embedding:
        from velotune.memory import embedding_offload
        embedding_offload.GATHER_ON_GPU = False
    if args.saved_sets:
        from velotune.memory import layer_graphs
        layer_graphs.SAVED_SETS = args.saved_sets
    if args.dequant_kernel:
        from velotune.quant import dequant_kernel

        dequant_kernel.DEFAULT_KERNEL = args.dequant_kernel
    model = build(args.impl, config, device, dtype, args.seq, args.offload_embedding, args.cuda_graphs,
                  args.recompute, args.mlp_chunks)
    t_build = time.perf_counter() - t_build
    step, params, _, _ = training_step(model, args.batch, args.seq, device,
                                       offload_optimizer=args.offload_optimizer and args.impl.startswith("velotune"),
                                       update_in_backward=args.optimizer_in_backward)
    if args.sdpa_backend != "default":   # every step (forward, backward, graph captures) under one backend
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[args.sdpa_backend]
        plain_step = step

        def step():
            with sdpa_kernel([backend]):
                return plain_step()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None
    first_loss = None
    if args.pool_trace and cuda:      # the warm-up steps capture the graphs: record their allocations
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, context=None, stacks="python")
    try:
        for i in range(args.warmup):
            loss = step()
            if i == 0:
                first_loss = loss.item()
        if cuda:
            torch.cuda.synchronize()
        pool_trace = _pool_composition() if args.pool_trace and cuda else None
        graphed = cuda and getattr(model, "velotune_layer_graphs", None) is not None
        if graphed:       # the replays' memory is the graph pool's, added below: the timed steps' own peak
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        if cuda:
            torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return {"impl": args.impl, "seq": args.seq, "oom": True}
    elapsed = time.perf_counter() - t0
    if args.profile and cuda:
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        prof = _profile(step, 3)
        prof["wall_ms_per_step"] = (time.perf_counter() - t1) * 1000 / 3
        prof["gpu_ms_per_step"] = sum(prof["categories"].values())
    trace = None
    if args.mem_trace and cuda:
        try:
            trace = peak_composition(step)
        except Exception as e:  # noqa: BLE001 - a diagnostic; never lose the timing for it
            trace = {"error": repr(e)[:500]}
    tokens = args.batch * args.seq * args.steps
    out = {"impl": args.impl, "shape": args.shape, "seq": args.seq, "batch": args.batch, "oom": False,
           "tokens_per_s": tokens / elapsed, "ms_per_step": 1000 * elapsed / args.steps, "first_loss": first_loss,
           "last_loss": loss.item(), "build_s": t_build, "weights_gib": weights_gib,
           "peak_gib": (torch.cuda.max_memory_allocated() + _graph_pool_bytes()) / 2**30 if cuda else None,
           "flops_per_token": _flops_per_token(config, args.seq), "n_trainable": sum(p.numel() for p in params),
           "mem_trace": trace, "pool_trace": pool_trace if args.pool_trace and cuda else None,
           "profile": prof if args.profile and cuda else None}
    if args.impl.startswith("velotune"):
        from velotune.models import report

        out["report"] = report(model)
        if args.offload_embedding:
            from velotune.memory.embedding_offload import embeddings_offloaded

            out["embeddings_offloaded"] = embeddings_offloaded(model)
        stats = getattr(model, "velotune_offload_stats", None)
        if stats is not None:
            out["offloaded_gib_per_step"] = stats.bytes_offloaded / 2**30 / (args.warmup + args.steps)
        graphs = getattr(model, "velotune_layer_graphs", None)
        if graphs is not None:
            out["layer_graphs"] = dict(graphs.stats)
            if cuda:
                out["graph_pool_gib"] = _graph_pool_bytes() / 2**30
    return out


def _graph_pool_bytes() -> int:
    """Device memory the allocator holds for CUDA-graph pools. A replay uses it without allocating,
    so max_memory_allocated does not count it: a graphed contender's peak is its allocated peak over
    the timed steps plus this (0 without graphs)."""
    return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
               if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0))


def _live_peak(events, top: int = 14) -> dict:
    """events: alloc / free_completed in time order -> the peak of live bytes and what is alive
    there, grouped by block size."""
    from collections import Counter

    cur = best = best_i = 0
    sizes: dict = {}
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            sizes[e["addr"]] = e["size"]
            cur += e["size"]
            if cur > best:
                best, best_i = cur, i
        else:
            cur -= sizes.pop(e["addr"], 0)
    live: dict = {}
    for e in events[:best_i + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
        else:
            live.pop(e["addr"], None)
    by_size = Counter(live.values())
    rows = [{"site": f"{n} x {size / 2**20:.1f} MiB", "gib": n * size / 2**30}
            for size, n in sorted(by_size.items(), key=lambda kv: -kv[0] * kv[1])[:top]]
    # the allocations and frees of at least 1 MiB leading up to the peak (+: alloc, -: free), to
    # tell from the order which tensors they are
    window = [f"{'+' if e['action'] == 'alloc' else '-'}{e.get('size', 0) / 2**20:.0f}"
              for e in events[max(0, best_i - 400):best_i + 1] if e.get("size", 0) >= 2**20][-48:]
    return {"peak_gib": best / 2**30, "sites": rows, "peak_event": best_i, "events": len(events),
            "before_peak_mib": " ".join(window)}


def _pool_composition() -> dict:
    """After the capturing warm-up steps (history recorded since before them): the graph pool's
    segments, the peak of bytes live in them during the captures, and what was alive then. An
    address counts as the pool's from the event that created its segment on (earlier, the same
    addresses may have been eager memory that was released to the driver)."""
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    pool = [(seg["address"], seg["address"] + seg["total_size"]) for seg in snap["segments"]
            if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0)]
    trace = snap["device_traces"][0]
    born = {lo: max((i for i, e in enumerate(trace) if e["action"] == "segment_alloc" and e["addr"] == lo),
                    default=0) for lo, _ in pool}

    def inside(i, a):
        return any(lo <= a < hi and i > born[lo] for lo, hi in pool)

    events = [e for i, e in enumerate(trace) if e["action"] in ("alloc", "free_completed") and inside(i, e["addr"])]
    out = _live_peak(events)
    out["segments_mib"] = sorted(((hi - lo) / 2**20 for lo, hi in pool), reverse=True)
    out["pool_gib"] = sum(hi - lo for lo, hi in pool) / 2**30
    out["first_allocs"] = {}    # per segment of >= 100 MiB: what its first allocations were (Python frames)
    for lo, hi in pool:
        if hi - lo >= 100 * 2**20 and (hi - lo) % (112 * 2**20):
            firsts = [e for i, e in enumerate(trace) if e["action"] == "alloc" and lo <= e["addr"] < hi
                      and i > born[lo]][:4]
            out["first_allocs"][f"{(hi - lo) / 2**20:.0f} MiB"] = [
                f"{e['size'] / 2**20:.1f} MiB at " + " < ".join(
                    f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']}:{f['name']}" for f in e.get("frames", [])
                    if "torch/" not in f["filename"])[:900] for e in firsts]
    out["trace_events"] = len(trace)
    return out


def peak_composition(step, top: int = 14) -> dict:
    """Run one more step with allocation history on; return what is alive at its peak, grouped by
    block size (in units of one [tokens, hidden] bf16 tensor) with counts: stack capture is off
    (torch 2.11 fails inside custom autograd Functions with it on)."""
    from collections import Counter

    base = torch.cuda.memory_allocated()
    alive = Counter(b["size"] for seg in torch.cuda.memory_snapshot() for b in seg["blocks"]
                    if b["state"] == "active_allocated")
    before = [f"{n} x {size / 2**20:.1f} MiB" for size, n in sorted(alive.items(), key=lambda kv: -kv[0] * kv[1])[:top]]
    torch.cuda.memory._record_memory_history(max_entries=500_000, context=None, stacks="python")
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    out = _live_peak([e for e in snap["device_traces"][0] if e["action"] in ("alloc", "free_completed")], top)
    return {"before_gib": base / 2**30, "before": before, "step_peak_gib": out.pop("peak_gib"), **out}


def _smoke_config():
    from transformers import LlamaConfig

    return LlamaConfig(**SMOKE_SHAPE, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, use_cache=False)


def _run_worker(argv: list[str], timeout: float | None = None) -> dict | None:
    try:
        proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"worker {argv} timed out after {timeout:.0f} s", flush=True)
        return {"timeout": True}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if "OutOfMemoryError" in proc.stderr or "CUDA out of memory" in proc.stderr:
        return {"oom": True}
    print(f"worker {argv} failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}", flush=True)
    return None


# ------------------------------------------------------------------ NF4 dequantisation check + timing
def dequant_bench(device: str) -> list[dict]:
    """Bit-exactness vs bitsandbytes and time per weight for the 8B projections; plus the cost of a
    separate dequantisation next to the matmul that consumes it (an upper bound on what fusing
    dequantisation into the matmul could save)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    from velotune.quant.nf4 import NF4Weight, dequantize_nf4, dequantize_nf4_reference

    cuda = device.startswith("cuda")
    shapes = ({"q/o [4096,4096]": (4096, 4096), "k/v [1024,4096]": (1024, 4096),
               "gate/up [14336,4096]": (14336, 4096), "down [4096,14336]": (4096, 14336)} if cuda
              else {"[128,192]": (128, 192), "[64,256]": (64, 256)})
    tokens = 4096 if cuda else 16
    if cuda:
        from triton.testing import do_bench

        bench = lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731  ms
    else:
        bench = lambda fn: (lambda t0: (fn(), (time.perf_counter() - t0) * 1000)[1])(time.perf_counter())  # noqa: E731
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for label, shape in shapes.items():
            g = torch.Generator(device=device).manual_seed(len(rows))
            w = (torch.randn(shape, device=device, generator=g) * 0.02).to(dtype)
            q, st = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            nf4 = NF4Weight.from_bnb(q, st)
            ref = bnbF.dequantize_4bit(q, st)
            ours = dequantize_nf4(nf4)
            exact = torch.equal(ours, ref) and torch.equal(ours, dequantize_nf4_reference(nf4))
            row = {"dtype": str(dtype).split(".")[-1], "weight": label, "bit_exact": exact,
                   "mismatches": int((ours != ref).sum())}
            if dtype != torch.float32:
                buf = torch.empty_like(ours)
                n = w.numel()
                t_ours = bench(lambda: dequantize_nf4(nf4, out=buf))
                if cuda:   # the other layout of the same kernel ("bytes"; the default is "rows")
                    from velotune.quant.dequant_kernel import dequantize_nf4_triton

                    flat = buf.view(-1)
                    other = dequantize_nf4_triton(nf4, torch.empty_like(flat), kernel="bytes").view(ours.shape)
                    row.update(bytes_bit_exact=torch.equal(other, ours),
                               bytes_us=1000 * bench(lambda: dequantize_nf4_triton(nf4, flat, kernel="bytes")))
                t_bnb = bench(lambda: bnbF.dequantize_4bit(q, st, out=buf if cuda else None))  # CPU: no out= variant
                x = torch.randn(tokens, shape[1], device=device, dtype=dtype)
                t_mm = bench(lambda: x @ buf.t())
                t_both = bench(lambda: x @ dequantize_nf4(nf4, out=buf).t())
                moved = n // 2 + n * buf.element_size() + st.absmax.numel()
                row.update(ours_us=1000 * t_ours, bnb_us=1000 * t_bnb, ours_GBps=moved / (t_ours * 1e6),
                           matmul_us=1000 * t_mm, dequant_plus_matmul_us=1000 * t_both,
                           overhead_pct=100 * (t_both - t_mm) / t_mm)
                if cuda:   # dequantisation fused into the GEMM (quant/nf4_matmul.py), training and decode M
                    from velotune.quant.nf4_matmul import nf4_linear

                    x1 = x[:1].contiguous()
                    row.update(fused_us=1000 * bench(lambda: nf4_linear(x, nf4)),
                               m1_separate_us=1000 * bench(lambda: x1 @ dequantize_nf4(nf4, out=buf).t()),
                               m1_fused_us=1000 * bench(lambda: nf4_linear(x1, nf4)),
                               m1_bnb_us=1000 * bench(lambda: bnb.matmul_4bit(x1, q.t(), quant_state=st)))
            rows.append(row)
    return rows


def print_dequant(rows: list[dict]) -> None:
    print("NF4 dequantisation (double-quantised absmax, blocksize 64): velotune Triton vs bitsandbytes")
    print(f"{'dtype':<9}{'weight':<22}{'bit-exact':<11}{'ours us':>9}{'bnb us':>9}{'GB/s':>8}"
          f"{'matmul us':>11}{'deq+mm us':>11}{'overhead':>10}{'fused us':>10}"
          f"{'M=1 deq+mm':>12}{'M=1 fused':>11}{'M=1 bnb':>9}")
    for r in rows:
        t = (f"{r['ours_us']:>9.1f}{r['bnb_us']:>9.1f}{r['ours_GBps']:>8.0f}{r['matmul_us']:>11.1f}"
             f"{r['dequant_plus_matmul_us']:>11.1f}{r['overhead_pct']:>9.1f}%") if "ours_us" in r else ""
        if "fused_us" in r:
            t += (f"{r['fused_us']:>10.1f}{r['m1_separate_us']:>12.1f}{r['m1_fused_us']:>11.1f}"
                  f"{r['m1_bnb_us']:>9.1f}")
        if "bytes_us" in r:
            t += f"  bytes layout {r['bytes_us']:.1f} us ({'bit-exact' if r['bytes_bit_exact'] else 'MISMATCH'})"
        print(f"{r['dtype']:<9}{r['weight']:<22}{str(r['bit_exact']) + ('' if r['bit_exact'] else ' (' + str(r['mismatches']) + ')'):<11}{t}")


# ------------------------------------------------------------------ max context: probe, fit, verify
def _host_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _free_cached():
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    host_empty = getattr(torch._C, "_host_emptyCache", None)   # cached pinned host blocks
    if host_empty is not None:
        host_empty()


def context_worker(args) -> dict:
    """Longest batch-1 sequence for args.impl; see the module docstring."""
    device, dtype = args.device, (torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    cuda = device.startswith("cuda")
    config = _config(args.shape) if args.shape != "smoke" else _smoke_config()
    deadline = time.time() + args.time_box
    out: dict = {"impl": args.impl, "probes": [], "verify": []}
    if cuda and args.card_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.card_gib * 2**30 / total))
        out["cap_gib"] = args.card_gib
    cap = args.card_gib * 2**30 if args.card_gib else (torch.cuda.get_device_properties(device).total_memory
                                                        if cuda else None)
    model = build(args.impl, config, device, dtype, max(args.ctx_probes), args.offload_embedding,
                  args.cuda_graphs, args.recompute)

    def one_step(L):
        step, _, opt, _ = training_step(model, 1, L, device)
        _free_cached()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = step()
        loss = loss.item()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if cuda else None
        del step, opt
        return {"seq": L, "s": dt, "tokens_per_s": L / dt, "peak_gib": peak / 2**30 if peak else None,
                "loss": loss}

    one_step(args.ctx_probes[0])                      # warm-up: kernels compiled, buffers allocated
    for L in args.ctx_probes:
        try:
            r = one_step(L)
        except torch.OutOfMemoryError:
            print(f"  [{args.impl}] probe {L:>7}: OOM", flush=True)
            _free_cached()
            break
        out["probes"].append(r)
        print(f"  [{args.impl}] probe {L:>7}: {r['s']:.2f} s, {r['tokens_per_s']:.0f} tok/s"
              + (f", peak {r['peak_gib']:.2f} GiB" if cuda else ""), flush=True)
    if not cuda or len(out["probes"]) < 2:
        return out
    Ls = torch.tensor([p["seq"] for p in out["probes"]], dtype=torch.float64)
    peaks = torch.tensor([p["peak_gib"] * 2**30 for p in out["probes"]], dtype=torch.float64)
    times = torch.tensor([p["s"] for p in out["probes"]], dtype=torch.float64)
    slope = float(((Ls - Ls.mean()) * (peaks - peaks.mean())).sum() / ((Ls - Ls.mean()) ** 2).sum())
    intercept = float(peaks.mean() - slope * Ls.mean())
    limits = {"gpu": (cap - intercept) / slope}
    offload = getattr(model, "velotune_offload_stats", None) is not None
    if offload:   # every decoder layer's input waits in pinned host memory
        per_token = config.num_hidden_layers * config.hidden_size * torch.finfo(dtype).bits // 8
        limits["host"] = (_host_available_bytes() * args.host_share - 16 * 2**30) / per_token
    V = torch.stack([torch.ones_like(Ls), Ls, Ls ** 2][:len(Ls)], 1)
    coef = torch.linalg.lstsq(V, times[:, None]).solution[:, 0].tolist()

    def predicted_s(L):
        return sum(c * L ** i for i, c in enumerate(coef))

    bound = min(limits, key=limits.get)
    L = int(min(limits.values()) * 0.95) // 1024 * 1024   # allocator fragmentation near a full card
    out.update(bytes_per_token=slope, intercept_gib=intercept / 2**30, limits={k: int(v) for k, v in limits.items()},
               bound_by=bound, time_boxed=False)
    print(f"  [{args.impl}] fit: {slope / 1024:.1f} KiB/token + {intercept / 2**30:.2f} GiB; limits "
          + ", ".join(f"{k} {int(v)}" for k, v in limits.items()) + f" tokens -> try {L}", flush=True)
    for attempt in range(4):
        left = deadline - time.time() - 30
        while L > out["probes"][-1]["seq"] and predicted_s(L) > left:
            L = int(L * 0.9) // 1024 * 1024
            out["time_boxed"] = True
        if L <= out["probes"][-1]["seq"]:
            break
        print(f"  [{args.impl}] verify {L}: predicted {predicted_s(L):.0f} s", flush=True)
        try:
            r = one_step(L)
        except torch.OutOfMemoryError:
            out["verify"].append({"seq": L, "oom": True})
            print(f"  [{args.impl}] verify {L}: OOM", flush=True)
            _free_cached()
            L = int(L * 0.96) // 1024 * 1024
            continue
        out["verify"].append(r)
        out["max_seq"], out["tokens_per_s"], out["peak_gib"] = L, r["tokens_per_s"], r["peak_gib"]
        print(f"  [{args.impl}] verify {L}: ok, {r['s']:.0f} s, {r['tokens_per_s']:.0f} tok/s, "
              f"peak {r['peak_gib']:.2f} GiB", flush=True)
        break
    return out


def run_max_context(args, common: list[str]) -> list[dict]:
    """Each contender in its own process. --gpus N: N lanes side by side (one GPU each), filled
    round-robin or as --lanes says; every lane ends within --time-box of the start."""
    import threading

    if args.lanes:
        queues = [lane.split(",") for lane in args.lanes]
    else:
        queues = [args.ctx_impls[i::args.gpus] for i in range(args.gpus)]
    order = [impl for q in queues for impl in q]
    results: list[dict] = []
    lane_deadline = time.time() + args.time_box

    def lane(gpu: int, impls: list[str]):
        for impl in impls:
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)} if len(queues) > 1 else None
            stock = impl.startswith("stock")   # stock runs out of memory ~10x sooner: shorter probes
            probes = [max(256, p // 4) for p in args.ctx_probes] if stock else args.ctx_probes
            left = lane_deadline - time.time()
            box = min(left, args.stock_time_box) if stock else left
            if box < 60:
                print(f"[gpu{gpu}] {impl}: skipped, lane time box spent", flush=True)
                continue
            argv = [sys.executable, __file__, "--worker", impl, "--ctx-worker", *common,
                    "--time-box", str(box), "--ctx-probes", *map(str, probes)]
            if args.card_gib:
                argv += ["--card-gib", str(args.card_gib)]
            # side-by-side workers share the host RAM (--host-share: when other jobs use the machine too)
            argv += ["--host-share", str(args.host_share or 1.0 / len(queues))]
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    results.append(json.loads(line[len("RESULT "):]))
                    if args.json:   # partial results survive a cut-off run
                        args.json.with_suffix(".partial.json").write_text(json.dumps(results, indent=1))
                elif "warn" not in line.lower():
                    print(f"[gpu{gpu}] {line}", end="", flush=True)
            proc.wait()

    threads = [threading.Thread(target=lane, args=(g, q)) for g, q in enumerate(queues)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results, key=lambda r: order.index(r["impl"]))


# ------------------------------------------------------------------ orchestration
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", nargs="+", default=list(IMPLS[:4]), choices=IMPLS)
    ap.add_argument("--shape", default="8b", choices=[*SHAPES, "smoke"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dequant", action="store_true", help="NF4 dequant bit-exactness and timing (8B shapes)")
    ap.add_argument("--no-throughput", action="store_true", help="skip the throughput table")
    ap.add_argument("--max-context", action="store_true", help="max trainable seq (batch 1) per contender")
    ap.add_argument("--ctx-impls", nargs="+", default=list(IMPLS[:4]), choices=IMPLS)
    ap.add_argument("--ctx-probes", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--card-gib", type=float, default=0.0, help="cap the allocator at this many GiB (0: whole card)")
    ap.add_argument("--gpus", type=int, default=1, help="max-context contenders run side by side, one GPU each")
    ap.add_argument("--lanes", nargs="+", help="max-context lanes, e.g. velotune-qlora stock-qlora,velotune-lora")
    ap.add_argument("--host-share", type=float, default=0.0, help=argparse.SUPPRESS)  # of host RAM, per worker
    ap.add_argument("--time-box", type=float, default=480.0, help="seconds per max-context contender")
    ap.add_argument("--stock-time-box", type=float, default=120.0, help="seconds per stock max-context contender")
    ap.add_argument("--pool-trace", action="store_true",
                    help="graphed contenders: record the capturing warm-up; the graph pool's live peak and its composition")
    ap.add_argument("--profile", action="store_true", help="per-category GPU ms/step (3 profiled steps)")
    ap.add_argument("--mem-trace", action="store_true", help="record one step's allocations; list what is alive at the peak")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny config on CPU through every code path")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the contenders this many times, interleaved; report each one's median run")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="velotune: get_peft_model(..., cuda_graphs=True), decoder layers replayed as CUDA graphs")
    ap.add_argument("--dequant-kernel", default="", choices=["", "rows", "bytes"],
                    help="NF4 dequantisation layout of the training path (quant/dequant_kernel.DEFAULT_KERNEL)")
    ap.add_argument("--recompute", default="layer", choices=["layer", "mlp"],
                    help="velotune: get_peft_model(..., recompute=...): 'mlp' offloads the attention activations "
                         "too and recomputes only the MLP")
    ap.add_argument("--unfused-lora-backward", action="store_true",
                    help="velotune: the fused rank-r MLP backward kernels off (kernels/glu.FUSED_LORA)")
    ap.add_argument("--mlp-chunks", type=int, default=0,
                    help="velotune, recompute='mlp': get_peft_model(mlp_row_blocks=...), the MLP's row blocks (0: its default, 1)")
    ap.add_argument("--sdpa-backend", choices=["default", "flash", "cudnn", "efficient", "math"], default="default",
                    help="every step under torch.nn.attention.sdpa_kernel([this backend]) (A/B of the attention "
                         "kernels' speed and workspace memory)")
    ap.add_argument("--offload-optimizer", action="store_true",
                    help="velotune: OffloadedAdamW (memory/offload_adamw.py: AdamW moments in pinned host memory, "
                         "the same bits) instead of torch's fused AdamW")
    ap.add_argument("--optimizer-in-backward", action="store_true",
                    help="velotune, with --offload-optimizer: OffloadedAdamW(update_in_backward=True), each chunk of "
                         "adapters updated in backward once its gradients are final (no clipping or accumulation here)")
    ap.add_argument("--checkpointed-mlp", action="store_true",
                    help="velotune, recompute='mlp': torch's checkpoint around lora_mlp instead of "
                         "lora/recomputed_mlp.py (models/mlp.RECOMPUTED_MLP = False)")
    ap.add_argument("--ce-budget-mib", type=float, default=0.0,
                    help="velotune: logits bytes per fused-CE chunk (models/loss.CE_MEMORY_BUDGET; 0: its default)")
    ap.add_argument("--offload-embedding", action="store_true",
                    help="velotune contenders keep the frozen input embeddings in host memory")
    ap.add_argument("--host-gather-embedding", action="store_true",
                    help="with --offload-embedding: gather the rows on the host (one sync per step) instead of "
                         "on the GPU from the pinned table (memory/embedding_offload.GATHER_ON_GPU = False)")
    ap.add_argument("--saved-sets", type=int, default=0,
                    help="graphed recompute='mlp': device sets of saved tensors (memory/layer_graphs.SAVED_SETS; 0: default)")
    ap.add_argument("--cublas-workspace", default=None,
                    help="CUBLAS_WORKSPACE_CONFIG for every contender (e.g. ':0:0': no workspace, so cuBLAS "
                         "puts no memset in front of its GEMMs; inside CUDA graphs each cost ~10 us of idle)")
    ap.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "?"))
    ap.add_argument("--json", type=Path, help="also write all results to this file")
    ap.add_argument("--worker", metavar="IMPL", help=argparse.SUPPRESS)
    ap.add_argument("--ctx-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.cpu_smoke:
        args.device, args.shape, args.dtype = "cpu", "smoke", "fp32"
        args.steps, args.warmup, args.batch, args.seq = 2, 1, 2, 32
        args.dequant = args.max_context = True
        args.ctx_probes, args.time_box = [32, 64], 240.0
    if args.cublas_workspace is not None:
        # read by PyTorch when it makes its first cuBLAS handle: before any GEMM of this process
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = args.cublas_workspace
    if args.worker:
        args.impl = args.worker
        print("RESULT " + json.dumps(context_worker(args) if args.ctx_worker else worker(args)), flush=True)
        return 0

    cuda = args.device.startswith("cuda")
    card = torch.cuda.get_device_name() if cuda else "cpu"
    date = time.strftime("%Y-%m-%d", time.gmtime())
    results: dict = {"card": card, "date": date, "commit": args.commit, "shape": args.shape}
    print(f"{card}  {date}  commit {args.commit}  shape {args.shape}", flush=True)
    if args.dequant:
        rows = dequant_bench(args.device)
        results["dequant"] = rows
        print_dequant(rows)
    common = ["--shape", args.shape, "--device", args.device, "--dtype", args.dtype] + (
        ["--offload-embedding"] if args.offload_embedding else []) + (["--cuda-graphs"] if args.cuda_graphs else []) + (
        ["--recompute", args.recompute]) + (
        ["--dequant-kernel", args.dequant_kernel] if args.dequant_kernel else []) + (
        ["--unfused-lora-backward"] if args.unfused_lora_backward else []) + (
        ["--ce-budget-mib", str(args.ce_budget_mib)] if args.ce_budget_mib else []) + (
        ["--mlp-chunks", str(args.mlp_chunks)] if args.mlp_chunks else []) + (
        ["--checkpointed-mlp"] if args.checkpointed_mlp else []) + (
        ["--sdpa-backend", args.sdpa_backend] if args.sdpa_backend != "default" else []) + (
        ["--host-gather-embedding"] if args.host_gather_embedding else []) + (
        ["--saved-sets", str(args.saved_sets)] if args.saved_sets else []) + (
        ["--offload-optimizer"] if args.offload_optimizer else []) + (
        ["--optimizer-in-backward"] if args.optimizer_in_backward else []) + (
        ["--cublas-workspace", args.cublas_workspace] if args.cublas_workspace is not None else [])
    if not args.no_throughput:
        res, rounds = {}, {}
        # --rounds N: the contenders run interleaved (A B C A B C ...), each in a fresh process; the
        # reported run per contender is the one with the median tokens/s, all values are kept
        order = [impl for _ in range(args.rounds) for impl in args.impls]
        for n, impl in enumerate(order):
            r = _run_worker(["--worker", impl, *common, "--steps", str(args.steps), "--warmup", str(args.warmup),
                             "--batch", str(args.batch), "--seq", str(args.seq)]
                            + (["--mem-trace"] if args.mem_trace else []) + (["--pool-trace"] if args.pool_trace else []) + (["--profile"] if args.profile else []))
            if r is None or r.get("oom"):
                print(f"{impl}: {'OOM' if r else 'failed'}", flush=True)
                continue
            rounds.setdefault(impl, []).append(r)
            if n < len(order) - len(args.impls):
                print(f"  {impl} round {len(rounds[impl])}: {r['tokens_per_s']:.0f} tok/s", flush=True)
                continue
            runs = sorted(rounds[impl], key=lambda x: x["tokens_per_s"])
            r = runs[(len(runs) - 1) // 2]
            r["tokens_per_s_rounds"] = [x["tokens_per_s"] for x in rounds[impl]]
            res[impl] = r
            if r.get("profile"):
                pr = r["profile"]
                print(f"  profile {impl}: GPU {pr['gpu_ms_per_step']:.1f} ms/step (profiled wall "
                      f"{pr['wall_ms_per_step']:.1f}): " + ", ".join(
                          f"{k} {v:.1f}" for k, v in sorted(pr["categories"].items(), key=lambda kv: -kv[1])), flush=True)
                print("\n".join(f"    {ms:7.2f} ms  {name}" for ms, name in pr["top_kernels"]), flush=True)
            if r.get("pool_trace"):
                pt = r["pool_trace"]
                print(f"  graph pool, {impl}: {pt['pool_gib']:.3f} GiB in segments {pt['segments_mib']} MiB; live peak "
                      f"{pt['peak_gib']:.3f} GiB at event {pt['peak_event']}/{pt['events']}:\n" + "\n".join(
                          f"    {x['gib']:7.3f} GiB  {x['site']}" for x in pt["sites"])
                      + f"\n    up to the peak (MiB): {pt['before_peak_mib']}", flush=True)
                for seg, allocs in pt.get("first_allocs", {}).items():
                    print(f"    segment {seg}, first allocations:\n" + "\n".join(f"      {a}" for a in allocs))
            if r.get("mem_trace"):
                mt = r["mem_trace"]
                print(f"  memory at the peak, {impl}: " + (mt["error"] if "error" in mt else
                      f"{mt['before_gib']:.2f} GiB before the step ({', '.join(mt['before'])}) + "
                      f"{mt['step_peak_gib']:.2f} GiB:\n" + "\n".join(
                          f"    {x['gib']:7.3f} GiB  {x['site']}" for x in mt["sites"])), flush=True)
            peak = f"{r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "-"
            print(f"{impl:<15} {r['tokens_per_s']:>9.0f} tok/s {r['ms_per_step']:>8.1f} ms/step  peak {peak}  "
                  f"first loss {r['first_loss']:.5f}  last {r['last_loss']:.5f}  (build {r['build_s']:.0f} s)"
                  + ("  [embeddings in host memory]" if r.get("embeddings_offloaded") else "")
                  + (f"  [layer graphs {r['layer_graphs']}]" if r.get("layer_graphs") else "")
                  + (f"  [median of {len(runs)}: " + " ".join(f"{t:.0f}" for t in r["tokens_per_s_rounds"]) + "]"
                     if len(runs) > 1 else ""), flush=True)
        results["throughput"] = res
        rows = []
        pairs = [("velotune-qlora", "stock-qlora"), ("velotune-qlora", "velotune-lora"),
                 ("velotune-qlora-mlp", "stock-qlora"), ("velotune-qlora-mlp", "velotune-lora-mlp"),
                 ("velotune-qlora-mlp", "velotune-qlora"), ("velotune-lora-mlp", "velotune-lora")]
        for mode in ("", "-mlp"):       # each graphed contender against stock, its bf16 twin and its eager self
            q, lo = f"velotune-qlora{mode}-graphs", f"velotune-lora{mode}-graphs"
            pairs += [(q, "stock-qlora"), (q, lo), (q, f"velotune-qlora{mode}"), (lo, f"velotune-lora{mode}")]
        for name, base in pairs:
            v, s = res.get(name), res.get(base)
            if v and s:
                mem = v["peak_gib"] / s["peak_gib"] if v["peak_gib"] and s["peak_gib"] else float("nan")
                print(f"{name} / {base}: {v['tokens_per_s'] / s['tokens_per_s']:.3f}x tokens/s, "
                      f"{mem:.3f}x peak memory", flush=True)
                if v["peak_gib"]:
                    rows.append(f"| {card} | {date} | {args.commit} | {args.shape} {name} {args.batch}x{args.seq} vs "
                                f"{base} | {s['tokens_per_s']:.0f} | {v['tokens_per_s']:.0f} | "
                                f"{v['tokens_per_s'] / s['tokens_per_s']:.2f}x | {s['peak_gib']:.2f} | "
                                f"{v['peak_gib']:.2f} | {mem:.2f}x |")
        if rows:
            print("\nBENCHMARKS.md rows:\n" + "\n".join(rows), flush=True)
    if args.max_context:
        ctx = run_max_context(args, common)
        results["max_context"] = ctx
        print("\nmax context (batch 1" + (f", allocator capped at {args.card_gib:g} GiB" if args.card_gib else "") + "):")
        for c in ctx:
            if "max_seq" in c:
                print(f"  {c['impl']:<15} {c['max_seq']:>8} tokens trained, {c['tokens_per_s']:.0f} tok/s, peak "
                      f"{c['peak_gib']:.1f} GiB; bound by {c['bound_by']}{' (time-boxed)' if c['time_boxed'] else ''}; "
                      f"fit {c['bytes_per_token'] / 1024:.1f} KiB/token")
            else:
                print(f"  {c['impl']:<15} not verified: {json.dumps({k: c.get(k) for k in ('limits', 'verify')})}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
