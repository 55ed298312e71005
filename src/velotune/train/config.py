"""The YAML training config: a pydantic schema that rejects unknown keys and bad values.

    cfg = load_config("examples/sft.yaml")     # raises ConfigError("sft.yaml: training.learnig_rate: ...")
    cfg = TrainConfig(model={"name": "path/to/model"}, data={"path": "train.jsonl"})   # from Python

Layout (every section but `model` and `data` has defaults):

    model:    name, max_seq_length, dtype, load_in_4bit, full_finetuning, fast, padding_free
    lora:     r, alpha, dropout, target_modules, use_rslora, use_dora, modules_to_save, gradient_checkpointing,
              offload_embedding, recompute, cuda_graphs, mlp_row_blocks
    data:     path, format, chat_template, train_on, on_long, on_bad, packing, eval_path
    method:   sft | dpo | orpo
    training: epochs | max_steps, batch_size, gradient_accumulation_steps, learning_rate,
              embedding_learning_rate, lr_scheduler, warmup_steps, weight_decay, seed, ...
    output_dir

Relative paths in a YAML file are read relative to the folder of that file.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from velotune.errors import ConfigError

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name: str = Field(description="local model folder (safetensors) or a Hugging Face hub id")
    max_seq_length: int = Field(2048, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    load_in_4bit: bool = False
    full_finetuning: bool = False
    fast: bool = Field(True, description="use velotune's fused kernels (False: the stock transformers forward)")
    padding_free: bool = Field(
        True,
        description="padded batches run on their real tokens only, packed into one "
        "row (same loss and gradients); false: as padded",
    )


class LoraSection(_Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Union[list[str], str] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] = Field(
        default_factory=list, description="modules trained in full, e.g. [embed_tokens, lm_head]"
    )
    gradient_checkpointing: Union[bool, Literal["unsloth", "offload"]] = "unsloth"
    offload_embedding: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="frozen input embeddings in host memory (~1 GiB less GPU memory for Llama-3); auto: "
        "where the table is frozen, untied and on a GPU",
    )
    recompute: Union[Literal["layer", "mlp"], None] = Field(
        None,
        description="with unsloth/offload checkpointing: 'mlp' (the default there) also offloads attention "
        "activations to host memory and recomputes only the MLP (faster, ~4.5x host memory); "
        "'layer' recomputes whole layers",
    )
    cuda_graphs: bool = Field(
        False,
        description="with unsloth/offload checkpointing: decoder layers replayed "
        "as CUDA graphs (for fixed-shape batches; padding-free batches "
        "change shape every step and run eagerly)",
    )
    mlp_row_blocks: int = Field(
        1,
        ge=1,
        description="with recompute 'mlp': each MLP forward and backward in "
        "this many row blocks (less GPU memory, a little slower)",
    )
    random_state: int = 3407


class DataSection(_Section):
    path: str
    format: Literal["auto", "messages", "sharegpt", "alpaca", "preference", "text"] = "auto"
    chat_template: str | None = Field(None, description="a velotune template name; None keeps the tokenizer's")
    train_on: Literal["responses", "all"] = "responses"
    on_long: Literal["truncate", "skip"] = "truncate"
    on_bad: Literal["skip", "raise"] = Field(
        "skip", description="unusable rows (not UTF-8, turns out of order, empty, ...): skip and count them, or stop"
    )
    packing: bool = False
    eval_path: str | None = None
    text_field: str = Field("text", description="column holding the raw text (format: text)")


class TrainingSection(_Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="> 0 overrides epochs")
    batch_size: int = Field(2, gt=0, description="per device, per micro-batch")
    gradient_accumulation_steps: int = Field(4, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    embedding_learning_rate: float | None = Field(
        None, gt=0, description="learning rate of trainable embed_tokens / lm_head (continued pretraining)"
    )
    lr_scheduler: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt"
    ] = "linear"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="warmup as a fraction of all steps")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0, description="0 disables clipping")
    optimizer: str = Field(
        "adamw_torch",
        description="a transformers `optim` name, e.g. adamw_8bit, sgd; or "
        "adamw_offload: velotune's AdamW with its moments in host "
        "memory (the same bits as adamw_torch)",
    )
    seed: int = 3407
    logging_steps: int = Field(1, gt=0)
    save_steps: int | None = Field(None, gt=0, description="save a resumable checkpoint every N steps")
    save_total_limit: int | None = Field(2, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    report_to: Union[list[Literal["tensorboard", "wandb", "none"]], Literal["tensorboard", "wandb", "none"]] = "none"
    resume_from_checkpoint: Union[bool, str, None] = Field(
        None, description="true: the latest checkpoint in output_dir; or a checkpoint folder"
    )
    beta: float = Field(0.1, gt=0, description="DPO beta / ORPO lambda")
    use_cpu: bool = Field(False, description="train on the CPU even when a GPU is present")


class TrainConfig(_Section):
    model: ModelSection
    data: DataSection
    lora: LoraSection = Field(default_factory=LoraSection)
    method: Literal["sft", "dpo", "orpo"] = "sft"
    training: TrainingSection = Field(default_factory=TrainingSection)
    output_dir: str = "outputs/velotune-run"

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        fmt = self.data.format
        if self.method in ("dpo", "orpo") and fmt not in ("auto", "preference"):
            raise ValueError(
                f"data.format: method {self.method} needs preference data (prompt/chosen/rejected), not format {fmt!r}"
            )
        if self.method == "sft" and fmt == "preference":
            raise ValueError("data.format: 'preference' data needs method dpo or orpo, not sft")
        if self.method != "sft" and self.data.packing:
            raise ValueError(f"data.packing: packing is supported for sft only, not {self.method}")
        offloaded = self.lora.gradient_checkpointing in ("unsloth", "offload")
        recompute = self.lora.recompute or ("mlp" if offloaded else "layer")  # None: the library's default
        if recompute != "layer" and not offloaded:
            raise ValueError(
                f"lora.recompute: {self.lora.recompute!r} needs lora.gradient_checkpointing: unsloth "
                f"(or offload), not {self.lora.gradient_checkpointing!r}"
            )
        if self.lora.mlp_row_blocks != 1 and recompute != "mlp":
            raise ValueError(
                f"lora.mlp_row_blocks: {self.lora.mlp_row_blocks} needs lora.recompute: mlp, not {recompute!r}"
            )
        if self.lora.cuda_graphs and self.lora.gradient_checkpointing not in ("unsloth", "offload"):
            raise ValueError(
                f"lora.cuda_graphs: true needs lora.gradient_checkpointing: unsloth (or offload), "
                f"not {self.lora.gradient_checkpointing!r}"
            )
        if self.training.warmup_steps and self.training.warmup_ratio:
            raise ValueError("training.warmup_ratio: set warmup_steps or warmup_ratio, not both")
        if self.training.embedding_learning_rate is not None and not (
            self.model.full_finetuning or self.lora.modules_to_save
        ):
            raise ValueError(
                "training.embedding_learning_rate: set lora.modules_to_save (e.g. [embed_tokens, "
                "lm_head]) or model.full_finetuning so that embeddings are trained"
            )
        return self


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; allowed keys: {', '.join(allowed)}" if allowed else ""


def _section_fields(loc: tuple) -> list[str]:
    """Allowed keys of the section at `loc` (the path up to the bad key)."""
    cls: Any = TrainConfig
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        cls = field.annotation
    return list(cls.model_fields)


def _is_union_tag(part: Any) -> bool:
    """pydantic adds the member type ('bool', "literal['a','b']", 'list[str]') to the location of union errors."""
    return isinstance(part, str) and ("[" in part or part in {"bool", "str", "int", "float", "none", "dict", "list"})


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    """One readable line per bad key: `source: section.key: what is wrong`."""
    problems: dict[str, list[str]] = {}
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p != "__root__" and not _is_union_tag(p))
        where = ".".join(str(p) for p in loc) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            section = ".".join(str(p) for p in loc[:-1]) or "the top level"
            msg = f"unknown key in {section}{_suggest(str(loc[-1]), _section_fields(loc[:-1]))}"
        elif kind == "missing":
            msg = "missing required key"
        elif kind == "value_error":  # from our own validators: the message starts with the key it is about
            text = str(e.get("ctx", {}).get("error", e["msg"]))
            where, _, msg = text.partition(": ") if ": " in text else (where, "", text)
        else:
            msg = e["msg"].removeprefix("Input should be ")
        problems.setdefault(where, [])
        if msg not in problems[where]:
            problems[where].append(
                (msg, e.get("input")) if kind not in ("extra_forbidden", "missing", "value_error") else msg
            )
    lines = []
    for where, msgs in problems.items():
        plain = [m for m in msgs if isinstance(m, str)]
        typed = [m for m in msgs if not isinstance(m, str)]
        if typed:  # "should be X; or Y (got Z)" -- union members are alternatives
            got = typed[0][1]
            got_s = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            plain.append("should be " + "; or ".join(m for m, _ in typed) + got_s)
        lines.append(f"{source}: {where}: {'; '.join(plain)}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "config", base_dir: str | Path | None = None) -> TrainConfig:
    """Validate a dict (e.g. parsed YAML); relative paths are resolved against `base_dir`."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections (model, data, lora, training, ...), got {type(data).__name__}"
        )
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
    if base_dir is not None:
        _resolve_paths(cfg, Path(base_dir))
    return cfg


