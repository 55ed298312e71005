"""One training run from a TrainConfig: load -> data -> LoRA -> TRL trainer -> save -> curve + summary.

    from velotune.train.config import load_config
    from velotune.train.runner import run_training
    result = run_training(load_config("examples/sft.yaml"))
    result.adapter_path, result.losses, result.summary_path, result.png_path

The trainers are TRL's (SFTTrainer, DPOTrainer, ORPOTrainer) with velotune's glue mixed in
(train/trl_glue.py). What lands in `output_dir`:

    adapter_config.json, adapter_model.safetensors   the LoRA adapter, PEFT format (full fine-tuning:
                                                     config.json + model.safetensors)
    tokenizer files                                  with the chat template used in training
    loss_curve.png, summary.json                     the curve and the run summary
    checkpoint-N/                                    resumable checkpoints (training.save_steps)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from velotune.errors import ConfigError, ModelLoadError, OutputError, VelotuneError, describe_os_error
from velotune.train.callbacks import ProgressCallback, loss_points, summarize, write_json, write_loss_curve
from velotune.train.config import TrainConfig, check_paths
from velotune.train.trl_glue import velotune_trainer_class
from velotune.trl_compat import orpo_classes

OFFLOAD_OPTIMIZER = "adamw_offload"  # training.optimizer: memory/offload_adamw.OffloadedAdamW

log = logging.getLogger("velotune")

_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunResult:
    output_dir: Path
    adapter_path: Path  # the folder holding the adapter (or the full model) and the tokenizer
    summary_path: Path
    png_path: Path
    steps: list[int]  # logged optimizer steps
    losses: list[float]  # training loss at those steps
    summary: dict
    data_report: Any = None  # velotune.data.report.DataReport of the training file
    model: Any = field(default=None, repr=False)  # the trained model (PEFT model for LoRA)
    tokenizer: Any = field(default=None, repr=False)
    trainer: Any = field(default=None, repr=False)


def load_model(cfg: TrainConfig):
    """(model, tokenizer) through velotune.FastLanguageModel, with the config's chat template."""
    from velotune import FastLanguageModel

    m = cfg.model
    model, tokenizer = FastLanguageModel.from_pretrained(
        m.name,
        max_seq_length=m.max_seq_length,
        dtype=_DTYPES[m.dtype],
        load_in_4bit=m.load_in_4bit,
        full_finetuning=m.full_finetuning,
        fast=m.fast,
        padding_free=m.padding_free,
    )
    from velotune.data.chat_templates import ensure_template_tokens, get_chat_template

    if cfg.data.chat_template:  # the template's special tokens are added and the embeddings grow with them
        tokenizer = get_chat_template(tokenizer, chat_template=cfg.data.chat_template, model=model)
    else:
        ensure_template_tokens(tokenizer, model)  # a saved tokenizer may hold more tokens than the embeddings
    return model, tokenizer


# The lora section's settings that get_peft_model takes under the same names.
_SAME_NAMED_LORA = (
    "r",
    "target_modules",
    "bias",
    "random_state",
    "use_rslora",
    "use_dora",
    "offload_embedding",
    "recompute",
    "cuda_graphs",
    "mlp_row_blocks",
)


def add_adapters(model, cfg: TrainConfig):
    """LoRA adapters (a real peft.PeftModel), unless the config asks for full fine-tuning."""
    from velotune import FastLanguageModel
    from velotune.errors import ConfigError

    if cfg.model.full_finetuning:
        return model
    lo = cfg.lora
    try:
        return FastLanguageModel.get_peft_model(
            model,
            lora_alpha=lo.alpha,
            lora_dropout=lo.dropout,
            use_gradient_checkpointing=lo.gradient_checkpointing,
            max_seq_length=cfg.model.max_seq_length,
            modules_to_save=lo.modules_to_save or None,
            **{name: getattr(lo, name) for name in _SAME_NAMED_LORA},
        )
    except ValueError as e:  # settings this model cannot take (e.g. offload_embedding on tied tables)
        raise ConfigError(f"lora: {e}") from e


def _compute_dtype(model) -> torch.dtype:
    dtype = getattr(model, "velotune_compute_dtype", None)
    if dtype is None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        dtype = getattr(base, "velotune_compute_dtype", None) or next(base.parameters()).dtype
    return dtype


