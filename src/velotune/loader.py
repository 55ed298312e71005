"""`FastLanguageModel`: the entry point users know (from_pretrained -> get_peft_model -> train).

The objects returned are real transformers / PEFT objects. Fast paths (fused kernels, 4-bit,
offloaded checkpointing, export and inference helpers) are attached per instance by the modules
that own them, so `unpatch(model)` can always return stock behaviour.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Sequence

import torch

from velotune.device import resolve_dtype
from velotune.errors import ModelLoadError

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
_UNSAFE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt", "tokenizer.tiktoken")


def check_local_folder(path: Path) -> None:
    """Refuse model folders that cannot load, before anything is read into memory: no config.json,
    only pickled weights (we load safetensors and never unpickle), torn or garbage safetensors files,
    shards named by the index but missing, no tokenizer files."""
    from velotune.safetensors_check import check_weight_files

    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a folder")
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} has no config.json: is it a transformers model folder?")
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON ({e}); re-download or re-export the model")
    if not any(p.suffix == ".safetensors" for p in path.iterdir()):
        pickled = [p.name for p in path.iterdir() if p.suffix in _UNSAFE_WEIGHT_SUFFIXES]
        hint = f" (found pickled files {pickled}; convert them to safetensors first)" if pickled else ""
        raise ModelLoadError(f"{path} has no *.safetensors weights{hint}; velotune loads only safetensors")
    check_weight_files(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): copy them "
            "from the base model's folder (tokenizer.save_pretrained(folder))"
        )


def check_adapter_folder(path: Path) -> dict:
    """A LoRA adapter folder velotune can load: readable adapter_config.json and safetensors weights
    (a pickled adapter_model.bin is refused: it is never unpickled). Returns the adapter config."""
    from velotune.safetensors_check import check_weight_files

    cfg_path = path / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg_path} is not readable JSON ({type(e).__name__}); re-save the adapter") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_path} is not a JSON object; re-save the adapter")
    if not (path / "adapter_model.safetensors").is_file():
        pickled = [p.name for p in path.iterdir() if p.suffix in _UNSAFE_WEIGHT_SUFFIXES]
        hint = (
            f"it holds pickled weights {pickled}, which velotune never unpickles: convert them to "
            "safetensors (load them in a trusted environment and save with safe_serialization=True)"
            if pickled
            else "re-save the adapter (model.save_pretrained(folder))"
        )
        raise ModelLoadError(f"{path} has no adapter_model.safetensors; {hint}")
    check_weight_files(path, names=["adapter_model.safetensors"])
    return cfg


def _resolve_model_path(model_name: str | os.PathLike, token: str | None, revision: str | None) -> str:
    path = Path(model_name).expanduser()
    if path.exists():
        check_local_folder(path)
        return str(path)
    name = str(model_name)
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ModelLoadError(f"model folder {name!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        # Fetch only what we load: config, tokenizer and safetensors weights.
        return snapshot_download(
            name,
            token=token,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        )
    except Exception as e:  # network errors, offline mode, missing repo, gated repo
        raise ModelLoadError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Without network access, pass a local model folder instead."
        ) from None


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


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def load_config(auto_config, path: str, trust_remote_code: bool):
    """AutoConfig, with transformers' refusals (remote code, unknown model_type) as one-line ModelLoadErrors."""
    try:
        return auto_config.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        text = str(e)
        if "trust_remote_code" in text:
            raise ModelLoadError(
                f"{path}: this model needs its own Python code (auto_map in config.json), which velotune does not "
                "run by default; use a model whose architecture transformers ships, or, if you trust its code, "
                "pass trust_remote_code=True from Python"
            ) from e
        model_type = _config_value(path, "model_type")
        if model_type is not None and ("model type" in text or "Unrecognized" in text):
            import transformers

            raise ModelLoadError(
                f"{path}/config.json: model_type {model_type!r} is not known to transformers "
                f"{transformers.__version__}: fix model_type, upgrade transformers, or use a supported model"
            ) from e
        raise ModelLoadError(f"{path}/config.json: {_first_line(e)}") from e


