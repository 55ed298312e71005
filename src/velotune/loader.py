"""`FastLanguageModel`: the entry point users know (from_pretrained -> get_peft_model -> train).

The objects returned are real transformers / PEFT objects. Fast paths (fused kernels, 4-bit,
offloaded checkpointing, export and inference helpers) are attached per instance by the modules
that own them, so `unpatch(model)` can always return stock behaviour.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from velotune import trl_compat
from velotune.device import resolve_dtype
from velotune.errors import ConfigError, ModelLoadError
from velotune.log import quiet_deprecations
from velotune.model_folder import (
    adapter_folder,
    check_adapter_folder,
    check_coverage,
    first_line,
    load_config,
    load_weights,
    resolve_model_path,
)

log = logging.getLogger("velotune")

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Families that fuse projections under other names (Phi-3: qkv_proj, gate_up_proj).
_FUSED_NAMES = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def _arguments_for(target, arguments: dict) -> dict:
    """The entries of `arguments` (a caller's locals()) that `target` (a function, or a dataclass with
    kw_only=True) takes as keyword-only parameters: a public signature passes its arguments on to
    `target` by name without listing them again."""
    params = inspect.signature(target).parameters.values()
    return {p.name: arguments[p.name] for p in params if p.kind is p.KEYWORD_ONLY}


def _check_fit(
    config, memory_cap, device_map, compute_dtype, load_in_4bit: bool, max_seq_length: int, full_finetuning: bool
):
    """fit.check_fit against `memory_cap` (or the free CUDA memory): the estimate, or ModelLoadError."""
    from velotune.fit import check_fit, gpu_cap_bytes, parse_bytes

    if memory_cap is not None:
        try:
            cap = parse_bytes(memory_cap)
        except ValueError as e:
            raise ModelLoadError(f"memory_cap: {e}") from None
    elif device_map is None:
        cap = gpu_cap_bytes()
    else:
        cap = None  # the caller places the model (possibly across devices and the host)
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) or qc is None else qc.to_dict()
    four_bit = load_in_4bit or bool(qc and qc.get("load_in_4bit"))  # a *-bnb-4bit checkpoint loads in 4 bits
    try:
        if cap is None:
            from velotune.fit import estimate_memory

            return estimate_memory(config, compute_dtype, four_bit, max_seq_length, full_finetuning=full_finetuning)
        est = check_fit(config, cap, compute_dtype, four_bit, max_seq_length, full_finetuning)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - a config the estimate cannot build: load without the check
        log.warning("velotune: no memory estimate for this config (%s: %s)", type(e).__name__, e)
        return None
    log.info("velotune: training memory estimate %s", est.describe())
    return est


def _native_context(config) -> int | None:
    """The positions the model was trained on: max_position_embeddings (or n_positions), also
    looked up in a text_config; None when the config names none."""
    for cfg in (config, getattr(config, "text_config", None)):
        for key in ("max_position_embeddings", "n_positions"):
            n = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(n, int) and n > 0:
                return n
    return None


def _rope_factor(rope_scaling, max_seq_length: int | None, native: int | None, config) -> float | None:
    """The linear RoPE factor the caller asked for (None: RoPE stays as trained), checked before
    any weight is loaded. Without a request, a max_seq_length past the native context only warns."""
    if rope_scaling is None:
        if max_seq_length and native and max_seq_length > native:
            log.warning(
                "velotune: max_seq_length %d is more than the %d positions the model was trained on; RoPE is "
                "left as trained (positions past %d are new to the model). To stretch RoPE over %d positions, "
                "pass rope_scaling='linear'",
                max_seq_length,
                native,
                native,
                max_seq_length,
            )
        return None
    if rope_scaling == "linear":
        if not native or not max_seq_length or max_seq_length <= native:
            raise ConfigError(
                f"rope_scaling='linear' stretches RoPE over max_seq_length positions: give a max_seq_length "
                f"above the model's native context ({native}); got {max_seq_length}"
            )
        factor = max_seq_length / native
    elif isinstance(rope_scaling, dict):
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        factor = rope_scaling.get("factor")
        if kind != "linear" or not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 1:
            raise ConfigError(
                f"rope_scaling={rope_scaling!r}: velotune scales RoPE linearly: use 'linear' or "
                "{'type': 'linear', 'factor': f} with f > 1 (other scalings: set rope_parameters in config.json)"
            )
        factor = float(factor)
    else:
        raise ConfigError(f"rope_scaling={rope_scaling!r}: use None (default: RoPE as trained), 'linear' or a dict")
    from velotune.models.rope_scaling import scaling_problem

    problem = scaling_problem(config)
    if problem is not None:
        raise ConfigError(f"rope_scaling={rope_scaling!r}: this model cannot be rescaled: {problem}")
    return factor


def _quantization(config, load_in_4bit: bool, load_in_8bit: bool, load_in_16bit: bool, full_finetuning: bool) -> int:
    """Bits the weights load in (4, 8 or 16), from the arguments and a bitsandbytes checkpoint's own config."""
    from velotune.quant import checkpoint_bits

    if load_in_4bit and load_in_8bit:
        raise ConfigError("load_in_4bit=True and load_in_8bit=True: choose one")
    if load_in_16bit and (load_in_4bit or load_in_8bit):
        raise ConfigError("load_in_16bit=True asks for unquantised weights: drop load_in_4bit / load_in_8bit")
    saved = checkpoint_bits(config)
    if full_finetuning and (load_in_4bit or load_in_8bit):
        log.warning(
            "velotune: full_finetuning=True trains every weight, which 4/8-bit weights cannot be: "
            "loading unquantised instead (load_in_4bit / load_in_8bit ignored)"
        )
        load_in_4bit = load_in_8bit = False
    if load_in_4bit:
        return 4
    if load_in_8bit or saved == 8:
        return 8
    return 16


