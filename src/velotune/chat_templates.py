"""Unsloth's `unsloth.chat_templates` names under the same module path, so that a script switches with its imports:

    from velotune.chat_templates import get_chat_template, standardize_sharegpt, train_on_responses_only

Each name is velotune's own function (the same object as `velotune.<name>`); see velotune.data for the
contracts.
"""

from __future__ import annotations

from velotune.data.chat_templates import get_chat_template
from velotune.data.custom_template import apply_chat_template
from velotune.data.formats import standardize_data_formats, standardize_sharegpt, to_sharegpt
from velotune.data.masking import train_on_responses_only

__all__ = [
    "apply_chat_template",
    "get_chat_template",
    "standardize_data_formats",
    "standardize_sharegpt",
    "to_sharegpt",
    "train_on_responses_only",
]