def training_arguments(cfg: TrainConfig, model, *, has_eval: bool) -> dict:
    """Keyword arguments shared by SFTConfig / DPOConfig / ORPOConfig."""
    t = cfg.training
    dtype = _compute_dtype(model)
    report_to = t.report_to if isinstance(t.report_to, list) else [t.report_to]
    report_to = [r for r in report_to if r != "none"] or "none"
    _check_loggers(report_to)
    eval_every = t.eval_steps or t.save_steps
    return dict(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps if t.warmup_steps else t.warmup_ratio,  # a float < 1 is a ratio
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim="adamw_torch" if t.optimizer == OFFLOAD_OPTIMIZER else t.optimizer,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval and eval_every else ("epoch" if has_eval else "no"),
        eval_steps=eval_every,
        report_to=report_to,
        # A model on the CPU trains on the CPU; this also makes `torchrun` on a CPU-only machine run
        # gloo DDP (accelerate only treats a multi-process CPU launch as distributed with use_cpu).
        use_cpu=t.use_cpu or next(model.parameters()).device.type == "cpu",
        # Every trainable weight (LoRA, modules_to_save, or all in full fine-tuning) takes part in each
        # forward: no extra autograd-graph traversal per step under DDP.
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        disable_tqdm=True,  # velotune's ProgressCallback draws the bar
        # Mixed precision follows the model's dtype: an explicit float32 model trains in float32 (TRL's
        # configs default to bf16=True, which would autocast a float32 model).
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Checkpointing is set up by get_peft_model (lora.gradient_checkpointing), not by the trainer.
        **_no_trainer_checkpointing(),
    )


def _no_trainer_checkpointing() -> dict:
    """The trainer's own checkpointing off, under the name this transformers uses (transformers 5.2x
    renamed `gradient_checkpointing` to `activation_checkpointing` and warns about the old name)."""
    from dataclasses import fields

    from transformers import TrainingArguments

    name = "activation_checkpointing"
    return {name if name in {f.name for f in fields(TrainingArguments)} else "gradient_checkpointing": False}


def _check_loggers(report_to) -> None:
    import importlib.util

    needs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
    for name in report_to if isinstance(report_to, list) else []:
        if not any(importlib.util.find_spec(m) for m in needs[name]):
            extra = ' (pip install "velotune[tensorboard]")' if name == "tensorboard" else " (pip install wandb)"
            raise ConfigError(f"training.report_to: {name} is not installed{extra}; or set report_to: none")


def make_trainer(cfg: TrainConfig, model, tokenizer, train_ds, eval_ds, *, callbacks: Sequence = ()):
    """The TRL trainer for cfg.method, with velotune's glue (exact token normalisation, embedding lr, tok/s)."""
    common = training_arguments(cfg, model, has_eval=eval_ds is not None)
    kwargs = dict(
        model=model,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        embedding_learning_rate=cfg.training.embedding_learning_rate,
        offload_optimizer=cfg.training.optimizer == OFFLOAD_OPTIMIZER,
    )
    if cfg.method == "sft":
        from trl import SFTConfig, SFTTrainer

        # velotune.data already tokenized, labelled (and packed) every row and reported the bad ones
        args = SFTConfig(
            **common, max_length=cfg.model.max_seq_length, packing=False, dataset_kwargs={"skip_prepare_dataset": True}
        )
        if cfg.data.packing:  # padding-free rows: position ids restart per sample, no attention mask
            from velotune.data.packing import PaddingFreeCollator

            kwargs["data_collator"] = PaddingFreeCollator()
        return velotune_trainer_class(SFTTrainer)(args=args, **kwargs)
    if cfg.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, beta=cfg.training.beta, max_length=cfg.model.max_seq_length)
        return velotune_trainer_class(DPOTrainer)(args=args, ref_model=None, **kwargs)
    ORPOConfig, ORPOTrainer = orpo_classes()
    args = ORPOConfig(**common, beta=cfg.training.beta, max_length=cfg.model.max_seq_length)
    return velotune_trainer_class(ORPOTrainer)(args=args, **kwargs)