class FastLanguageModel:
    """Namespace of static constructors, as in the libraries users switch from."""

    @staticmethod
    def from_pretrained(
        model_name: str | os.PathLike,
        max_seq_length: int | None = None,
        dtype: Any = None,
        load_in_4bit: bool = False,
        *,
        load_in_8bit: bool = False,
        load_in_16bit: bool = False,
        full_finetuning: bool = False,
        fast: bool = True,
        device_map: Any = None,
        token: str | None = None,
        revision: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        memory_cap: int | str | None = None,
        padding_free: bool = True,
        rope_scaling: str | dict | None = None,
        fast_inference: bool = False,
        resize_model_vocab: int | None = None,
        **kwargs,
    ):
        """Load a causal LM and its tokenizer.

        Returns `(model, tokenizer)`. `dtype=None` picks bf16 where supported, fp16 on older GPUs
        and float32 on CPU; an explicit dtype is honoured everywhere. `fast=False` keeps the stock
        transformers forward (useful for A/B checks).

        `model_name` is a model folder or hub id, or a LoRA adapter folder (adapter_config.json +
        adapter_model.safetensors): then the base model its `base_model_name_or_path` names is loaded
        with the same arguments, the adapter on top (trainable, as PEFT's is_trainable=True), the
        adapter folder's tokenizer where it has one, and a `peft.PeftModel` on velotune's fast path
        is returned (checkpointing as get_peft_model's `use_gradient_checkpointing`, which
        from_pretrained then takes too; default "unsloth").

        Positions are never changed unless asked: `max_seq_length=None` (default) is the model's
        native context (`config.max_position_embeddings`), kept as `model.max_seq_length`. A larger
        `max_seq_length` leaves RoPE as trained and logs a warning (positions past the native
        context are ones the model never saw). `rope_scaling="linear"` stretches RoPE linearly over
        `max_seq_length` (factor max_seq_length / native); `rope_scaling={"type": "linear", "factor": f}`
        by `f`. Scaling is logged (velotune's notices are printed: velotune.log) and undone by
        `unpatch`; models whose RoPE is not default or linear (llama3, yarn, per-layer tables) refuse it.

        Quantisation: `load_in_4bit` (NF4, velotune's fused 4-bit paths) or `load_in_8bit`
        (bitsandbytes LLM.int8(); its layers run bitsandbytes' own forward, so the decoder stays on
        the stock transformers forward, as with fast=False). `load_in_16bit=True` asks for neither.
        With `full_finetuning=True` the weights load unquantised (4/8-bit weights cannot be trained),
        with a notice. `resize_model_vocab=n` resizes the embeddings (and an untied LM head) to n rows.

        Unsloth's keywords are accepted: `fast_inference=True` means velotune's own decode path
        (FastLanguageModel.for_inference; no vLLM), noted in one line; vLLM engine settings
        (`gpu_memory_utilization`, `max_lora_rank`, ...) and Unsloth internals are accepted and
        named in one line each; features velotune lacks (`load_in_fp8`, `qat_scheme`) raise
        ConfigError (velotune.loader_options). Other keywords go to transformers' from_pretrained.
        Vision-language models (a vision_config) raise ModelLoadError.

        Before anything is allocated, the training memory is estimated from the config
        (velotune.fit: weights, adapters + AdamW, activations for `max_seq_length` tokens (None:
        the native context, at most 2048) under offloaded checkpointing) and ModelLoadError names
        the estimate and what would fit when it exceeds `memory_cap` (bytes or e.g. "16GiB";
        default: the free memory of the current CUDA device; no check on CPU unless given, nor with
        an explicit `device_map`). The estimate is kept at `model.velotune_memory_estimate`.
        `padding_free` (with fast=True): a padded batch in a forward without a KV cache (training,
        TRL's trainers, scoring) runs on its real tokens only, packed into one row with attention
        kept inside each sample (velotune.models.padding_free): the same loss, gradients and logits
        at real positions as the padded batch; False runs padded batches as they come.
        """
        args = _arguments_for(_load_model, locals())  # first: locals() holds the arguments as given
        from velotune.loader_options import take_unsloth_options

        options = take_unsloth_options(kwargs)
        args.update(kwargs)  # what is left once Unsloth's keywords are taken
        path = resolve_model_path(model_name, token, revision)
        adapter = adapter_folder(Path(path))
        # An adapter folder's LoRA layers are set up here, so Unsloth's checkpointing keyword applies to them.
        checkpointing = options.no_effect.pop("use_gradient_checkpointing", "unsloth") if adapter else None
        options.report()
        trl_compat.install()  # older TRL spellings (tokenizer=, max_seq_length=, ...) in Unsloth-style code
        if adapter is not None:
            model, tokenizer = _load_adapter(adapter, args, checkpointing)
        else:
            model, tokenizer = _load_model(path, **args)
        if fast_inference:
            from velotune.infer.rollout import enable_fast_generate

            enable_fast_generate(model)  # model.generate on the decode engine, in training mode too (GRPO)
            log.info(
                "velotune: fast_inference=True: model.generate runs on velotune's own decode engine "
                "(batched, in training mode too, e.g. GRPO rollouts); vLLM is not used"
            )
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model,
        r: int = 16,
        target_modules: Sequence[str] | str | None = DEFAULT_TARGET_MODULES,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        use_gradient_checkpointing: bool | str = "unsloth",
        random_state: int = 3407,
        max_seq_length: int | None = None,
        use_rslora: bool = False,
        loftq_config: Any = None,
        *,
        modules_to_save: Sequence[str] | None = None,
        use_dora: bool = False,
        init_lora_weights: Any = True,
        offload_embedding: bool | str = "auto",
        cuda_graphs: bool = False,
        recompute: str | None = None,
        mlp_row_blocks: int = 1,
        offload_every: int | str = 1,
        host_memory_budget: int | str | None = None,
        padding_free: bool | None = None,
        **kwargs,
    ):
        """Wrap `model` in a real `peft.PeftModel` with LoRA adapters.

        The defaults are the fastest exact settings (each gives the same losses and gradients as
        stock; docs/perf-notes.md says what each costs and why anything is off):
        `use_gradient_checkpointing`: "unsloth" (default; also "offload"): each decoder layer is
        checkpointed and its input waits in pinned CPU memory (velotune.memory.checkpointing);
        True: transformers' non-reentrant checkpointing; False: none. A trainer's own request for
        checkpointing (TRL's SFTConfig defaults to gradient_checkpointing=True) keeps velotune's.
        `recompute` (with "unsloth"/"offload"; None picks "mlp" there, "layer" otherwise): "mlp"
        copies the attention half's activations to host memory as well and recomputes only the MLP
        in backward (velotune.memory.saved_offload): the same results and GPU peak, less GPU work,
        ~4.5x the pinned host memory of "layer" (8B: ~36 KiB instead of 8 KiB per token and layer);
        "layer" recomputes each decoder layer whole. Layers velotune cannot split (Gemma 2's
        softcapped attention) recompute whole either way.
        `mlp_row_blocks` (with recompute="mlp"): each MLP runs forward and backward in that many
        blocks of rows (velotune.lora.recomputed_mlp). 1 gives the same bits as one piece; more lowers
        the MLP's GPU memory peak for more, smaller GEMMs (the rounding stays as exact, not the same bits).
        `offload_embedding`: "auto" (default) keeps a frozen, untied input-embedding table of a model
        on a CUDA device in pinned host memory, the GPU reading the batch's rows from it
        (velotune.memory.embedding_offload: ~1 GiB less GPU memory for Llama-3, no host sync), and
        leaves every other table (tied, trainable, on the CPU, in a distributed run) where it is;
        True asks for it and refuses tables it cannot take; False never.
        `offload_every` (with "unsloth"/"offload", recompute="layer"): keep only every k-th decoder
        layer's input in host memory and recompute the layers between in backward (the same bits,
        ceil(layers / k) host copies instead of one per layer; velotune.memory.sparse_offload).
        "auto" picks the smallest k whose inputs fit `host_memory_budget` (bytes or e.g. "100GiB";
        default: the host's available memory, measured at each step); the choice is reported in
        `model.velotune_offload_stats` (offload_every, host_budget, host_needed).
        `padding_free`: True or False switches padded batches to run on their real tokens only
        (see from_pretrained); None keeps what from_pretrained set (on by default), except with
        cuda_graphs=True, which asks for fixed shapes: there None means False.
        `cuda_graphs` (off by default; with "unsloth"/"offload" checkpointing): after one eager step,
        each decoder layer's forward and its recompute + backward replay as CUDA graphs
        (velotune.memory.layer_graphs; with recompute="mlp" also velotune.memory.saved_graphs), to
        take the host out of the step; bit-identical to eager, a layer whose capture fails runs
        eagerly with a warning. Graphs are captured per input shape, and padding-free batches change
        shape every step (their packed layers run eagerly), so it pays off for fixed-shape batches
        (packing to a fixed length, own loops): docs/perf-notes.md.
        `target_modules` naming `embed_tokens` or `lm_head`: those are trained in full (added to
        PEFT's `modules_to_save`), not given LoRA, as Unsloth does. Unsloth's FastModel switches
        `finetune_attention_modules` / `finetune_mlp_modules` / `finetune_language_layers` /
        `finetune_vision_layers` pick the targets when `target_modules` is left at its default (a
        text-only model has no vision layers). A model that already is a PeftModel (an adapter folder
        loaded by from_pretrained) is returned as it is, with a warning.
        """
        settings = _PeftSettings(**_arguments_for(_PeftSettings, locals()))  # first: locals() holds the arguments
        with quiet_deprecations():  # importing PEFT's dependencies
            from peft import LoraConfig, PeftModel, get_peft_model
        from velotune.loader_options import FINETUNE_FLAGS, targets_from_finetune_flags

        flags = {k: kwargs.pop(k) for k in FINETUNE_FLAGS if k in kwargs}
        kwargs.pop("temporary_location", None)  # Unsloth's scratch folder: nothing to put there
        qat = kwargs.pop("qat_scheme", None)
        if qat is not None:
            raise ConfigError(f"qat_scheme={qat!r}: velotune has no quantisation-aware training")
        if isinstance(model, PeftModel):
            log.warning(
                "velotune: the model already has LoRA adapters (e.g. loaded from an adapter folder): "
                "returned as it is, no new adapters added"
            )
            return model
        derived = targets_from_finetune_flags(flags)
        if derived is not None and (target_modules is None or target_modules is DEFAULT_TARGET_MODULES):
            target_modules = derived
        settings.check()
        if max_seq_length is not None:
            model.max_seq_length = max_seq_length
        torch.manual_seed(random_state)
        random.seed(random_state)
        targets, full = _resolve_target_modules(model, target_modules)
        if full:
            log.info(
                "velotune: %s in target_modules: trained in full (PEFT modules_to_save), not with LoRA",
                ", ".join(full),
            )
        to_save = list(modules_to_save or []) + [m for m in full if m not in (modules_to_save or [])]
        if loftq_config:
            init_lora_weights = "loftq"
        config = LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias=bias,
            target_modules=targets,
            use_rslora=use_rslora,
            use_dora=use_dora,
            init_lora_weights=init_lora_weights,
            loftq_config=loftq_config or {},
            modules_to_save=to_save or None,
            task_type="CAUSAL_LM",
            **kwargs,
        )
        # PEFT keeps the adapter weights in fp32 (master weights: AdamW updates of bf16 weights would
        # round away); the fused LoRA functions cast A and B (r x d, tiny) to the compute dtype at use.
        with quiet_deprecations():  # PEFT reads transformers' renamed checkpointing attributes
            peft_model = get_peft_model(model, config)
        _finish_peft_model(peft_model, settings)
        return peft_model

    @staticmethod
    def for_inference(model):
        """Switch to the decoding path (eval mode, KV cache)."""
        from velotune.infer import for_inference

        return for_inference(model)

    @staticmethod
    def for_training(model, use_gradient_checkpointing: bool | str = True):
        """Switch back to training mode."""
        from velotune.infer import for_training

        return for_training(model, use_gradient_checkpointing=use_gradient_checkpointing)


