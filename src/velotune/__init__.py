"""velotune: fast, exact LLM fine-tuning.

    from velotune import FastLanguageModel
    model, tokenizer = FastLanguageModel.from_pretrained("path/or/hub-id")   # or FastModel (the same loader)
    model = FastLanguageModel.get_peft_model(model, r=16)

Heavy submodules are imported lazily so `import velotune` stays cheap and a user's import order
never matters.
"""

from __future__ import annotations

import importlib

from velotune.device import is_bfloat16_supported
from velotune.loader import FastLanguageModel, FastModel, FastVisionModel
from velotune.log import install_handler

install_handler()  # velotune's notices (RoPE, memory estimate, ...) are printed: velotune/log.py

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "get_chat_template": "velotune.data.chat_templates",
    "standardize_sharegpt": "velotune.data.formats",
    "standardize_data_formats": "velotune.data.formats",
    "apply_chat_template": "velotune.data.custom_template",
    "to_sharegpt": "velotune.data.formats",
    "load_dataset_file": "velotune.data.formats",
    "train_on_responses_only": "velotune.data.masking",
    "PatchDPOTrainer": "velotune.train.trl_glue",
    "UnslothTrainer": "velotune.train.unsloth_trainer",
    "UnslothTrainingArguments": "velotune.train.unsloth_trainer",
    "OffloadedAdamW": "velotune.memory.offload_adamw",
    "report": "velotune.models.report",
    "unpatch": "velotune.models.patch",
}

__all__ = ["FastLanguageModel", "FastModel", "FastVisionModel", "is_bfloat16_supported", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'velotune' has no attribute {name!r}")