def _resume_arg(cfg: TrainConfig):
    """The checkpoint to resume from: the newest complete one in output_dir (torn ones after it are
    removed with a line saying so; train/resume.py), or the folder the config names."""
    from velotune.train.resume import newest_complete, remove_torn, why_incomplete

    resume = cfg.training.resume_from_checkpoint
    if resume is True:
        out = Path(cfg.output_dir)
        last, torn = newest_complete(out)
        remove_torn(torn, last)
        if last is None:
            raise ConfigError(
                f"training.resume_from_checkpoint: no complete checkpoint-N folder in {out} to resume "
                "from (checkpoints are written every training.save_steps steps)"
            )
        return str(last)
    if resume:
        why = why_incomplete(Path(resume))
        if why is not None:
            raise ConfigError(
                f"training.resume_from_checkpoint: {resume} is not a complete checkpoint ({why}); "
                "pass another one, or --resume alone for the newest complete one"
            )
    return resume or None


def save_final(model, tokenizer, output_dir: Path, extra: Callable[[Path], None] | None = None) -> Path:
    """Adapter (or full model) + tokenizer (+ whatever `extra(folder)` writes: curve, summary) into
    output_dir, committed as a whole (train/output_dir.commit_final): a kill or a full disk inside the
    save leaves output_dir as it was before it, never the new config beside the old weights."""
    from velotune.train.output_dir import commit_final

    def write(stage: Path) -> None:
        if hasattr(model, "peft_config"):
            # Only the trained adapter (TRL's DPO may hold a frozen "ref" copy next to it).
            model.save_pretrained(stage, safe_serialization=True, selected_adapters=[model.active_adapter])
        else:
            model.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
        if extra is not None:
            extra(stage)

    try:
        return commit_final(output_dir, write)
    except VelotuneError:
        raise
    except Exception as e:
        from velotune.export.atomic import is_write_failure

        if not is_write_failure(e):
            raise
        from velotune.fsio import is_disk_full_at

        raise OutputError(
            f"output_dir {output_dir}: the final save failed "
            f"({describe_os_error(e, is_disk_full_at(e, output_dir))}); nothing in "
            "the folder was changed (the checkpoints are intact): free space and resume with "
            "--resume"
        ) from e


def run_training(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    model=None,
    tokenizer=None,
    callbacks: Sequence = (),
    overwrite: bool = False,
) -> RunResult:
    """Train as `cfg` says and save adapter, tokenizer, loss curve and summary into cfg.output_dir.

    `model`/`tokenizer`: an already loaded pair from FastLanguageModel.from_pretrained (e.g. the demo,
    which shows answers before training); LoRA is added here unless `model` is already a PEFT model.
    `progress=False`: no bar and no log lines (the logs still reach report_to and the summary).
    Before any step: preflight checks (train/preflight.py), then output_dir is locked for this run
    (train/run_lock.py) and must be empty or this run's own (resume); `overwrite=True` moves another
    run's folder aside to `<output_dir>.old-<time>` (train/output_dir.py).
    """
    from velotune.distributed import is_main_process
    from velotune.train.output_dir import claim, resumes_here
    from velotune.train.preflight import preflight
    from velotune.train.run_lock import RunLock

    check_paths(cfg)
    out = Path(cfg.output_dir)
    main = is_main_process()
    preflight(cfg, check_output=main)
    lock = RunLock(out)
    if main:  # other ranks of a DDP run write through rank 0's claim
        lock.acquire()
    try:
        if main and claim(out, resuming=resumes_here(out, cfg.training.resume_from_checkpoint), overwrite=overwrite):
            lock.release()
            lock.acquire()  # on the fresh folder
        return _run_training(cfg, out, progress=progress, model=model, tokenizer=tokenizer, callbacks=callbacks)
    finally:
        lock.release()