class FastModel(FastLanguageModel):
    """Unsloth's current entry point: the same loader as FastLanguageModel (from_pretrained,
    get_peft_model, for_inference, for_training) for any supported causal language model.
    Vision-language models (a vision_config, or a type transformers lists as image-text-to-text)
    raise ModelLoadError in one line until velotune supports them."""


class FastVisionModel(FastModel):
    """Unsloth's name for its multimodal loader. velotune trains text-only causal language models
    for now: a vision-language model raises ModelLoadError in one line; a text-only model loads
    as with FastModel (Unsloth's FastVisionModel loads those too)."""


def _load_model(
    path: str,
    *,
    max_seq_length: int | None,
    dtype: Any,
    load_in_4bit: bool,
    load_in_8bit: bool,
    load_in_16bit: bool,
    full_finetuning: bool,
    fast: bool,
    device_map: Any,
    token: str | None,
    revision: str | None,
    attn_implementation: str | None,
    trust_remote_code: bool,
    memory_cap: int | str | None,
    padding_free: bool,
    rope_scaling: str | dict | None,
    resize_model_vocab: int | None,
    **kwargs,
):
    """from_pretrained for a model folder (already resolved to a local path): (model, tokenizer)."""
    if not isinstance(padding_free, bool):
        raise ValueError(f"padding_free={padding_free!r}: use True or False")
    if max_seq_length is not None and (
        isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 1
    ):
        raise ConfigError(
            f"max_seq_length={max_seq_length!r}: use a positive whole number, or None for the native context"
        )
    if resize_model_vocab is not None and (
        isinstance(resize_model_vocab, bool) or not isinstance(resize_model_vocab, int) or resize_model_vocab < 1
    ):
        raise ConfigError(f"resize_model_vocab={resize_model_vocab!r}: use a positive whole number of rows")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from velotune.loader_options import vision_problem

    compute_dtype = resolve_dtype(dtype)
    config = load_config(AutoConfig, path, trust_remote_code)
    problem = vision_problem(config)
    if problem is not None:
        raise ModelLoadError(
            f"{path}: {getattr(config, 'model_type', 'this model')} is a vision/audio-language model ({problem}); "
            "velotune trains text-only causal language models for now: use a text-only checkpoint"
        )
    native = _native_context(config)
    factor = _rope_factor(rope_scaling, max_seq_length, native, config)
    bits = _quantization(config, load_in_4bit, load_in_8bit, load_in_16bit, full_finetuning)
    fit_tokens = max_seq_length or min(native or 2048, 2048)
    estimate = _check_fit(config, memory_cap, device_map, compute_dtype, bits == 4, fit_tokens, full_finetuning)
    if Path(path).is_dir():
        check_coverage(Path(path), config)
    load_kwargs: dict[str, Any] = dict(
        dtype=compute_dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs
    )
    if attn_implementation is not None:  # None: transformers picks (SDPA where the family allows it)
        load_kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    if bits == 4:
        from velotune.quant import quantization_config_for

        load_kwargs = {**quantization_config_for(compute_dtype, config), **load_kwargs}  # caller's win
    elif bits == 8:
        from velotune.quant import quantization_config_8bit

        load_kwargs = {**quantization_config_8bit(config), **load_kwargs}
        if fast:
            log.info(
                "velotune: 8-bit weights run bitsandbytes' own forward: the decoder keeps the stock "
                "transformers forward (velotune's fused paths take 16-bit and 4-bit weights)"
            )
            fast = False
    model = load_weights(AutoModelForCausalLM, path, config, load_kwargs)
    if device_map is None and bits == 16 and torch.cuda.is_available():
        model = model.to("cuda")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(
            f"{path}: the tokenizer files do not load ({type(e).__name__}: "
            f"{first_line(e)}); copy them from the base model's folder"
        ) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if resize_model_vocab is not None:
        model.resize_token_embeddings(resize_model_vocab)
    if factor is not None:
        from velotune.models.rope_scaling import scale_rope

        scale_rope(model, factor)
    model.max_seq_length = max_seq_length or native
    model.velotune_compute_dtype = compute_dtype
    model.velotune_memory_estimate = estimate
    model.velotune_fast = fast
    if fast:
        from velotune.models import prepare_model

        prepare_model(model, full_finetuning=full_finetuning)
        from velotune.models.padding_free import set_padding_free

        set_padding_free(model, padding_free)
    if full_finetuning:
        model.requires_grad_(True)
    _attach_methods(model)
    return model, tokenizer


