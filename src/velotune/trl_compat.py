"""Older TRL / transformers argument names on today's TRL trainers: an explicit, revertible layer.

    from velotune import trl_compat
    trl_compat.install()     # velotune's entry points call this; idempotent; one log line
    trl_compat.uninstall()   # every patched attribute back as it was

Scripts written for Unsloth (and older TRL) pass names that TRL 1.x / transformers 5 removed. After
`install()` these run; code that uses today's names runs exactly as before (its calls are passed
through untouched, the same objects):

- Trainers (SFT, DPO, ORPO, KTO, Reward, GRPO): `tokenizer=` becomes `processing_class=`; a keyword
  the trainer no longer takes but its config does (`dataset_text_field`, `max_seq_length`, `packing`,
  `dataset_num_proc`, `beta`, `max_length`, ...) moves into `args`: a new config of args' class is
  built from args' fields plus the moved values (the caller's object is not modified; plain
  TrainingArguments become the trainer's config class, as TRL's SFTTrainer itself does). A moved
  value that contradicts one set in `args` is a ConfigError, never a silent pick.
- Configs (TrainingArguments and the TRL configs above), see `map_config_kwargs`:
  `warmup_ratio=r` -> `warmup_steps=r` (transformers 5 reads a float below 1 as that ratio:
  ceil(r * total steps), the old rule; r = 1 becomes the float just below 1, whose ceil is the total),
  `max_seq_length` -> `max_length`, `evaluation_strategy` -> `eval_strategy`, `no_cuda` -> `use_cpu`,
  `per_gpu_*_batch_size` -> `per_device_*_batch_size`, `push_to_hub_token` -> `hub_token`,
  `group_by_length=True` -> `train_sampling_strategy="group_by_length"`; `overwrite_output_dir` and
  `save_safetensors=True` (no effect any more) are dropped; `save_safetensors=False` is refused;
  `max_prompt_length` / `max_completion_length` where the config has no such field are dropped with a
  warning (TRL 1.x truncates prompt and completion together at `max_length`).
- `trl.ORPOConfig` / `trl.ORPOTrainer`: the classes of `trl.experimental.orpo` (TRL 1.x keeps ORPO
  there).

Only class and module attributes change (each trainer's and config's `__init__`, the two `trl` names);
nothing is rewritten or read from the environment.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import threading
import warnings
from typing import Any

from velotune.errors import ConfigError

log = logging.getLogger("velotune")

# old name -> today's name, wherever the target class has the new field and not the old one
RENAMED = {
    "max_seq_length": "max_length",
    "evaluation_strategy": "eval_strategy",
    "no_cuda": "use_cpu",
    "per_gpu_train_batch_size": "per_device_train_batch_size",
    "per_gpu_eval_batch_size": "per_device_eval_batch_size",
    "push_to_hub_token": "hub_token",
}
# removed names whose value changes nothing today (only the value shown is accepted)
NO_EFFECT = {"overwrite_output_dir": None, "save_safetensors": True}
# removed length limits: TRL 1.x truncates prompt + completion together at max_length
TRUNCATION_LIMITS = ("max_prompt_length", "max_completion_length", "max_target_length")

# (trainer, config) names in `trl` (those a TRL release lacks are skipped)
_TRAINERS = (
    ("SFTTrainer", "SFTConfig"),
    ("DPOTrainer", "DPOConfig"),
    ("KTOTrainer", "KTOConfig"),
    ("RewardTrainer", "RewardConfig"),
    ("GRPOTrainer", "GRPOConfig"),
)

_MISSING = object()
_lock = threading.Lock()
_patches: list[tuple[Any, str, Any, Any]] = []  # (owner, attribute, original or _MISSING, what we set)


def orpo_classes():
    """(ORPOConfig, ORPOTrainer): TRL 1.x keeps ORPO in `trl.experimental.orpo` (top-level in older TRL)."""
    try:
        with warnings.catch_warnings():  # TRL warns on every trl.experimental import; velotune chose it here
            warnings.simplefilter("ignore")
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    except ImportError:  # older TRL: top-level
        from trl import ORPOConfig, ORPOTrainer
    return ORPOConfig, ORPOTrainer


def install() -> bool:
    """Install the layer (module docstring). Returns True when it was installed now, False when it already was
    (or TRL is not importable). Logs one line on the "velotune" logger when it installs."""
    with _lock:
        if _patches:
            return False
        try:
            import transformers
            import trl
        except ImportError:  # nothing to adapt
            log.debug("trl_compat: TRL is not installed; nothing to patch")
            return False
        pairs = [(getattr(trl, t, None), getattr(trl, c, None)) for t, c in _TRAINERS]
        try:
            orpo_config, orpo_trainer = orpo_classes()
            pairs.append((orpo_trainer, orpo_config))
        except ImportError:  # a TRL without ORPO
            orpo_config = orpo_trainer = None
        pairs = [(t, c) for t, c in pairs if t is not None and c is not None]
        try:
            _patch_init(transformers.TrainingArguments, _config_init)
            for trainer_cls, config_cls in pairs:
                _patch_init(config_cls, _config_init)
                _patch_init(trainer_cls, functools.partial(_trainer_init, config_cls=config_cls))
            for name, value in (("ORPOConfig", orpo_config), ("ORPOTrainer", orpo_trainer)):
                if value is not None and name not in vars(trl):  # (an older TRL has them itself)
                    _set(trl, name, value)
        except BaseException:
            _restore()
            raise
        log.info(
            "TRL compatibility on: older arguments (tokenizer=, dataset_text_field=, max_seq_length=, "
            "packing=, dataset_num_proc=, warmup_ratio=, ...) are mapped onto TRL %s / transformers %s, and "
            "trl.ORPOConfig / trl.ORPOTrainer are trl.experimental.orpo's (velotune.trl_compat.uninstall() "
            "turns this off)",
            trl.__version__,
            transformers.__version__,
        )
        return True


def uninstall() -> bool:
    """Put back every attribute `install` changed. Returns False when nothing was installed."""
    with _lock:
        if not _patches:
            return False
        _restore()
        log.debug("trl_compat: uninstalled")
        return True


def _set(owner, name: str, value) -> None:
    _patches.append((owner, name, vars(owner).get(name, _MISSING), value))
    setattr(owner, name, value)


def _restore() -> None:
    while _patches:
        owner, name, original, ours = _patches.pop()
        if vars(owner).get(name, _MISSING) is not ours:  # someone patched over it since: leave theirs
            log.warning("trl_compat: %s.%s was changed after install; left as it is", owner.__name__, name)
            continue
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)


def _patch_init(cls: type, make) -> None:
    """Wrap cls.__init__ (its own or inherited) with make(cls, original)."""
    if any(owner is cls and name == "__init__" for owner, name, _, _ in _patches):
        return
    _set(cls, "__init__", make(cls, cls.__init__))


# ----------------------------------------------------------------------------------------------- configs


@functools.lru_cache(maxsize=None)
def init_fields(cls: type) -> dict[str, dataclasses.Field]:
    """name -> Field of every constructor field of dataclass `cls`."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _MISSING


