"""velotune's notices reach the user: one handler on the "velotune" logger, INFO and up, to stderr.

    import velotune            # installs the handler (once; importing again adds none)

Every velotune module logs to `logging.getLogger("velotune")`. Without a handler, Python would print
only WARNING and up, in its bare "last resort" format, and notices such as a RoPE change or a
memory estimate would be lost. `install_handler` adds exactly one `NoticeHandler` to that logger and
sets its level to INFO unless the application set one. Nothing else is configured: other libraries'
loggers keep their levels and handlers, and the root logger is untouched.

Records still propagate to the root logger, so applications (and pytest's caplog) see them as
usual. When the application has configured console logging itself (a root handler writing to
stdout or stderr, e.g. `logging.basicConfig()`), the notice handler stays quiet, so nothing is
printed twice. To silence velotune: `logging.getLogger("velotune").setLevel(logging.WARNING)`.

`quiet_deprecations()` wraps velotune's own calls into transformers / PEFT that make those libraries
warn about their own renamed APIs (PEFT reading `is_gradient_checkpointing`, ...): the user did not
write those calls and cannot act on the warning. Only the messages in DEPRECATIONS, only inside the
block (`warnings.catch_warnings`); the same warnings from the user's own code still show.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings

LOGGER_NAME = "velotune"


class NoticeHandler(logging.StreamHandler):
    """Writes `message` lines to the current `sys.stderr` (looked up at each record, so redirections
    made after import are followed), unless the root logger already prints to the console."""

    def __init__(self):
        super().__init__(stream=sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(LOGGER_NAME) and _root_prints(record):
            return
        super().emit(record)


def _root_prints(record: logging.LogRecord) -> bool:
    """Whether a record propagating from the velotune logger is printed to the console by a root handler."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.propagate:
        return False
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        if stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__) and record.levelno >= handler.level:
            return True
    return False


def install_handler() -> logging.Logger:
    """Add the notice handler to the "velotune" logger (idempotent) and return the logger.

    Its level becomes INFO only where nobody set one (NOTSET); an application's choice is kept."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, NoticeHandler) for h in logger.handlers):
        handler = NoticeHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return logger


# (category, message regex) of deprecations raised inside velotune's calls into other libraries.
DEPRECATIONS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),  # PEFT's PeftModel.__init__ (transformers 5)
    (FutureWarning, r"`gradient_checkpointing_enable` is deprecated"),  # PEFT's prepare helpers (transformers 5)
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated"),  # importing PEFT's dependencies
)


@contextlib.contextmanager
def quiet_deprecations():
    """Inside the block, ignore the DEPRECATIONS warnings (and nothing else); restored on exit."""
    with warnings.catch_warnings():
        for category, pattern in DEPRECATIONS:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        yield
