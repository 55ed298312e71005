"""A model or adapter folder, checked before anything is read into memory, and its weights loaded
safely: safetensors only (pickled files are refused and never unpickled), every weight the model needs
present, transformers' refusals as one-line ModelLoadErrors.

    path = resolve_model_path(name, token, revision)   # a checked local folder, or a hub snapshot
    config = load_config(AutoConfig, path, trust_remote_code=False)
    check_coverage(Path(path), config)                 # the safetensors files hold every weight
    model = load_weights(AutoModelForCausalLM, path, config, load_kwargs)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from velotune.errors import ModelLoadError
from velotune.safetensors_check import check_weight_files, missing_weights

UNSAFE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt", "tokenizer.tiktoken")


def check_local_folder(path: Path) -> None:
    """Refuse model folders that cannot load, before anything is read into memory: no config.json,
    only pickled weights (we load safetensors and never unpickle), torn or garbage safetensors files,
    shards named by the index but missing, no tokenizer files."""
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a folder")
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} has no config.json: is it a transformers model folder?")
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON ({e}); re-download or re-export the model")
    if not any(p.suffix == ".safetensors" for p in path.iterdir()):
        pickled = [p.name for p in path.iterdir() if p.suffix in UNSAFE_WEIGHT_SUFFIXES]
        hint = f" (found pickled files {pickled}; convert them to safetensors first)" if pickled else ""
        raise ModelLoadError(f"{path} has no *.safetensors weights{hint}; velotune loads only safetensors")
    check_weight_files(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): copy them "
            "from the base model's folder (tokenizer.save_pretrained(folder))"
        )


def check_adapter_folder(path: Path) -> dict:
    """A LoRA adapter folder velotune can load: readable adapter_config.json and safetensors weights
    (a pickled adapter_model.bin is refused: it is never unpickled). Returns the adapter config."""
    cfg_path = path / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg_path} is not readable JSON ({type(e).__name__}); re-save the adapter") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_path} is not a JSON object; re-save the adapter")
    if not (path / "adapter_model.safetensors").is_file():
        pickled = [p.name for p in path.iterdir() if p.suffix in UNSAFE_WEIGHT_SUFFIXES]
        hint = (
            f"it holds pickled weights {pickled}, which velotune never unpickles: convert them to "
            "safetensors (load them in a trusted environment and save with safe_serialization=True)"
            if pickled
            else "re-save the adapter (model.save_pretrained(folder))"
        )
        raise ModelLoadError(f"{path} has no adapter_model.safetensors; {hint}")
    check_weight_files(path, names=["adapter_model.safetensors"])
    return cfg


def resolve_model_path(model_name: str | os.PathLike, token: str | None, revision: str | None) -> str:
    path = Path(model_name).expanduser()
    if path.exists():
        if adapter_folder(path) is None:  # an adapter folder is checked by check_adapter_folder
            check_local_folder(path)
        return str(path)
    name = str(model_name)
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ModelLoadError(f"model folder {name!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        # Fetch only what we load: config, tokenizer and safetensors weights.
        return snapshot_download(
            name,
            token=token,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        )
    except Exception as e:  # network errors, offline mode, missing repo, gated repo
        raise ModelLoadError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(e).__name__}: {first_line(e)[:200]}). "
            "Without network access, pass a local model folder instead."
        ) from None


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def load_config(auto_config, path: str, trust_remote_code: bool):
    """AutoConfig, with transformers' refusals (remote code, unknown model_type) as one-line ModelLoadErrors."""
    try:
        return auto_config.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        text = str(e)
        if "trust_remote_code" in text:
            raise ModelLoadError(
                f"{path}: this model needs its own Python code (auto_map in config.json), which velotune does not "
                "run by default; use a model whose architecture transformers ships, or, if you trust its code, "
                "pass trust_remote_code=True from Python"
            ) from e
        model_type = _config_value(path, "model_type")
        if model_type is not None and ("model type" in text or "Unrecognized" in text):
            import transformers

            raise ModelLoadError(
                f"{path}/config.json: model_type {model_type!r} is not known to transformers "
                f"{transformers.__version__}: fix model_type, upgrade transformers, or use a supported model"
            ) from e
        raise ModelLoadError(f"{path}/config.json: {first_line(e)}") from e


def _config_value(path: str, key: str):
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def check_coverage(path: Path, config) -> None:
    missing = missing_weights(path, config)
    if missing:
        raise ModelLoadError(_missing_message(path, missing))


def _missing_message(path, missing: list[str]) -> str:
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return (
        f"{path}: the safetensors files lack {len(missing)} weight(s) the model needs ({shown}); "
        "the folder is incomplete: re-download or re-export the model"
    )


def load_weights(auto_model, path: str, config, load_kwargs: dict):
    """The model, refusing weights the files do not cover (transformers would leave them random with
    only a warning) and reporting unreadable files as one line."""
    from safetensors import SafetensorError

    try:
        model, info = auto_model.from_pretrained(path, config=config, output_loading_info=True, **load_kwargs)
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(
            f"{path}: the weights do not load ({first_line(e)}); re-download or re-export the model"
        ) from e
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelLoadError(_missing_message(path, missing))
    return model


def adapter_folder(path: Path) -> Path | None:
    """`path` when it is a LoRA adapter folder (adapter_config.json), else None."""
    return path if path.is_dir() and (path / "adapter_config.json").is_file() else None