def _load_adapter(adapter: Path, args: dict, use_gradient_checkpointing: bool | str = "unsloth"):
    """from_pretrained for a LoRA adapter folder: its base model (loaded with `args`), the adapter's
    tokenizer where it has one, the adapter (trainable) on top, velotune's PEFT fast path with
    `use_gradient_checkpointing` as get_peft_model takes it."""
    with quiet_deprecations():  # importing PEFT's dependencies
        from peft import PeftModel

    cfg = check_adapter_folder(adapter)
    base = cfg.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ModelLoadError(
            f"{adapter / 'adapter_config.json'} names no base model (base_model_name_or_path); "
            "set it to the base model's folder or hub id"
        )
    if not Path(base).is_absolute() and (adapter / base).exists():
        base = str(adapter / base)
    base_path = resolve_model_path(base, args["token"], None)
    if adapter_folder(Path(base_path)) is not None:
        raise ModelLoadError(
            f"{adapter}: its base model {base} is itself an adapter folder; point base_model_name_or_path "
            "at a full model (or merge the first adapter: save_pretrained_merged)"
        )
    model, tokenizer = _load_model(base_path, **args)
    if any(
        p.suffix in (".json", ".model", ".jinja") and p.name.startswith(("tokenizer", "chat_template"))
        for p in adapter.iterdir()
    ):
        from transformers import AutoTokenizer

        from velotune.data.chat_templates import ensure_template_tokens

        tokenizer = AutoTokenizer.from_pretrained(str(adapter), trust_remote_code=args["trust_remote_code"])
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        ensure_template_tokens(tokenizer, model)  # a run may have added template tokens (the adapter has their rows)
    try:
        with quiet_deprecations():  # PEFT reads transformers' renamed checkpointing attributes
            peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:  # shapes or module names that do not match the base
        raise ModelLoadError(f"{adapter}: the adapter does not fit its base model {base} ({first_line(e)})") from e
    log.info("velotune: loaded LoRA adapter %s on base model %s", adapter, base)
    _finish_peft_model(peft_model, _PeftSettings(use_gradient_checkpointing=use_gradient_checkpointing))
    return peft_model, tokenizer


