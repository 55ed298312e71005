"""velotune/log.py: one handler on the "velotune" logger prints its notices (INFO and up) to stderr,
nothing is printed twice when the application logs to the console itself, other loggers are left
alone, and the deprecation warnings velotune's own calls into PEFT/transformers raise stay quiet."""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from mini import save_mini_model

from velotune.log import NoticeHandler, install_handler, quiet_deprecations

SRC = Path(__file__).resolve().parents[1] / "src"


def _handlers():
    return [h for h in logging.getLogger("velotune").handlers if isinstance(h, NoticeHandler)]


def test_import_installs_one_handler_at_info():
    importlib.import_module("velotune")
    assert len(_handlers()) == 1
    install_handler()
    install_handler()
    assert len(_handlers()) == 1
    assert logging.getLogger("velotune").getEffectiveLevel() == logging.INFO


def test_notices_reach_stderr_in_a_fresh_process():
    """As a user sees it: with no logging set up by the application, an INFO notice is printed once;
    after the application sets up console logging (basicConfig), its handler prints, not twice."""
    code = (
        "import logging, velotune\n"
        "logging.getLogger('velotune').info('velotune: a notice')\n"
        "logging.getLogger('velotune').debug('velotune: not shown')\n"
        "logging.getLogger('transformers').info('not ours, not shown')\n"
        "logging.basicConfig(format='app: %(message)s')\n"
        "logging.getLogger('velotune').warning('velotune: once')\n"
    )
    env = {"PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == ["velotune: a notice", "app: velotune: once"]


def test_handler_writes_to_the_current_stderr_and_leaves_other_loggers_alone(capsys):
    root_handlers = list(logging.getLogger().handlers)
    transformers_level = logging.getLogger("transformers").level
    install_handler()
    logging.getLogger("velotune").info("velotune: hello")
    assert "velotune: hello" in capsys.readouterr().err
    assert logging.getLogger().handlers == root_handlers
    assert logging.getLogger("transformers").level == transformers_level


def test_an_application_level_is_kept():
    logger = logging.getLogger("velotune")
    old = logger.level
    try:
        logger.setLevel(logging.WARNING)
        install_handler()
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(old)


def test_quiet_deprecations_hides_only_the_listed_warnings():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_deprecations():
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
            warnings.warn("something else is deprecated", FutureWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
    assert [str(w.message)[:30] for w in seen] == ["something else is deprecated", "`is_gradient_checkpointing` is"]


def test_get_peft_model_and_adapter_loading_raise_no_deprecation_warnings(tmp_path):
    from velotune import FastLanguageModel

    path = save_mini_model("llama", tmp_path)
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        peft = FastLanguageModel.get_peft_model(model, r=4)
        peft.save_pretrained(tmp_path / "adapter")
        FastLanguageModel.from_pretrained(tmp_path / "adapter", dtype=torch.float32)
        FastLanguageModel.get_peft_model(
            FastLanguageModel.from_pretrained(path, dtype=torch.float32)[0], r=4, use_gradient_checkpointing=True
        )
    deprecations = [str(w.message) for w in seen if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecations, deprecations