def _resolve_paths(cfg: TrainConfig, base: Path) -> None:
    def resolve(p: str) -> str:
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    cfg.data.path = resolve(cfg.data.path)
    if cfg.data.eval_path:
        cfg.data.eval_path = resolve(cfg.data.eval_path)
    cfg.output_dir = resolve(cfg.output_dir)
    if isinstance(cfg.training.resume_from_checkpoint, str):
        cfg.training.resume_from_checkpoint = resolve(cfg.training.resume_from_checkpoint)
    # A model name is a folder when it looks like a path or exists next to the config; else a hub id.
    name = cfg.model.name
    local = base / Path(name).expanduser()
    if name.startswith((".", "/", "~")) or local.exists():
        cfg.model.name = resolve(name)


def check_paths(cfg: TrainConfig, source: str = "config") -> None:
    """Missing data files and model folders are config errors, reported before anything loads."""
    for key, value in (("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path)):
        if value and not Path(value).exists():
            raise ConfigError(f"{source}: {key}: data file {value} does not exist")
    name = cfg.model.name
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise ConfigError(f"{source}: model.name: model folder {name} does not exist")
    resume = cfg.training.resume_from_checkpoint
    if isinstance(resume, str) and not Path(resume).is_dir():
        raise ConfigError(f"{source}: training.resume_from_checkpoint: checkpoint folder {resume} does not exist")


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML config; every problem is a ConfigError with a readable one-line message."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path.name}: not valid YAML{where}: {problem}") from None
    cfg = parse_config(data, source=path.name, base_dir=path.resolve().parent)
    check_paths(cfg, source=path.name)
    return cfg