def _run_training(cfg: TrainConfig, out: Path, *, progress: bool, model, tokenizer, callbacks) -> RunResult:
    from transformers import set_seed

    resume = _resume_arg(cfg)
    set_seed(cfg.training.seed)
    if model is None:
        model, tokenizer = load_model(cfg)
    elif tokenizer is None:
        raise ValueError("run_training: pass the tokenizer together with the model")

    from velotune.distributed import is_main_process
    from velotune.train.datasets import prepare_datasets

    train_ds, eval_ds, report, fmt = prepare_datasets(cfg, tokenizer, progress=progress)
    if progress and is_main_process():  # (skipped / truncated rows are listed by velotune.data's own warning)
        skipped = f" -- {report.one_line()}" if report.num_skipped else ""
        print(f"data ({fmt}): {report.summary().splitlines()[0]}{skipped}")
    if not hasattr(model, "peft_config"):
        model = add_adapters(model, cfg)
    if _compute_dtype(model) == torch.float16:
        # fp16 training runs under a GradScaler, which refuses fp16 gradients: keep float32 master copies of
        # the trained weights (velotune's fused LoRA casts A/B to the compute dtype on the fly).
        for p in model.parameters():
            if p.requires_grad and p.dtype == torch.float16:
                p.data = p.data.float()

    cbs = [ProgressCallback(desc=f"{cfg.method} training")] if progress else []
    trainer = make_trainer(cfg, model, tokenizer, train_ds, eval_ds, callbacks=[*cbs, *callbacks])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressCallback prints readable lines
    start = time.perf_counter()
    _train(trainer, resume, out)
    seconds = time.perf_counter() - start

    # Under torchrun / accelerate launch every process trained the same replica (DDP); only the main
    # process writes the outputs, the others wait until they are complete.
    main = trainer.is_world_process_zero()
    history = trainer.state.log_history
    png = out / "loss_curve.png"
    summary = summarize(
        history,
        global_step=trainer.state.global_step,
        train_seconds=seconds,
        method=cfg.method,
        model=cfg.model.name,
        data_path=cfg.data.path,
        data_format=fmt,
        rows_used=len(train_ds),
        data_report={
            "summary": report.summary(),
            "counts": report.counts,
            "total": report.total,
            "kept": report.num_kept,
        },
        resumed_from=str(resume) if resume else None,
        output_dir=str(out),
        adapter_path=str(out),
        loss_curve=str(png),
        world_size=trainer.args.world_size,
        config=cfg.model_dump(),
        versions=_versions(),
    )
    summary_path = out / "summary.json"
    title = f"{cfg.method} loss - {Path(cfg.model.name).name}"

    def curve_and_summary(stage: Path) -> None:
        write_loss_curve(history, stage / png.name, title=title)
        write_json(stage / summary_path.name, summary)

    if main:
        save_final(trainer.model, tokenizer, out, extra=curve_and_summary)
    trainer.accelerator.wait_for_everyone()
    steps, losses = loss_points(history)
    if progress and main:
        first, last = summary["first_loss"], summary["last_loss"]
        loss_s = f"loss {first:.4f} -> {last:.4f}" if first is not None else "no loss logged"
        print(f"done: {summary['steps']} steps in {seconds:.1f} s, {loss_s}; saved to {out}")
    return RunResult(
        output_dir=out,
        adapter_path=out,
        summary_path=summary_path,
        png_path=png,
        steps=steps,
        losses=losses,
        summary=summary,
        data_report=report,
        model=trainer.model,
        tokenizer=tokenizer,
        trainer=trainer,
    )


def _train(trainer, resume, out: Path) -> None:
    """trainer.train with a full disk during a checkpoint save and a refused pickle in a checkpoint as
    one-line errors (the torn checkpoint is removed: --resume then takes the last complete one)."""
    import pickle

    from velotune.fsio import is_disk_full_at

    try:
        trainer.train(resume_from_checkpoint=resume)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"{resume}: a file in this checkpoint holds pickled objects beyond plain tensors, which "
            "velotune refuses to load (it never unpickles code); delete that checkpoint (or resume "
            "from another) if you did not write it"
        ) from e
    except Exception as e:
        if not is_disk_full_at(e, out):
            raise
        from velotune.train.resume import newest_complete, remove_torn

        last, torn = newest_complete(out)
        remove_torn(torn, last)
        then = f"run again with --resume to continue from {last.name}" if last else "run again"
        raise OutputError(
            f"output_dir {out}: the disk filled up while saving a checkpoint "
            f"({describe_os_error(e, True)}); "
            f"the incomplete checkpoint was removed: free some space (or lower "
            f"training.save_total_limit) and {then}"
        ) from e


def _versions() -> dict:
    import peft
    import transformers
    import trl

    from velotune import __version__

    return {
        "velotune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
    }