def _put(out: dict, old: str, new: str, value, where: str) -> None:
    """out[new] = value, unless out already holds a different value for new (ConfigError)."""
    if new in out and out[new] != value:
        raise ConfigError(
            f"{where}: {old}={value!r} and {new}={out[new]!r} both given; {old} is the older name of {new}: "
            f"pass only {new}"
        )
    out[new] = value


def map_config_kwargs(cls: type, kwargs: dict, *, where: str | None = None) -> dict:
    """`kwargs` for dataclass `cls` (TrainingArguments or a TRL config) with older names mapped (module
    docstring). Names `cls` has are never touched; names this table does not know are left for `cls` to
    refuse. Returns a new dict."""
    fields = init_fields(cls)
    where = where or cls.__name__
    out = {k: v for k, v in kwargs.items() if k in fields}
    for name, value in kwargs.items():
        if name in fields:
            continue
        if name == "warmup_ratio" and "warmup_steps" in fields:
            _warmup_ratio(out, value, where)
        elif name in RENAMED and RENAMED[name] in fields:
            _put(out, name, RENAMED[name], value, where)
            log.debug("%s: %s= mapped to %s=", where, name, RENAMED[name])
        elif name == "group_by_length" and "train_sampling_strategy" in fields:
            if value:
                _put(out, name, "train_sampling_strategy", "group_by_length", where)
        elif name in NO_EFFECT:
            keep = NO_EFFECT[name]
            if keep is not None and value != keep:
                raise ConfigError(
                    f"{where}: {name}={value!r} is no longer possible (transformers 5 always saves safetensors); "
                    "remove the argument"
                )
            log.debug("%s: %s=%r dropped (no effect in transformers 5)", where, name, value)
        elif name in TRUNCATION_LIMITS:
            if value is not None:
                log.warning(
                    "%s: %s=%r is not a setting of this TRL release and is ignored: prompt and completion are "
                    "truncated together at max_length=%r",
                    where,
                    name,
                    value,
                    out.get("max_length", _field_default(fields["max_length"]) if "max_length" in fields else None),
                )
        else:
            out[name] = value  # unknown here: cls raises its own TypeError
    return out


