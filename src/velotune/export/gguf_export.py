"""`model.save_pretrained_gguf(dir, tokenizer, quantization_method="q8_0")`: GGUF for llama.cpp / Ollama.

f32, f16, bf16, q8_0 and q4_0 are written directly in Python (the `gguf` package quantises them);
k-quants are made from a 16-bit GGUF by llama.cpp's own quantiser, as exposed by llama-cpp-python
(`llama_cpp.llama_model_quantize`). Every file is written to a temporary name in the target folder
and renamed when complete, and an Ollama `Modelfile` is written beside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Sequence

import gguf
import numpy as np
import torch

from velotune.errors import ConfigError, describe_os_error
from velotune.export.atomic import ExportError, atomic_file
from velotune.fsio import remove_stale_temps
from velotune.export.gguf_arch import add_metadata, arch_of, family_of, gguf_tensors
from velotune.export.gguf_vocab import add_tokenizer
from velotune.export.llama_cpp_io import llama_log
from velotune.export.merge import base_model_of, iter_merged_tensors
from velotune.export.merged import export_dtype
from velotune.export.modelfile import write_modelfile

log = logging.getLogger("velotune")
Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType

# method -> (file type, tensor type, one-line advice). Python-written methods first.
PY_METHODS = {
    "f32": (F.ALL_F32, Q.F32, "full precision, 4 bytes/weight: reference checks only"),
    "f16": (F.MOSTLY_F16, Q.F16, "16-bit, lossless for fp16 models; the usual input to further quantisation"),
    "bf16": (F.MOSTLY_BF16, Q.BF16, "16-bit keeping bf16's range; lossless for bf16-trained models"),
    "q8_0": (F.MOSTLY_Q8_0, Q.Q8_0, "8-bit, near-lossless, half of f16's size: the safe default"),
    "q4_0": (F.MOSTLY_Q4_0, Q.Q4_0, "legacy 4-bit; prefer q4_k_m (same size, better quality)"),
}
K_METHODS = {
    "q6_k": (F.MOSTLY_Q6_K, "6-bit k-quant, close to q8_0 quality at ~80% of its size"),
    "q5_k_m": (F.MOSTLY_Q5_K_M, "5-bit k-quant mix: high quality, recommended when memory allows"),
    "q4_k_m": (F.MOSTLY_Q4_K_M, "4-bit k-quant mix: the popular size/quality balance for local use"),
    "q3_k_m": (F.MOSTLY_Q3_K_M, "3-bit k-quant mix: small, noticeable quality loss"),
    "q2_k": (F.MOSTLY_Q2_K, "2-bit k-quant: smallest, large quality loss; last resort"),
}
LOG_TAIL = 40  # lines of llama.cpp's log quoted when its quantiser fails
ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m"}
METHODS = {**{k: v[2] for k, v in PY_METHODS.items()}, **{k: v[1] for k, v in K_METHODS.items()}}


def methods_help() -> str:
    lines = [f"  {m:<8} {advice}" for m, advice in METHODS.items()]
    lines.append("  aliases: " + ", ".join(f"{a}={m}" for a, m in ALIASES.items()))
    return "\n".join(lines)


def normalise_method(method: str) -> str:
    m = ALIASES.get(method.lower(), method.lower())
    if m not in METHODS:
        raise ConfigError(
            f"quantization_method={method!r}: choose one of {', '.join(METHODS)} (or {', '.join(ALIASES)})"
        )
    return m


def _tensor_type(name: str, arr: np.ndarray, qtype: Q) -> Q:
    """convert_hf_to_gguf's rule: 1-D tensors (norms, biases, rope factors) stay f32."""
    if arr.ndim <= 1 or qtype == Q.F32:
        return Q.F32
    if qtype in (Q.Q8_0, Q.Q4_0):
        if name == "output.weight" and qtype == Q.Q4_0:
            qtype = Q.Q8_0  # the output projection is the most quantisation-sensitive tensor
        if arr.shape[-1] % 32:
            return Q.F16  # rows must be whole 32-value blocks
    return qtype