@dataclass(frozen=True, kw_only=True)
class _PeftSettings:
    """get_peft_model's checkpointing and fast-path settings (its docstring says what each does; the
    defaults are its own), checked together before PEFT changes the model and applied after."""

    use_gradient_checkpointing: bool | str = "unsloth"
    offload_embedding: bool | str = "auto"
    cuda_graphs: bool = False
    recompute: str | None = None
    mlp_row_blocks: int = 1
    offload_every: int | str = 1
    host_memory_budget: int | str | None = None
    padding_free: bool | None = None

    @property
    def offloaded(self) -> bool:
        return self.use_gradient_checkpointing in ("unsloth", "offload")

    def recompute_mode(self) -> str:
        """recompute=None: "mlp" with offloaded checkpointing of every layer, else "layer"."""
        if self.recompute is not None:
            return self.recompute
        return "mlp" if self.offloaded and self.offload_every == 1 and self.host_memory_budget is None else "layer"

    def check(self) -> None:
        """ValueError for settings that do not go together."""
        from velotune.memory.checkpointing import check_recompute

        check_recompute(self.recompute_mode(), self.mlp_row_blocks)
        needs_offload = (
            f"needs use_gradient_checkpointing='unsloth' (or 'offload'): got {self.use_gradient_checkpointing!r}"
        )
        if (self.offload_every != 1 or self.host_memory_budget is not None) and not self.offloaded:
            raise ValueError(f"offload_every={self.offload_every!r} {needs_offload}")
        if self.host_memory_budget is not None:
            from velotune.fit import parse_bytes

            parse_bytes(self.host_memory_budget)
        if self.offload_embedding not in (True, False, "auto"):
            raise ValueError(f"offload_embedding={self.offload_embedding!r}: use 'auto', True or False")
        if self.padding_free is not None and not isinstance(self.padding_free, bool):
            raise ValueError(f"padding_free={self.padding_free!r}: use True, False or None")
        if self.recompute not in (None, "layer") and not self.offloaded:
            raise ValueError(f"recompute={self.recompute!r} {needs_offload}")
        if self.cuda_graphs and not self.offloaded:
            raise ValueError(f"cuda_graphs=True {needs_offload}")