def _config_value(path: str, key: str):
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def check_coverage(path: Path, config) -> None:
    from velotune.safetensors_check import missing_weights

    missing = missing_weights(path, config)
    if missing:
        raise ModelLoadError(_missing_message(path, missing))


def _missing_message(path, missing: list[str]) -> str:
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return (
        f"{path}: the safetensors files lack {len(missing)} weight(s) the model needs ({shown}); "
        "the folder is incomplete: re-download or re-export the model"
    )


def _load_weights(auto_model, path: str, config, load_kwargs: dict):
    """The model, refusing weights the files do not cover (transformers would leave them random with
    only a warning) and reporting unreadable files as one line."""
    from safetensors import SafetensorError

    try:
        model, info = auto_model.from_pretrained(path, config=config, output_loading_info=True, **load_kwargs)
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(
            f"{path}: the weights do not load ({_first_line(e)}); re-download or re-export the model"
        ) from e
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelLoadError(_missing_message(path, missing))
    return model


class FastLanguageModel:
    """Namespace of static constructors, as in the libraries users switch from."""

    @staticmethod
    def from_pretrained(
        model_name: str | os.PathLike,
        max_seq_length: int = 2048,
        dtype: Any = None,
        load_in_4bit: bool = False,
        *,
        full_finetuning: bool = False,
        fast: bool = True,
        device_map: Any = None,
        token: str | None = None,
        revision: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        memory_cap: int | str | None = None,
        padding_free: bool = True,
        **kwargs,
    ):
        """Load a causal LM and its tokenizer.

        Returns `(model, tokenizer)`. `dtype=None` picks bf16 where supported, fp16 on older GPUs
        and float32 on CPU; an explicit dtype is honoured everywhere. `fast=False` keeps the stock
        transformers forward (useful for A/B checks).

        Before anything is allocated, the training memory is estimated from the config
        (velotune.fit: weights, adapters + AdamW, activations for `max_seq_length` tokens under
        offloaded checkpointing) and ModelLoadError names the estimate and what would fit when it
        exceeds `memory_cap` (bytes or e.g. "16GiB"; default: the free memory of the current CUDA
        device; no check on CPU unless given, nor with an explicit `device_map`). The estimate is
        kept at `model.velotune_memory_estimate`.
        `padding_free` (with fast=True): a padded batch in a forward without a KV cache (training,
        TRL's trainers, scoring) runs on its real tokens only, packed into one row with attention
        kept inside each sample (velotune.models.padding_free): the same loss, gradients and logits
        at real positions as the padded batch; False runs padded batches as they come.
        """
        if not isinstance(padding_free, bool):
            raise ValueError(f"padding_free={padding_free!r}: use True or False")
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        compute_dtype = resolve_dtype(dtype)
        path = _resolve_model_path(model_name, token, revision)
        config = load_config(AutoConfig, path, trust_remote_code)
        estimate = _check_fit(
            config, memory_cap, device_map, compute_dtype, load_in_4bit, max_seq_length, full_finetuning
        )
        if Path(path).is_dir():
            check_coverage(Path(path), config)
        load_kwargs: dict[str, Any] = dict(
            dtype=compute_dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs
        )
        if attn_implementation is not None:  # None: transformers picks (SDPA where the family allows it)
            load_kwargs["attn_implementation"] = attn_implementation
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        if load_in_4bit:
            from velotune.quant import quantization_config_for

            load_kwargs = {**quantization_config_for(compute_dtype, config), **load_kwargs}  # caller's win
        model = _load_weights(AutoModelForCausalLM, path, config, load_kwargs)
        if device_map is None and not load_in_4bit and torch.cuda.is_available():
            model = model.to("cuda")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError) as e:
            raise ModelLoadError(
                f"{path}: the tokenizer files do not load ({type(e).__name__}: "
                f"{_first_line(e)}); copy them from the base model's folder"
            ) from e
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.max_seq_length = max_seq_length
        model.velotune_compute_dtype = compute_dtype
        model.velotune_memory_estimate = estimate
        model.velotune_fast = fast
        if fast:
            from velotune.models import prepare_model

            prepare_model(model, max_seq_length=max_seq_length, full_finetuning=full_finetuning)
            from velotune.models.padding_free import set_padding_free

            set_padding_free(model, padding_free)
        if full_finetuning:
            model.requires_grad_(True)
        _attach_methods(model)
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
        """
        from velotune.memory.checkpointing import check_recompute

        if recompute is None:  # offload_every recomputes whole layers
            recompute = (
                "mlp"
                if use_gradient_checkpointing in ("unsloth", "offload")
                and offload_every == 1
                and host_memory_budget is None
                else "layer"
            )
        check_recompute(recompute, mlp_row_blocks)
        if (offload_every != 1 or host_memory_budget is not None) and use_gradient_checkpointing not in (
            "unsloth",
            "offload",
        ):
            raise ValueError(
                f"offload_every={offload_every!r} needs use_gradient_checkpointing='unsloth' "
                f"(or 'offload'): got {use_gradient_checkpointing!r}"
            )
        if host_memory_budget is not None:
            from velotune.fit import parse_bytes

            host_memory_budget = parse_bytes(host_memory_budget)
        if offload_embedding not in (True, False, "auto"):
            raise ValueError(f"offload_embedding={offload_embedding!r}: use 'auto', True or False")
        if padding_free is not None and not isinstance(padding_free, bool):
            raise ValueError(f"padding_free={padding_free!r}: use True, False or None")
        if recompute != "layer" and use_gradient_checkpointing not in ("unsloth", "offload"):
            raise ValueError(
                f"recompute={recompute!r} needs use_gradient_checkpointing='unsloth' (or 'offload'): "
                f"got {use_gradient_checkpointing!r}"
            )
        if cuda_graphs and use_gradient_checkpointing not in ("unsloth", "offload"):
            raise ValueError(
                "cuda_graphs=True needs use_gradient_checkpointing='unsloth' (or 'offload'): "
                f"got {use_gradient_checkpointing!r}"
            )
        from peft import LoraConfig, get_peft_model

        if max_seq_length is not None:
            model.max_seq_length = max_seq_length
        torch.manual_seed(random_state)
        random.seed(random_state)
        targets = _resolve_target_modules(model, target_modules)
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
            modules_to_save=list(modules_to_save) if modules_to_save else None,
            task_type="CAUSAL_LM",
            **kwargs,
        )
        # PEFT keeps the adapter weights in fp32 (master weights: AdamW updates of bf16 weights would
        # round away); the fused LoRA functions cast A and B (r x d, tiny) to the compute dtype at use.
        peft_model = get_peft_model(model, config)
        from velotune.memory.checkpointing import enable_checkpointing  # here: `import velotune` stays cheap

        enable_checkpointing(
            peft_model,
            use_gradient_checkpointing,
            cuda_graphs,
            recompute,
            mlp_row_blocks,
            offload_every,
            host_memory_budget,
        )
        from velotune.models import prepare_peft_model

        prepare_peft_model(peft_model)
        if padding_free is None and cuda_graphs:
            padding_free = False  # graphs replay fixed shapes; padding-free batches change shape every step
        if padding_free is not None:
            from velotune.models.padding_free import set_padding_free

            set_padding_free(peft_model, padding_free)
        if offload_embedding == "auto":
            _offload_embedding_where_safe(peft_model)
        elif offload_embedding:
            from velotune.memory.embedding_offload import offload_input_embeddings

            offload_input_embeddings(peft_model)
        _attach_methods(peft_model)
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


def _resolve_target_modules(model, target_modules) -> list[str] | str:
    if target_modules is None:
        target_modules = DEFAULT_TARGET_MODULES
    if isinstance(target_modules, str):
        return target_modules  # "all-linear" or a regex: PEFT interprets it
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    resolved: list[str] = []
    for name in target_modules:
        if name not in leaf_names and _FUSED_NAMES.get(name) in leaf_names:
            name = _FUSED_NAMES[name]
        if name not in leaf_names:
            raise ValueError(
                f"target module {name!r} not found in {type(model).__name__}; "
                f"linear layers there: {sorted(n for n in leaf_names if n.endswith('proj'))}"
            )
        if name not in resolved:
            resolved.append(name)
    return resolved


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