def write_gguf(model, tokenizer, path: Path, method: str, *, name: str | None = None, quiet: bool = True) -> Path:
    """Write `model` (merged on the fly) as a Python-quantised GGUF file at `path`.

    Two passes over the model keep memory at one tensor: the first records every tensor's name,
    shape and type for the header (merging is a cheap rank-r product per layer), the second
    converts, quantises and streams each tensor to the file.
    """
    from tqdm.auto import tqdm

    file_type, qtype, _ = PY_METHODS[method]
    base = base_model_of(model)
    config = base.config
    family = family_of(config)

    def converted():
        with torch.no_grad():
            for tname, arr in gguf_tensors(config, family, iter_merged_tensors(model, torch.float32)):
                yield tname, arr, _tensor_type(tname, arr, qtype)

    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch_of(family)])
    try:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or Path(getattr(config, "_name_or_path", "") or "model").name or "model")
        add_metadata(w, config, family, int(file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(w, tokenizer, config.vocab_size)
        n = 0
        for tname, arr, ttype in converted():
            block, type_size = gguf.GGML_QUANT_SIZES[ttype]
            w.add_tensor_info(tname, arr.shape, np.dtype(np.float32), arr.size // block * type_size, raw_dtype=ttype)
            n += 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for tname, arr, ttype in tqdm(
            converted(), total=n, desc=f"writing {method} GGUF", unit="tensor", disable=quiet, leave=False
        ):
            w.write_tensor_data(arr.astype(np.float32) if ttype == Q.F32 else gguf.quants.quantize(arr, ttype))
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk may fail the final flush too: the error above is the one
            w.close()
        raise
    w.close()
    return path


def llama_cpp_quantize(src: Path, dst: Path, method: str, *, verbose: bool = False) -> None:
    """k-quantise `src` (a 16/32-bit GGUF) into `dst` with llama.cpp's quantiser.

    llama.cpp's log (a line per tensor) is kept back: printed to stderr as it comes if `verbose`,
    else only inside the ExportError raised when quantisation fails (its last LOG_TAIL lines).
    """
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            f"{method} needs llama.cpp's quantiser: pip install llama-cpp-python "
            "(or choose q8_0 / q4_0, written without it)"
        ) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(K_METHODS[method][0])
    params.nthread = max(1, (os.cpu_count() or 2))
    with llama_log(verbose) as lines:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        tail = "".join(lines[-LOG_TAIL:]).rstrip() or "(llama.cpp logged nothing)"
        raise ExportError(
            f"llama.cpp's quantiser failed on {src.name} -> {method} (return code {rc}); its log ends:\n{tail}"
        )


def save_pretrained_gguf(
    model,
    save_directory: str | os.PathLike,
    tokenizer=None,
    quantization_method: str | Sequence[str] = "q8_0",
    *,
    name: str | None = None,
    modelfile: bool = True,
    quiet: bool = False,
    verbose: bool = False,
) -> list[Path]:
    """Write one GGUF per method into `save_directory` (plus an Ollama Modelfile); returns the GGUF paths.

    Files are named `model.<METHOD>.gguf`. The Modelfile (FROM the first GGUF) is `save_directory/Modelfile`,
    and its text is also left in `tokenizer._ollama_modelfile` (Unsloth's attribute, which its Ollama
    notebook prints). LoRA adapters are merged (fp32) on the way; the training
    model is not modified. `quiet`: no progress bars or summary lines. `verbose`: show llama.cpp's
    own log while it k-quantises (otherwise shown only if it fails).
    """
    if tokenizer is None:
        raise ConfigError("save_pretrained_gguf needs the tokenizer: GGUF files carry their vocabulary")
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    methods = [normalise_method(m) for m in methods]
    folder = Path(save_directory).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder} exists and is not a folder; choose another output path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {folder}: {describe_os_error(e)}; choose a writable output folder") from e
    remove_stale_temps(folder)
    family_of(base_model_of(model).config)  # fail fast on unsupported models
    out: list[Path] = []
    sixteen = "bf16" if _model_dtype(model) == torch.bfloat16 else "f16"
    intermediate: Path | None = None
    try:
        for m in methods:
            target = folder / f"model.{m.upper()}.gguf"
            if m in PY_METHODS:
                with atomic_file(target) as tmp:
                    write_gguf(model, tokenizer, tmp, m, name=name, quiet=quiet)
            else:
                if intermediate is None:
                    intermediate = folder / f".model.{sixteen}.intermediate-{os.getpid()}.gguf"
                    with atomic_file(intermediate) as tmp:
                        write_gguf(model, tokenizer, tmp, sixteen, name=name, quiet=quiet)
                with atomic_file(target) as tmp:
                    llama_cpp_quantize(intermediate, tmp, m, verbose=verbose)
            out.append(target)
            if not quiet:
                print(f"velotune: wrote {target} ({target.stat().st_size / 2**20:.1f} MiB, {m})")
    finally:
        if intermediate is not None:
            intermediate.unlink(missing_ok=True)
    if modelfile:
        path = write_modelfile(folder / "Modelfile", tokenizer, out[0].name)
        tokenizer._ollama_modelfile = path.read_text(encoding="utf-8")  # where Unsloth scripts print it from
    return out


def _model_dtype(model) -> torch.dtype:
    return export_dtype(model)
