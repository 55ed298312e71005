"""Checks before any training step, so that nothing fails after the work is done.

    report = preflight(cfg)          # raises ModelLoadError / OutputError / ConfigError, one line each

`velotune train` runs it first (run_training calls it); it reads only headers and configs:

* model folder (local): config.json readable and its model_type known, no remote code, safetensors
  headers whole (every shard the index names present), every weight the model needs stored
  (tied weights count once), tokenizer files present;
* output_dir: writable (a probe file, not the first save, finds a read-only or foreign-owned folder);
* disk: free space for the planned checkpoints (weights + optimizer state, times
  min(saves planned, save_total_limit + 1): the newest is written before the oldest is deleted)
  plus the final save, estimated from the model's shapes.

Ownership of the output folder (another run's folder refused) and the run lock are in
train/output_dir.py and train/run_lock.py; run_training applies them after this.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from velotune.errors import OutputError
from velotune.fsio import check_writable_folder, free_bytes

MARGIN = 1.2  # the estimate times this must fit (tokenizer files, trainer state, logs)


@dataclass
class PreflightReport:
    model_dir: Path | None  # the local model folder checked (None: a hub id, checked when fetched)
    trainable: int | None  # parameters the run trains (None: unknown before the hub fetch)
    total: int | None  # parameters of the model
    checkpoint_bytes: int | None  # one checkpoint, estimated
    final_bytes: int | None  # the final save, estimated
    checkpoints: int  # checkpoints kept at once
    needed_bytes: int | None
    free_bytes: int


def _local_model(name: str) -> Path | None:
    p = Path(name).expanduser()
    return p if p.exists() else None


def parameter_counts(config, cfg) -> tuple[int, int]:
    """(trainable, total) for the config's model built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if cfg.model.full_finetuning:
        return total, total
    lo = cfg.lora
    targets = lo.target_modules
    trainable = 0
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        listed = (
            (leaf in targets or _fused(leaf, targets))
            if isinstance(targets, list)
            else targets != "all-linear" and re.fullmatch(targets, name) is not None
        )  # PEFT's regex form
        if isinstance(m, torch.nn.Linear) and (targets == "all-linear" or listed):
            if targets == "all-linear" and m is model.get_output_embeddings():
                continue
            trainable += lo.r * (m.in_features + m.out_features)
        if leaf in (lo.modules_to_save or []):
            trainable += sum(p.numel() for p in m.parameters())
    return trainable, total


def _fused(leaf: str, targets: list[str]) -> bool:
    return (leaf == "qkv_proj" and bool({"q_proj", "k_proj", "v_proj"} & set(targets))) or (
        leaf == "gate_up_proj" and bool({"gate_proj", "up_proj"} & set(targets))
    )


def planned_checkpoints(cfg) -> int:
    t = cfg.training
    if not t.save_steps:
        return 0
    planned = t.max_steps // t.save_steps if t.max_steps and t.max_steps > 0 else (t.save_total_limit or 1) + 1
    # transformers writes a new checkpoint before it deletes the oldest: limit + 1 exist for a moment
    return min(planned, t.save_total_limit + 1) if t.save_total_limit else planned


def preflight(cfg, *, check_output: bool = True) -> PreflightReport:
    """Model folder, output folder and disk checks for TrainConfig `cfg` (see the module docstring)."""
    from velotune.model_folder import check_coverage, check_local_folder, load_config

    out = Path(cfg.output_dir)
    if check_output:
        check_writable_folder(out, f"output_dir {out}")
    model_dir = _local_model(cfg.model.name)
    trainable = total = ckpt = final = needed = None
    n_ckpt = planned_checkpoints(cfg)
    if model_dir is not None:
        from transformers import AutoConfig

        check_local_folder(model_dir)
        config = load_config(AutoConfig, str(model_dir), False)
        check_coverage(model_dir, config)
        trainable, total = parameter_counts(config, cfg)
        weight_bytes = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4
        # LoRA: fp32 adapter + AdamW's two fp32 moments. Full: weights in their dtype + two fp32 moments.
        saved = trainable * 4 if not cfg.model.full_finetuning else total * weight_bytes
        ckpt = saved + trainable * 8
        final = saved
        needed = int((n_ckpt * ckpt + final) * MARGIN)
    free = free_bytes(out)
    if check_output and needed is not None and needed > free:
        raise OutputError(
            f"output_dir {out}: about {_size(needed)} needed ({n_ckpt} checkpoint(s) of ~{_size(ckpt)} + the final "
            f"save of ~{_size(final)}), only {_size(free)} free there: free some space, lower "
            "training.save_total_limit, or save less often (training.save_steps)"
        )
    return PreflightReport(model_dir, trainable, total, ckpt, final, n_ckpt, needed, free)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
