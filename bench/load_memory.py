"""Peak host RAM and device memory while a checkpoint loads, against the bounds of issue 25:

    host:   anonymous RSS above the process's start never exceeds 1.5 x the largest safetensors
            shard beyond what the loaded model itself holds in host memory (CPU loads);
    device: torch.cuda.max_memory_allocated during the load stays under the loaded model
            (memory_allocated after it) plus one decoder layer in the compute dtype.

    python bench/load_memory.py DIR --load-in-4bit [--device cuda] [--cap-gib 16] [--json out.json]
    python bench/load_memory.py DIR --control      # reads every shard into memory first: must break the host bound

What loads: `FastLanguageModel.from_pretrained(DIR, load_in_4bit=..., memory_cap=...)` (velotune's
path), or with --stock `AutoModelForCausalLM.from_pretrained` (bitsandbytes' config when 4-bit).
transformers (5.x) streams the checkpoint tensor by tensor from memory-mapped safetensors files,
materialising each on its target device and, when quantising on the fly, quantising it there before
the next (no thread pool in that case); pre-quantised 4-bit tensors go straight to the device. The
mapped file pages are page cache (reclaimable, shared), not the process's own memory: the host
figure is anonymous memory, sampled every millisecond in a thread, with glibc told to serve every
allocation over 64 KiB by mmap so that freed tensors leave the RSS at once (MALLOC_MMAP_THRESHOLD_,
set by re-executing the script).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class AnonPeak:
    """Context manager: the peak of anonymous RSS (sampled) above its value at entry."""

    def __init__(self, every_s: float = 0.001):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _anon_bytes())
            time.sleep(self.every_s)

    def __enter__(self):
        self.base = self.peak = _anon_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.end = _anon_bytes()
        self.peak = max(self.peak, self.end)

    @property
    def peak_delta(self) -> int:
        return self.peak - self.base

    @property
    def end_delta(self) -> int:
        return self.end - self.base


def checkpoint_facts(folder: Path) -> dict:
    """Largest shard (bytes on disk) and one decoder layer's size in 16-bit (from the headers)."""
    shards = sorted(folder.glob("*.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    h, i = text["hidden_size"], text["intermediate_size"]
    nh, nkv = text["num_attention_heads"], text.get("num_key_value_heads", text["num_attention_heads"])
    d = text.get("head_dim") or h // nh
    layer0 = 2 * (h * nh * d * 2 + 2 * h * nkv * d + 3 * h * i + 2 * h)  # q, o, k, v, gate, up, down, norms
    return {
        "shards": len(shards),
        "largest_shard": max(p.stat().st_size for p in shards),
        "total_bytes": sum(p.stat().st_size for p in shards),
        "layer_bytes_16bit": layer0,
    }


def measure(folder: Path, load_in_4bit: bool, device: str, stock: bool, control: bool, cap_gib: float) -> dict:
    import torch

    import transformers  # noqa: F401  (imports before the baseline: their memory is not the load's)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from velotune import FastLanguageModel
    from velotune.quant import quantize_nf4

    if load_in_4bit:
        import bitsandbytes  # noqa: F401
    facts = checkpoint_facts(folder)
    cuda = device.startswith("cuda")
    if cuda and cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before_dev = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with AnonPeak() as host:
        if control:  # the unbounded way: every shard read into memory, then each matrix quantised
            state = {}
            for p in sorted(folder.glob("*.safetensors")):
                state.update({k: v.clone() for k, v in load_file(str(p)).items()})
            model = {k: quantize_nf4(v) if v.dim() == 2 else v for k, v in state.items()}
            del state
        elif stock:
            kw = {"dtype": torch.bfloat16}
            if cuda:
                kw["device_map"] = {"": 0}
            if load_in_4bit and "quantization_config" not in json.loads((folder / "config.json").read_text()):
                kw["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16,
                )
            model = AutoModelForCausalLM.from_pretrained(folder, **kw)
        else:
            model, _ = FastLanguageModel.from_pretrained(
                folder, dtype=torch.bfloat16, load_in_4bit=load_in_4bit, memory_cap=f"{cap_gib}GiB" if cap_gib else None
            )
    seconds = time.perf_counter() - t0
    out = {
        **facts,
        "load_s": seconds,
        "host_peak": host.peak_delta,
        "host_end": host.end_delta,
        "host_bound": int(1.5 * facts["largest_shard"]),
    }
    # On CPU the loaded model lives in host memory: what the load adds beyond it must stay bounded.
    out["host_transient"] = host.peak_delta - (host.end_delta if not cuda else 0)
    out["host_ok"] = out["host_transient"] <= out["host_bound"]
    if cuda:
        torch.cuda.synchronize()
        end = torch.cuda.memory_allocated() - before_dev
        out.update(
            device_peak=torch.cuda.max_memory_allocated() - before_dev,
            device_end=end,
            device_bound=end + facts["layer_bytes_16bit"],
        )
        out["device_ok"] = out["device_peak"] <= out["device_bound"]
    del model
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--load-in-4bit", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--stock", action="store_true", help="stock AutoModelForCausalLM.from_pretrained")
    ap.add_argument("--control", action="store_true", help="read all shards into memory (must break the bound)")
    ap.add_argument("--cap-gib", type=float, default=0.0, help="cap the CUDA allocator / velotune's memory_cap")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_ENV["MALLOC_MMAP_THRESHOLD_"]:
        return subprocess.call([sys.executable, *sys.argv], env={**os.environ, **MMAP_ENV})
    out = measure(args.folder, args.load_in_4bit, args.device, args.stock, args.control, args.cap_gib)
    line = " ".join(
        f"{k}={v / 2**20:.1f}MiB" if type(v) is int and k != "shards" else f"{k}={v}" for k, v in out.items()
    )
    print(line, flush=True)
    print("RESULT " + json.dumps(out), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