def _warmup_ratio(out: dict, ratio, where: str) -> None:
    if not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ConfigError(f"{where}: warmup_ratio must be a number in [0, 1], got {ratio!r}")
    steps = out.get("warmup_steps", 0)
    if steps:  # transformers 4: warmup_steps overrides any effect of warmup_ratio
        log.debug(
            "%s: warmup_steps=%r given, warmup_ratio=%r has no effect (as in transformers 4)", where, steps, ratio
        )
        return
    # warmup_steps < 1 is read as a ratio: ceil(ratio * total). ratio 1 -> the float below 1 (ceil = total).
    out["warmup_steps"] = ratio if ratio < 1 else math.nextafter(1.0, 0.0)


def _config_init(cls: type, original):
    fields = init_fields(cls)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if all(k in fields for k in kwargs):
            return original(self, *args, **kwargs)
        return original(self, *args, **map_config_kwargs(cls, kwargs))

    return __init__


# ---------------------------------------------------------------------------------------------- trainers


def _trainer_init(trainer_cls: type, original, *, config_cls: type):
    params = list(inspect.signature(original).parameters)[1:]  # after self
    where = trainer_cls.__name__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if all(k in params for k in kwargs):
            return original(self, *args, **kwargs)
        if len(args) > len(params):
            raise TypeError(f"{where}() takes {len(params)} positional arguments but {len(args)} were given")
        twice = [p for p in params[: len(args)] if p in kwargs]
        if twice:
            raise TypeError(f"{where}() got multiple values for argument {twice[0]!r}")
        kwargs = {**dict(zip(params, args)), **kwargs}
        return original(self, **map_trainer_kwargs(config_cls, params, kwargs, where=where))

    return __init__


def map_trainer_kwargs(config_cls: type, params, kwargs: dict, *, where: str) -> dict:
    """Keyword arguments for a trainer whose __init__ takes `params`, with `tokenizer=` as `processing_class=`
    and keywords that belong to `config_cls` moved into `args` (module docstring). Returns a new dict."""
    out = dict(kwargs)
    if "tokenizer" in out and "tokenizer" not in params and "processing_class" in params:
        tok = out.pop("tokenizer")
        if out.get("processing_class") is not None and out["processing_class"] is not tok:
            raise ConfigError(f"{where}: tokenizer= and processing_class= both given (different objects); pass one")
        out["processing_class"] = tok
    extra = {k: out.pop(k) for k in list(out) if k not in params}
    if not extra:
        return out
    mapped = map_config_kwargs(config_cls, extra, where=where)
    fields = init_fields(config_cls)
    moved = {k: v for k, v in mapped.items() if k in fields}
    out.update({k: v for k, v in mapped.items() if k not in fields})  # not ours: the trainer refuses them
    if moved and "args" in params:
        out["args"] = config_with(config_cls, out.get("args"), moved, where=where)
    else:
        out.update(moved)
    return out


def config_with(config_cls: type, args, moved: dict, *, where: str):
    """A new config of args' class (config_cls for None or plain TrainingArguments) holding args' fields and
    `moved`. A moved value that contradicts a non-default value in args is a ConfigError."""
    from transformers import TrainingArguments

    if args is None:
        return config_cls(**moved)
    if isinstance(args, config_cls):
        cls = type(args)
    elif isinstance(args, TrainingArguments):
        cls = config_cls
    else:
        raise ConfigError(f"{where}: args is a {type(args).__name__}; expected {config_cls.__name__}")
    fields = init_fields(cls)
    current = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and f.name in fields}
    for name, value in moved.items():
        have = current.get(name, _MISSING)
        if have is not _MISSING and have != value and have != _field_default(fields[name]):
            raise ConfigError(
                f"{where}: {name}={value!r} given to the trainer, but args.{name} is {have!r}; set it in one place"
            )
    current.update(moved)
    return cls(**current)
