"""Glue between TRL's trainers and velotune models. TRL's own classes are used unchanged.

    from trl import SFTTrainer
    trainer = velotune_trainer_class(SFTTrainer)(model=model, args=args, ...)   # a real SFTTrainer subclass

What the glue adds, per trainer instance, without touching TRL or transformers globals:

1. Exact loss normalisation under gradient accumulation (SFT). TRL's SFT loss is
   `sum(token losses) / num_items_in_batch`, where transformers counts the trainable (shifted) labels of
   ALL micro-batches of one optimizer step. transformers only passes that count when it believes the
   model "accepts loss kwargs" (it inspects `model.forward` for **kwargs); a patched forward without
   **kwargs would silently fall back to mean-per-micro-batch / accumulation steps, which weighs a
   micro-batch of 3 trainable tokens like one of 300. SFTTrainer.compute_loss divides by the count
   itself (it does not rely on the model's forward), so the flags are set true for it.
2. A separate learning rate for trainable embeddings (`embed_tokens` / `lm_head` in `modules_to_save`,
   continued pretraining): their parameters move into their own optimizer param groups.
3. A `tokens_per_second` entry in every training log (non-padding tokens seen since the last log).
4. SFT off the GPU: the loss is computed here, in PyTorch, whenever the LM head is not on a CUDA/XPU
   device. TRL's SFTTrainer always asks the model for its fused LM head (`fused_lm_head=True`), whose
   kernel is Triton; TRL 1.15 runs that kernel whatever the device (no Triton driver on a CPU: "0 active
   drivers"), 1.16 falls back to PyTorch. So the CPU path never reaches a GPU-only kernel, whichever
   TRL release is installed. Same loss as TRL's: the summed next-token negative log-likelihood over
   labels[..., 1:] != -100, divided by num_items_in_batch (else by that micro-batch's count, at least 1),
   with TRL's `entropy`, `mean_token_accuracy` and `num_tokens` metrics. A custom `compute_loss_func` or
   label smoothing keeps TRL's own path.

5. GRPO (TRL's GRPOTrainer): rollouts on velotune's decode engine and the policy's log-probs through
   velotune's per-token head, bound on the trainer's model (train/grpo.py `install`).

`PatchDPOTrainer()` exists for scripts written for other libraries: TRL's DPOTrainer works with
velotune models as they are, so it patches nothing.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

log = logging.getLogger("velotune")


def PatchDPOTrainer() -> None:  # noqa: N802 (the name users know)
    """Compatibility no-op: kept so that `from velotune import PatchDPOTrainer; PatchDPOTrainer()` runs.

    Other libraries patch TRL's DPOTrainer (its notebook logging and the model forward it calls).
    velotune returns real transformers/PEFT models whose fast paths are bound per instance, and TRL's
    DPOTrainer (and ORPOTrainer) call them through the ordinary forward, so there is nothing to patch.
    It checks that TRL's DPOTrainer imports, changes nothing, and may be called any number of times.
    """
    from trl import DPOTrainer  # noqa: F401  (an ImportError here says TRL is missing or too old)


def embedding_parameters(model) -> list[torch.nn.Parameter]:
    """Trainable parameters of the input and output embeddings (also inside PEFT's modules_to_save copies)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = [m for m in (base.get_input_embeddings(), base.get_output_embeddings()) if m is not None]
    prefixes = [name + "." for name, m in base.named_modules() if any(m is e for e in embeddings)]
    seen, params = set(), []
    for name, p in base.named_parameters():
        if p.requires_grad and any(name.startswith(pre) for pre in prefixes) and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def split_embedding_groups(optimizer: torch.optim.Optimizer, embed_params, lr: float) -> None:
    """Move `embed_params` out of each param group into a copy of that group with learning rate `lr`.

    Run before the first step (the optimizer has no state yet). Groups keep their order, so a checkpoint's
    optimizer state loads back into the same layout on resume.
    """
    ids = {id(p) for p in embed_params}
    kept, moved = [], []
    for group in optimizer.param_groups:
        own = [p for p in group["params"] if id(p) not in ids]
        emb = [p for p in group["params"] if id(p) in ids]
        if own:
            kept.append({**group, "params": own})
        if emb:
            moved.append({**group, "params": emb, "lr": lr, "initial_lr": lr, "velotune_group": "embeddings"})
    optimizer.param_groups[:] = kept + moved


def _count_tokens(inputs) -> int:
    """Non-padding tokens in a batch: attention-mask sums, else the input ids (padding-free batches)."""
    if not isinstance(inputs, dict):
        return 0
    masks = [v for k, v in inputs.items() if k.endswith("attention_mask") and torch.is_tensor(v)]
    if masks:
        return int(sum(int(m.sum()) for m in masks))
    return int(sum(v.numel() for k, v in inputs.items() if k.endswith("input_ids") and torch.is_tensor(v)))


class VelotuneTrainerMixin:
    """Mixed in front of a TRL trainer class by `velotune_trainer_class` (see the module docstring)."""

    velotune_embedding_learning_rate: float | None = None

    def __init__(self, *args, embedding_learning_rate: float | None = None, offload_optimizer: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.velotune_embedding_learning_rate = embedding_learning_rate
        if offload_optimizer:  # transformers' create_optimizer builds its parameter groups, then this class
            from velotune.memory.offload_adamw import OffloadedAdamW

            a = self.args
            self.optimizer_cls_and_kwargs = (
                OffloadedAdamW,
                dict(lr=a.learning_rate, eps=a.adam_epsilon, betas=(a.adam_beta1, a.adam_beta2)),
            )
        self._vt_tokens = 0
        self._vt_clock = None
        exact_token_normalisation(self)
        from velotune.train import grpo

        if grpo.is_grpo_trainer(self):  # rollouts on the decode engine, velotune's log-prob head (train/grpo.py)
            grpo.install(self)

    def create_optimizer(self, *args, **kwargs):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        lr = self.velotune_embedding_learning_rate
        if fresh and lr is not None:
            params = embedding_parameters(self.model)
            if not params:
                from velotune.errors import ConfigError

                raise ConfigError(
                    "embedding_learning_rate is set but no embedding parameter is trainable: "
                    "add embed_tokens / lm_head to lora.modules_to_save"
                )
            split_embedding_groups(optimizer, params, lr)
            log.info("embedding learning rate %.3g for %d tensors", lr, len(params))
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not _needs_torch_sft_loss(self, model):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        return sft_loss_in_torch(self, model, inputs, return_outputs, num_items_in_batch)

    def _save_checkpoint(self, model, trial):
        """Checkpoints appear whole or not at all (train/checkpoint_save.py)."""
        from velotune.train import checkpoint_save

        save = checkpoint_save.save if checkpoint_save.stages_atomically(self) else checkpoint_save.save_in_place
        save(self, super()._save_checkpoint, model, trial)

    def training_step(self, model, inputs, *args, **kwargs):
        if self._vt_clock is None:
            self._vt_clock = time.perf_counter()
        self._vt_tokens += _count_tokens(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def log(self, logs, *args, **kwargs):
        # (GRPO's batches are prompt rows, tokenised later by the trainer: nothing counted, no entry)
        if "loss" in logs and self._vt_clock is not None and self._vt_tokens:
            now = time.perf_counter()
            logs["tokens_per_second"] = round(self._vt_tokens / max(now - self._vt_clock, 1e-9), 1)
            logs["tokens"] = self._vt_tokens
            self._vt_tokens, self._vt_clock = 0, now
        return super().log(logs, *args, **kwargs)


def _head_device(model) -> torch.device:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return head.weight.device
    return next(model.parameters()).device


def _needs_torch_sft_loss(trainer, model) -> bool:
    """SFT with TRL's plain loss on a device where TRL's fused LM-head kernel may not run (see point 4)."""
    from trl import SFTTrainer

    return (
        isinstance(trainer, SFTTrainer)
        and trainer.compute_loss_func is None
        and getattr(trainer, "label_smoother", None) is None
        and _head_device(model).type not in ("cuda", "xpu")
    )


def sft_loss_in_torch(trainer, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
    """TRL SFTTrainer's loss and metrics from the model's ordinary logits (plain PyTorch; module docstring, 4).

    inputs: a collated batch with `labels` [B, T] (-100 = not trained). Returns the loss, or
    (loss, model outputs with `.logits` [B, T, V]) with return_outputs.
    """
    import torch.nn.functional as F

    mode = "train" if trainer.model.training else "eval"
    labels = inputs["labels"]
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    forward["use_cache"] = False
    aux = getattr(trainer, "aux_loss_enabled", False)
    if aux:
        forward["output_router_logits"] = True
    outputs = model(**forward)
    logits = outputs.logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    mask = targets != -100
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    count = mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = nll / torch.as_tensor(count, device=nll.device).clamp(min=1)
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * (trainer.accelerator.num_processes // trainer.get_tp_size())
    if aux and getattr(outputs, "aux_loss", None) is not None:
        steps = trainer.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + trainer.router_aux_loss_coef * outputs.aux_loss / steps
    _log_sft_metrics(trainer, mode, inputs, logits.detach(), targets, mask)
    return (loss, outputs) if return_outputs else loss


def _log_sft_metrics(trainer, mode: str, inputs, logits, targets, mask) -> None:
    """TRL's SFT metrics (entropy, mean_token_accuracy, num_tokens) into trainer._metrics, where it keeps them."""
    metrics = getattr(trainer, "_metrics", None)
    if metrics is None:
        return
    with torch.no_grad():
        logp = torch.log_softmax(logits[mask], dim=-1)
        gather = trainer.accelerator.gather_for_metrics
        num_valid = gather(mask.sum()).sum()
        entropy = gather(-(logp.exp() * logp).sum()).sum()
        correct = gather((logits[mask].argmax(-1) == targets[mask]).sum()).sum()
    metrics[mode]["entropy"].append((entropy / num_valid).item() if num_valid > 0 else 0.0)
    metrics[mode]["mean_token_accuracy"].append((correct / num_valid).item() if num_valid > 0 else 0.0)
    if mode == "train" and hasattr(trainer, "_total_train_tokens"):
        if "attention_mask" in inputs:
            seen = gather(inputs["attention_mask"].sum()).sum().item()
        else:
            seen = gather(torch.tensor(inputs["input_ids"].size(1))).sum().item()
        trainer._total_train_tokens += seen // getattr(trainer, "_tp_size", 1)
    if hasattr(trainer, "_total_train_tokens"):
        metrics[mode]["num_tokens"] = [trainer._total_train_tokens]


def exact_token_normalisation(trainer) -> None:
    """SFT: make transformers pass the exact trainable-token count of the whole accumulated step."""
    from trl import SFTTrainer

    if isinstance(trainer, SFTTrainer) and trainer.compute_loss_func is None:
        # SFTTrainer.compute_loss divides by num_items_in_batch itself, whatever the model forward accepts.
        trainer.model_accepts_loss_kwargs = True
        # Its fused LM head shifts labels, so the count is taken over labels[..., 1:] (as transformers does
        # for ForCausalLMLoss); a patched model must not change that.
        if hasattr(trainer, "_loss_shifts_labels"):
            trainer._loss_shifts_labels = True


@functools.lru_cache(maxsize=None)
def velotune_trainer_class(trainer_cls: type) -> type:
    """A subclass of `trainer_cls` (e.g. trl.SFTTrainer) with the velotune glue mixed in."""
    return type(f"Velotune{trainer_cls.__name__}", (VelotuneTrainerMixin, trainer_cls), {})
