"""`velotune export RUN_DIR`: adapters, merged safetensors, GGUF + Ollama Modelfile from a training output.

RUN_DIR is an adapter folder (adapter_config.json, whose base_model_name_or_path names the base
model), a training output folder holding one (the final adapter, else the latest checkpoint-N), or
a full model folder (full fine-tuning). Outputs go to OUT/<format>/ (default OUT = RUN_DIR/export).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from velotune.errors import ConfigError, ModelLoadError

FORMATS = ("lora", "merged_16bit", "merged_4bit", "gguf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from velotune.argtypes import byte_size
    from velotune.export.gguf_export import methods_help

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "formats:\n  lora          adapters only (PEFT format)\n"
        "  merged_16bit  LoRA merged into the base (fp32 math), safetensors for transformers/vLLM\n"
        "  merged_4bit   merged, re-quantised to bitsandbytes NF4\n"
        "  gguf          llama.cpp / Ollama file(s) + Modelfile\n\n"
        "GGUF quantization methods (--quant):\n"
        + methods_help()
        + "\n\nexample:\n  velotune export outputs/run1 --to merged_16bit gguf --quant q8_0 q4_k_m"
    )
    parser.add_argument("run_dir", help="training output: adapter folder, folder containing one, or full model folder")
    parser.add_argument(
        "--to",
        nargs="+",
        default=["gguf"],
        choices=FORMATS,
        metavar="FORMAT",
        help=f"what to write (default gguf): {', '.join(FORMATS)}",
    )
    parser.add_argument(
        "-q",
        "--quant",
        nargs="+",
        default=["q8_0"],
        metavar="METHOD",
        help="GGUF quantization method(s) (default q8_0; list below)",
    )
    parser.add_argument("-o", "--out", default=None, help="output folder (default RUN_DIR/export)")
    parser.add_argument("--base", default=None, help="base model folder or hub id (default: from adapter_config.json)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="dtype of merged weights (default: the base model's stored dtype)",
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        type=byte_size,
        help="safetensors shard size: bytes, or a number with KB/MB/GB/KiB/MiB/GiB (default 5GB)",
    )
    parser.add_argument(
        "--push-to-hub",
        default=None,
        metavar="OWNER/REPO",
        help="also upload each output to this hub repo (needs a token)",
    )
    parser.add_argument("--token", default=None, help="hugging face token for --push-to-hub")


def find_model_dir(run_dir: Path) -> tuple[Path, str]:
    """-> (folder, "adapter" | "full") for a training output folder."""
    if not run_dir.is_dir():
        raise ModelLoadError(f"{run_dir} is not a folder")
    if (run_dir / "adapter_config.json").is_file():
        return run_dir, "adapter"
    if (run_dir / "config.json").is_file():
        return run_dir, "full"
    candidates = [p.parent for p in run_dir.glob("*/adapter_config.json")]
    if not candidates:
        raise ModelLoadError(
            f"{run_dir} has no adapter_config.json or config.json (nor a subfolder with one): "
            "point to the training output folder"
        )
    finals = [c for c in candidates if not c.name.startswith("checkpoint-")]
    if len(finals) == 1:
        return finals[0], "adapter"
    if finals:
        raise ModelLoadError(
            f"{run_dir} holds several adapters ({', '.join(sorted(c.name for c in finals))}): pass one of them"
        )
    step = lambda p: int(m.group(1)) if (m := re.search(r"checkpoint-(\d+)$", p.name)) else -1  # noqa: E731
    return max(candidates, key=step), "adapter"


def _stored_dtype(model_dir: str) -> str | None:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    return cfg.get("dtype") or cfg.get("torch_dtype")


def load_for_export(run_dir: Path, base: str | None = None):
    """-> (model with adapters attached, or the full model; tokenizer; description; stored dtype name).

    Stock transformers/PEFT objects, loaded in the dtype the weights are stored in (merging upcasts
    each tensor to float32 on its own, so nothing is lost and an 8B model needs 16 GB, not 32)."""
    from transformers import AutoTokenizer

    from velotune.loader import FastLanguageModel

    folder, kind = find_model_dir(run_dir)
    if kind == "full":
        stored = _stored_dtype(str(folder))
        model, tok = FastLanguageModel.from_pretrained(folder, dtype=_torch_dtype(stored), fast=False)
        return model, tok, f"full model {folder}", stored
    from velotune.model_folder import check_adapter_folder

    adapter_cfg = check_adapter_folder(folder)
    base = base or adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{folder}/adapter_config.json names no base model: pass --base")
    from peft import PeftModel

    stored = _stored_dtype(base)
    model, tok = FastLanguageModel.from_pretrained(base, dtype=_torch_dtype(stored), fast=False)
    if (folder / "tokenizer_config.json").is_file():  # the training run's tokenizer (chat template, added tokens)
        from velotune.data.chat_templates import ensure_template_tokens

        tok = AutoTokenizer.from_pretrained(folder)
        ensure_template_tokens(tok, model)  # tokens the run added: the adapter holds their embedding rows
    from velotune.log import quiet_deprecations

    with quiet_deprecations():  # PEFT reads transformers' renamed checkpointing attributes
        model = PeftModel.from_pretrained(model, folder)
    from velotune.export import attach_export_methods

    attach_export_methods(model)
    return model, tok, f"adapter {folder} on base {base}", stored


def check_output_folder(out: Path, what: str) -> None:
    """Refuse, before any model loads, an output path that is a file or a folder that cannot be written."""
    from velotune.fsio import check_writable_folder

    for p in [out, *out.parents]:
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{what}: {p} is a file, not a folder; pass -o with a folder path")
            break
    check_writable_folder(out, what)


def _torch_dtype(name: str | None):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name or "", torch.float32)


def run(args) -> int:
    from velotune.export.gguf_export import normalise_method

    run_dir = Path(args.run_dir).expanduser()
    quants = [normalise_method(q) for q in args.quant]
    out = Path(args.out).expanduser() if args.out else run_dir / "export"
    check_output_folder(out, "-o/--out" if args.out else "the default output folder RUN_DIR/export")
    if args.push_to_hub:
        from velotune.export.hub import check_repo_id

        check_repo_id(args.push_to_hub)
    model, tok, what, stored = load_for_export(run_dir, args.base)
    dtype = args.dtype or (stored if stored in ("float32", "float16", "bfloat16") else "float16")
    print(f"velotune export: {what}")
    written: list[tuple[str, Path]] = []
    for fmt in args.to:
        if fmt == "gguf":
            for p in model.save_pretrained_gguf(out / "gguf", tok, quants):
                written.append((f"gguf {p.name}", p))
            written.append(("ollama Modelfile", out / "gguf" / "Modelfile"))
        else:
            if fmt == "lora" and not hasattr(model, "peft_config"):
                raise ConfigError(f"{run_dir} is a full model: there is no adapter to export as 'lora'")
            written.append(
                (
                    fmt,
                    model.save_pretrained_merged(out / fmt, tok, fmt, dtype=dtype, max_shard_size=args.max_shard_size),
                )
            )
    if args.push_to_hub:
        from velotune.export.hub import upload_folder

        folders = sorted({p if p.is_dir() else p.parent for _, p in written})
        for sub in folders:  # one format: the repo root; several: one subfolder each (lora/, gguf/, ...)
            plan = upload_folder(
                sub, args.push_to_hub, token=args.token, path_in_repo=sub.name if len(folders) > 1 else None
            )
            print(f"velotune export: uploaded {len(plan['files'])} files from {sub} to {plan['url']}")
    print("\nvelotune export: done")
    for label, path in written:
        print(f"  {label:<28} {path}")
    if any(label.startswith("gguf") for label, _ in written):
        print(f"\n  ollama: cd {out / 'gguf'} && ollama create my-model -f Modelfile && ollama run my-model")
    return 0
