"""Random-weight test checkpoints at real model shapes, written layer by layer, without ever holding
the model: pre-quantised bitsandbytes NF4 (what `...-bnb-4bit` repositories hold) or 16-bit.

    python bench/make_checkpoint.py --shape 70b --out /tmp/ckpt/70b-bnb-4bit          # ~37 GiB on disk
    python bench/make_checkpoint.py --shape 12b --format bf16 --out /tmp/ckpt/12b-bf16  # ~23 GiB on disk
    python bench/make_checkpoint.py --shape tiny-llama --out DIR --device cpu           # tests

Shapes: bench/common.py's SHAPES, e.g. 70b (Llama-3.1-70B), 34b (CodeLlama-34B), 27b (Gemma-2-27B), 12b
(Mistral-Nemo-12B), 8b (Llama-3.1-8B), and tiny-llama / tiny-gemma2 for CPU tests. The folder holds
config.json (with the `quantization_config` transformers writes for a bitsandbytes 4-bit model),
sharded safetensors with an index, and a small byte-level BPE tokenizer (its vocabulary is smaller than the model's: the
benchmarks feed random token ids). Both `FastLanguageModel.from_pretrained(folder, load_in_4bit=True)`
and stock `AutoModelForCausalLM.from_pretrained(folder)` (transformers + bitsandbytes) load it.

What is written, per parameter of the model transformers builds from the config (on the meta
device: the real names and shapes of the family), in the model's own order:
  * every `nn.Linear` weight but the output embedding (what transformers' bitsandbytes loader
    quantises): N(0, 0.02^2) drawn on --device, rounded to bf16, quantised by velotune's NF4
    (`quant/nf4.quantize_nf4`, bit-identical to bitsandbytes' quantize_4bit, double quantisation,
    blocks of 64), stored as bitsandbytes serialises a `Params4bit`: `weight` (packed uint8
    [n/2, 1]), `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`,
    `weight.nested_quant_map` and `weight.quant_state.bitsandbytes__nf4` (its JSON, as uint8);
  * embeddings N(0, 0.02^2) in bf16, norms ones (Gemma's zero-centred norms: zeros), biases zeros.
Host memory: one shard (--shard-gib) plus one tensor's quantisation; the device holds one tensor's.
Shards are written to a temporary name and renamed; the index last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (the shapes; puts src/ on sys.path)

STD = 0.02


def make_config(shape: str):
    """bench/common.py's config of `shape`, as a checkpoint's config.json states it (pad id, KV cache on)."""
    cfg = common.config(shape)
    cfg.pad_token_id, cfg.use_cache = 0, True
    return cfg


def quantization_config() -> dict:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.uint8,
    ).to_dict()


def nf4_tensors(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """`name` (a linear's weight) quantised and laid out as bitsandbytes saves a Params4bit (CPU)."""
    from velotune.quant.nf4 import nf4_code, quantize_nf4

    q = quantize_nf4(w, blocksize=64, double_quant=True)
    state = {
        "quant_type": "nf4",
        "blocksize": q.blocksize,
        "dtype": str(q.dtype).removeprefix("torch."),
        "shape": list(q.shape),
        "nested_blocksize": q.blocksize2,
        "nested_dtype": "float32",
        "nested_offset": q.offset.item(),
    }
    packed_state = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return {
        name: q.packed.reshape(-1, 1).cpu(),
        f"{name}.absmax": q.absmax.cpu(),
        f"{name}.nested_absmax": q.absmax2.cpu(),
        f"{name}.nested_quant_map": q.code2.cpu(),
        f"{name}.quant_map": nf4_code("cpu").clone(),
        f"{name}.quant_state.bitsandbytes__nf4": packed_state,
    }


def _tokenizer():
    """A byte-level BPE (512 tokens) with <pad>/<s>/</s> at ids 0/1/2, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog. 0123456789"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


class ShardWriter:
    """Tensors in, safetensors shards of at most `max_bytes` out (atomically), then the index."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.update(tensors)
        self.pending_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"model-{len(self.files) + 1:05d}.safetensors"
        tmp = self.out / (name + ".tmp")
        save_file({k: v.contiguous() for k, v in self.pending.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.out / name)
        self.files.append((name, list(self.pending)))
        self.total += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, (name, keys) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / name, self.out / final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        tmp = self.out / "model.safetensors.index.json.tmp"
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.out / "model.safetensors.index.json")


def make_checkpoint(
    shape: str, out: Path, fmt: str = "nf4", device: str = "cpu", shard_gib: float = 4.0, seed: int = 0, log=print
) -> dict:
    """Write the checkpoint; returns {"bytes": on disk, "seconds": ..., "tensors": n}."""
    from transformers import AutoModelForCausalLM

    if fmt not in ("nf4", "bf16"):
        raise ValueError(f"format {fmt!r}: nf4 or bf16")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    config = make_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out_emb = model.get_output_embeddings()
    quantised = (
        {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not out_emb}
        if fmt == "nf4"
        else set()
    )
    zero_centred_norms = config.model_type.startswith("gemma")
    writer = ShardWriter(out, int(shard_gib * 2**30))
    gen = torch.Generator(device=device)
    n, seen = 0, set()
    for i, (name, p) in enumerate(model.state_dict(keep_vars=True).items()):
        if "rotary_emb" in name or id(p) in seen:  # tied embeddings: written once
            continue
        seen.add(id(p))
        gen.manual_seed(seed * 1_000_003 + i)
        if "norm" in name.rsplit(".", 2)[-2]:
            t = (torch.zeros if zero_centred_norms else torch.ones)(p.shape, dtype=torch.bfloat16)
        elif name.endswith(".bias"):
            t = torch.zeros(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, device=device, generator=gen) * STD).to(torch.bfloat16)
        if name in quantised:
            writer.add(nf4_tensors(name, t))
        else:
            writer.add({name: t.cpu()})
        del t
        n += 1
        if name.endswith("down_proj.weight"):
            log(f"  {name}: {writer.total / 2**30:.1f} GiB written, {time.perf_counter() - t0:.0f} s")
    writer.close()
    if fmt == "nf4":
        config.quantization_config = quantization_config()
    config.save_pretrained(out)
    _tokenizer().save_pretrained(out)
    return {"bytes": writer.total, "seconds": time.perf_counter() - t0, "tensors": n, "shards": len(writer.files)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=list(common.SHAPES))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--format", default="nf4", choices=["nf4", "bf16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shard-gib", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    r = make_checkpoint(args.shape, args.out, args.format, args.device, args.shard_gib, args.seed)
    print(
        f"{args.shape} ({args.format}) -> {args.out}: {r['bytes'] / 2**30:.2f} GiB in {r['shards']} shards, "
        f"{r['tensors']} tensors, {r['seconds']:.0f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