def _finish_peft_model(peft_model, settings: _PeftSettings) -> None:
    """Checkpointing, the fused PEFT path, padding-free batches, embedding offload and the export
    methods on a fresh PeftModel (get_peft_model's, or an adapter folder's)."""
    from velotune.memory.checkpointing import enable_checkpointing  # here: `import velotune` stays cheap

    host_memory_budget = settings.host_memory_budget
    if host_memory_budget is not None:
        from velotune.fit import parse_bytes

        host_memory_budget = parse_bytes(host_memory_budget)
    enable_checkpointing(
        peft_model,
        settings.use_gradient_checkpointing,
        settings.cuda_graphs,
        settings.recompute_mode(),
        settings.mlp_row_blocks,
        settings.offload_every,
        host_memory_budget,
    )
    from velotune.models import prepare_peft_model

    prepare_peft_model(peft_model)
    from velotune.models.trained_copies import keep_io_dtype

    keep_io_dtype(peft_model)  # full copies (modules_to_save) that a trainer may cast to bf16
    padding_free = settings.padding_free
    if padding_free is None and settings.cuda_graphs:
        padding_free = False  # graphs replay fixed shapes; padding-free batches change shape every step
    if padding_free is not None:
        from velotune.models.padding_free import set_padding_free

        set_padding_free(peft_model, padding_free)
    if settings.offload_embedding == "auto":
        _offload_embedding_where_safe(peft_model)
    elif settings.offload_embedding:
        from velotune.memory.embedding_offload import offload_input_embeddings

        offload_input_embeddings(peft_model)
    _attach_methods(peft_model)


