"""Unsloth's keywords on velotune's loader: which are honoured, which are accepted and reported, which refused.

    opts = take_unsloth_options(kwargs)        # pops them; the rest of kwargs go to transformers
    opts.report()                              # one INFO line per group of keywords without effect

`from_pretrained` honours `load_in_8bit`, `load_in_16bit`, `full_finetuning`, `token`, `device_map`,
`revision`, `trust_remote_code`, `rope_scaling` and `resize_model_vocab` as parameters of its own
(velotune.loader). This module takes the rest of Unsloth's signature out of `**kwargs`, so that none
reaches the model's constructor as a TypeError:

* vLLM engine settings (VLLM_ONLY): velotune has no vLLM engine (`fast_inference=True` means its own
  decode path); accepted and named in one line.
* Unsloth internals with no velotune counterpart (NO_EFFECT): accepted and named in one line, with
  where velotune's equivalent lives when it has one.
* `use_exact_model_name`: velotune always loads the exact name it is given (honoured, silent).
* Features velotune does not have (`load_in_fp8`, `qat_scheme`, an `auto_model` other than a
  causal LM): ConfigError, one line.

Also here: `vision_problem` (image-text models are refused with one line until supported) and
`targets_from_finetune_flags` (FastModel.get_peft_model's finetune_* switches -> target_modules).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from velotune.errors import ConfigError

log = logging.getLogger("velotune")

VLLM_ONLY = ("gpu_memory_utilization", "max_lora_rank", "float8_kv_cache", "disable_log_stats")
# keyword -> where velotune's counterpart lives ("" : none needed)
NO_EFFECT = {
    "fix_tokenizer": "",
    "random_state": "get_peft_model(random_state=...) seeds the adapters",
    "use_gradient_checkpointing": "get_peft_model(use_gradient_checkpointing=...)",
    "offload_embedding": "get_peft_model(offload_embedding=...)",
    "float32_mixed_precision": "",
    "unsloth_tiled_mlp": "get_peft_model(mlp_row_blocks=...)",
    "unsloth_force_compile": "",
    "return_logits": "",
    "fullgraph": "",
    "text_only": "",
    "whisper_language": "",
    "whisper_task": "",
    "target_parameters": "",
}
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
FINETUNE_FLAGS = (
    "finetune_vision_layers",
    "finetune_language_layers",
    "finetune_attention_modules",
    "finetune_mlp_modules",
)


@dataclass
class UnslothOptions:
    """The Unsloth-only keywords one from_pretrained call was given (values as passed)."""

    vllm: dict = field(default_factory=dict)
    no_effect: dict = field(default_factory=dict)

    def report(self) -> None:
        """One INFO line per non-empty group, naming each keyword and its value."""
        if self.vllm:
            log.info(
                "velotune: vLLM engine settings accepted without effect (velotune decodes without vLLM): %s",
                _listing(self.vllm),
            )
        if self.no_effect:
            shown = ", ".join(
                f"{k}={v!r}" + (f" (velotune: {NO_EFFECT[k]})" if NO_EFFECT[k] else "")
                for k, v in self.no_effect.items()
            )
            log.info("velotune: Unsloth options accepted without effect here: %s", shown)


def _listing(values: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def take_unsloth_options(kwargs: dict) -> UnslothOptions:
    """Pop Unsloth-only keywords from `kwargs` (in place) and return them; refuse the ones naming
    features velotune lacks (ConfigError). Keywords not listed here stay in `kwargs`."""
    opts = UnslothOptions()
    for name in VLLM_ONLY:
        if name in kwargs:
            opts.vllm[name] = kwargs.pop(name)
    for name in NO_EFFECT:
        if name in kwargs:
            opts.no_effect[name] = kwargs.pop(name)
    kwargs.pop("use_exact_model_name", None)  # velotune never maps names to other checkpoints
    fp8 = kwargs.pop("load_in_fp8", False)
    if fp8:
        raise ConfigError(
            f"load_in_fp8={fp8!r}: velotune has no FP8 training; use load_in_4bit=True, load_in_8bit=True or 16-bit"
        )
    qat = kwargs.pop("qat_scheme", None)
    if qat is not None:
        raise ConfigError(f"qat_scheme={qat!r}: velotune has no quantisation-aware training")
    auto_model = kwargs.pop("auto_model", None)
    if auto_model is not None and getattr(auto_model, "__name__", "") != "AutoModelForCausalLM":
        raise ConfigError(
            f"auto_model={getattr(auto_model, '__name__', auto_model)}: velotune loads causal language "
            "models only (AutoModelForCausalLM)"
        )
    return opts


def vision_problem(config) -> str | None:
    """Why `config` is not a text-only causal LM velotune can train (None: it is one): a vision or
    audio tower (vision_config / audio_config), or a model type transformers maps to image-text-to-text."""
    for key in ("vision_config", "audio_config"):
        if getattr(config, key, None) is not None:
            return f"its config has a {key}"
    model_type = getattr(config, "model_type", None)
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    except ImportError:  # pragma: no cover - a transformers without the mapping
        return None
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return f"transformers lists {model_type!r} as an image-text-to-text model"
    return None


def targets_from_finetune_flags(flags: dict) -> tuple[str, ...] | None:
    """FastModel.get_peft_model's switches (Unsloth's `finetune_*_modules/layers`) -> target modules.

    `flags` holds the switches that were given. None when none was. A text-only model has no
    vision layers (`finetune_vision_layers` changes nothing); `finetune_language_layers=False`, or
    turning both attention and MLP off, leaves nothing to train: ConfigError."""
    if not flags:
        return None
    if flags.get("finetune_language_layers", True) is False:
        raise ConfigError(
            "finetune_language_layers=False: a text-only model has only language layers, nothing would be trained"
        )
    targets = (ATTENTION_MODULES if flags.get("finetune_attention_modules", True) else ()) + (
        MLP_MODULES if flags.get("finetune_mlp_modules", True) else ()
    )
    if not targets:
        raise ConfigError("finetune_attention_modules=False and finetune_mlp_modules=False: nothing would be trained")
    return targets
