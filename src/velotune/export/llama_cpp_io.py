"""llama-cpp-python for velotune: open a GGUF (reading back what we wrote), and llama.cpp's log.

`llama_log()` collects llama.cpp's log (its quantiser prints every tensor it converts) instead of
letting it reach stderr, so that a caller shows it only when something failed or when asked.

`extra_buffer_types=False` (the default here) turns off llama.cpp's repacked CPU weight buffers
(AMX / AVX-512 repacks of quantised tensors). Some virtual machines advertise AMX without letting a
process use it, and llama.cpp then dies with SIGILL on the first quantised matmul; velotune only
reads small outputs back, so the portable kernels are the right choice. `Llama` has no argument for
this, so the default-params factory it calls is wrapped for the duration of that one constructor
call and restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Iterator

_LOCK = threading.Lock()
_LOG_LOCK = threading.Lock()


@contextlib.contextmanager
def llama_log(verbose: bool = False) -> Iterator[list[str]]:
    """Inside: llama.cpp's log lines are appended to the yielded list (each with its newline), and
    written to stderr as they come only if `verbose`. llama.cpp has one process-wide log callback:
    the one set before is restored on exit (one `llama_log` at a time; others wait)."""
    import ctypes

    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data) -> None:
        line = text.decode("utf-8", "replace")
        lines.append(line)
        if verbose:
            sys.stderr.write(line)
            sys.stderr.flush()

    with _LOG_LOCK:
        previous, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(user_data))
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
        try:
            yield lines
        finally:
            llama_cpp.llama_log_set(previous, user_data)


def open_gguf(
    path: str | os.PathLike,
    *,
    n_ctx: int = 256,
    logits_all: bool = False,
    extra_buffer_types: bool = False,
    f32_kv_cache: bool = False,
    n_threads: int | None = None,
    vocab_only: bool = False,
):
    """A `llama_cpp.Llama` for `path` (close it with `.close()`)."""
    import llama_cpp
    import llama_cpp.llama as llama_module

    kwargs = dict(
        model_path=str(Path(path)),
        n_ctx=n_ctx,
        logits_all=logits_all,
        verbose=False,
        n_threads=n_threads or min(4, os.cpu_count() or 1),
        vocab_only=vocab_only,
    )
    if f32_kv_cache:  # transformers keeps K/V in the compute dtype; llama.cpp defaults to f16
        kwargs.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    with _LOCK:
        original = llama_module.llama_cpp.llama_model_default_params

        def params():
            p = original()
            p.use_extra_bufts = extra_buffer_types
            return p

        llama_module.llama_cpp.llama_model_default_params = params
        try:
            return llama_module.Llama(**kwargs)
        finally:
            llama_module.llama_cpp.llama_model_default_params = original
