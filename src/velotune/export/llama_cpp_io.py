"""Open a GGUF with llama-cpp-python for velotune's checks and demo (reading back what we wrote).

`extra_buffer_types=False` (the default here) turns off llama.cpp's repacked CPU weight buffers
(AMX / AVX-512 repacks of quantised tensors). Some virtual machines advertise AMX without letting a
process use it, and llama.cpp then dies with SIGILL on the first quantised matmul; velotune only
reads small outputs back, so the portable kernels are the right choice. `Llama` has no argument for
this, so the default-params factory it calls is wrapped for the duration of that one constructor
call and restored afterwards.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_LOCK = threading.Lock()


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