FULL_TRAIN_MODULES = ("embed_tokens", "lm_head")  # named in target_modules: trained in full, as in Unsloth


def _resolve_target_modules(model, target_modules) -> tuple[list[str] | str, list[str]]:
    """(LoRA targets, modules to train in full): `embed_tokens` / `lm_head` move to the second list."""
    if target_modules is None:
        target_modules = DEFAULT_TARGET_MODULES
    if isinstance(target_modules, str):
        return target_modules, []  # "all-linear" or a regex: PEFT interprets it
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    resolved: list[str] = []
    full: list[str] = []
    for name in target_modules:
        if name in FULL_TRAIN_MODULES and name in leaf_names:
            if name not in full:
                full.append(name)
            continue
        if name not in leaf_names and _FUSED_NAMES.get(name) in leaf_names:
            name = _FUSED_NAMES[name]
        if name not in leaf_names:
            raise ValueError(
                f"target module {name!r} not found in {type(model).__name__}; "
                f"linear layers there: {sorted(n for n in leaf_names if n.endswith('proj'))}"
            )
        if name not in resolved:
            resolved.append(name)
    if not resolved:
        raise ValueError(
            f"target_modules={list(target_modules)!r} leaves no layer for LoRA ({', '.join(full)} train in full): "
            "add projections (e.g. q_proj, v_proj)"
        )
    return resolved, full


def _offload_embedding_where_safe(model) -> bool:
    """offload_embedding="auto": offload a frozen, untied input table of a model on a CUDA device,
    outside distributed runs (FSDP/DDP place parameters themselves); leave anything else as it is."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is None or weight.device.type != "cuda" or weight.requires_grad:
        return False
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        return False
    from velotune.memory.embedding_offload import offload_input_embeddings

    try:
        offload_input_embeddings(model)  # refuses (and changes nothing) for tied or unusual tables
    except ValueError as e:
        log.info("velotune: input embeddings stay on the GPU (%s)", e)
        return False
    return True


def _attach_methods(model) -> None:
    """Bind save_pretrained_merged / save_pretrained_gguf / push_to_hub_* onto this instance."""
    try:
        from velotune.export import attach_export_methods
    except ImportError:  # export layer not installed yet in this build
        return
    attach_export_methods(model)
