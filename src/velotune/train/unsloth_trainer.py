"""`UnslothTrainer` / `UnslothTrainingArguments`: the names Unsloth scripts use, as velotune's own.

    from velotune import UnslothTrainer, UnslothTrainingArguments
    trainer = UnslothTrainer(
        model=model, tokenizer=tokenizer, train_dataset=ds, dataset_text_field="text", max_seq_length=2048,
        args=UnslothTrainingArguments(learning_rate=5e-5, embedding_learning_rate=5e-6, max_steps=100, ...),
    )

`UnslothTrainingArguments` is TRL's `SFTConfig` plus `embedding_learning_rate`: the learning rate of
the trainable input / output embedding parameters (`embed_tokens` / `lm_head` trained in full through
`modules_to_save`, or their LoRA factors), typically 2-10x below `learning_rate` for continued
pretraining. None: one learning rate for everything. It takes the older argument names too
(`warmup_ratio`, `max_seq_length`, ...; velotune.trl_compat.map_config_kwargs).

`UnslothTrainer` is TRL's `SFTTrainer` with velotune's trainer glue (train/trl_glue.py): the embedding
parameters move into their own optimizer param groups at `embedding_learning_rate` (each group
otherwise keeps transformers' settings, weight decay included, and follows the same schedule), exact
token normalisation under gradient accumulation, atomic checkpoints. It accepts the older keyword
arguments Unsloth's notebooks pass (`tokenizer=`, `dataset_text_field=`, `max_seq_length=`,
`packing=`, `dataset_num_proc=`), with or without velotune.trl_compat installed.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

from trl import SFTConfig, SFTTrainer

from velotune.errors import ConfigError
from velotune.train.trl_glue import VelotuneTrainerMixin
from velotune.trl_compat import map_config_kwargs, map_trainer_kwargs


@dataclasses.dataclass
class UnslothTrainingArguments(SFTConfig):
    """TRL's SFTConfig plus `embedding_learning_rate` (module docstring)."""

    embedding_learning_rate: float | None = dataclasses.field(
        default=None,
        metadata={"help": "Learning rate of the trainable embed_tokens / lm_head parameters (None: learning_rate)."},
    )

    def __post_init__(self):
        super().__post_init__()
        lr = self.embedding_learning_rate
        if lr is not None and not (isinstance(lr, (int, float)) and lr >= 0):
            raise ConfigError(f"embedding_learning_rate must be a number >= 0 (or None), got {lr!r}")


def _accept_older_names(cls: type) -> None:
    generated = cls.__init__

    @functools.wraps(generated)
    def __init__(self, *args, **kwargs):
        generated(self, *args, **map_config_kwargs(cls, kwargs))

    cls.__init__ = __init__


_accept_older_names(UnslothTrainingArguments)


def _sft_params() -> list[str]:
    return list(inspect.signature(SFTTrainer.__init__).parameters)[1:]  # (follows a trl_compat wrapper's __wrapped__)


class UnslothTrainer(VelotuneTrainerMixin, SFTTrainer):
    """TRL's SFTTrainer with velotune's glue and `args.embedding_learning_rate` (module docstring)."""

    def __init__(self, *args, embedding_learning_rate: float | None = None, **kwargs):
        params = _sft_params()
        if len(args) > len(params):
            raise TypeError(f"UnslothTrainer() takes {len(params)} positional arguments but {len(args)} were given")
        kwargs = map_trainer_kwargs(SFTConfig, params, {**dict(zip(params, args)), **kwargs}, where="UnslothTrainer")
        from_args = getattr(kwargs.get("args"), "embedding_learning_rate", None)
        if embedding_learning_rate is not None and from_args is not None and embedding_learning_rate != from_args:
            raise ConfigError(
                f"UnslothTrainer: embedding_learning_rate={embedding_learning_rate!r} given, but "
                f"args.embedding_learning_rate is {from_args!r}; set it in one place"
            )
        lr = embedding_learning_rate if embedding_learning_rate is not None else from_args
        super().__init__(embedding_learning_rate=lr, **kwargs)
