"""push_to_hub variants: save to a temporary folder exactly as the local save does, then upload it.

Everything up to the upload (saving, repo id checks, the file list) is shared with the local path
and tested; `_network` is the only code that talks to the Hugging Face hub.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

from velotune.errors import ConfigError


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"bad hub repo id {repo_id!r}: {e}") from None
    if "/" not in repo_id:
        raise ConfigError(f"hub repo id {repo_id!r} needs an owner: 'user/{repo_id}'")
    return repo_id


def upload_folder(
    folder: Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    path_in_repo: str | None = None,
) -> dict:
    """Upload every file under `folder` to the model repo `repo_id` (into `path_in_repo`, default the
    repo root); returns what was sent."""
    check_repo_id(repo_id)
    files = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
    if not files:
        raise ConfigError(f"nothing to upload in {folder}")
    plan = {
        "repo_id": repo_id,
        "folder": str(folder),
        "files": files,
        "private": private,
        "path_in_repo": path_in_repo,
        "commit_message": commit_message or f"velotune export ({len(files)} files)",
    }
    plan["url"] = _network(plan, token)
    return plan


def _network(plan: dict, token: str | None) -> str:  # the only untested code: it needs the hub
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(plan["repo_id"], private=plan["private"], exist_ok=True, repo_type="model")
    return str(
        api.upload_folder(
            folder_path=plan["folder"],
            repo_id=plan["repo_id"],
            path_in_repo=plan["path_in_repo"],
            commit_message=plan["commit_message"],
        )
    )


def push_to_hub_merged(
    model,
    repo_id: str,
    tokenizer=None,
    save_method: str = "merged_16bit",
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    **save_kwargs,
) -> dict:
    """Save adapters / merged weights as `save_pretrained_merged` does and upload them to `repo_id`."""
    from velotune.export.merged import save_pretrained_merged

    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="velotune-push-") as d:
        folder = save_pretrained_merged(model, Path(d) / "upload", tokenizer, save_method, quiet=True, **save_kwargs)
        return upload_folder(folder, repo_id, token=token, private=private, commit_message=commit_message)


def push_to_hub_gguf(
    model,
    repo_id: str,
    tokenizer=None,
    quantization_method: str | Sequence[str] = "q8_0",
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    **gguf_kwargs,
) -> dict:
    """Write GGUF file(s) + Modelfile as `save_pretrained_gguf` does and upload them to `repo_id`."""
    from velotune.export.gguf_export import save_pretrained_gguf

    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="velotune-push-") as d:
        save_pretrained_gguf(model, Path(d), tokenizer, quantization_method, quiet=True, **gguf_kwargs)
        return upload_folder(Path(d), repo_id, token=token, private=private, commit_message=commit_message)
