"""push_to_hub variants: save to a temporary folder exactly as the local save does, then upload it.

    model.push_to_hub_merged("me/model", tokenizer, save_method="merged_16bit", token=..., private=True)
    model.push_to_hub_gguf("me/model-gguf", tokenizer, quantization_method="q4_k_m", token=...)

The names and keywords are Unsloth's (`repo_id`, `tokenizer`, `save_method` / `quantization_method`,
`token`, `private`, `commit_message`, `commit_description`, `create_pr`, `revision`); the remaining
keywords go to the local saver. The upload is huggingface_hub's own: `HfApi.create_repo` (model repo,
`exist_ok=True`) then `HfApi.upload_folder`. `api=` takes the `HfApi` (or subclass) instance to use;
by default one is made with `token`. An empty `token` ("", as Unsloth's notebooks leave it) means
none: huggingface_hub then uses the saved login (`hf auth login`) or HF_TOKEN.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

from velotune.errors import ConfigError


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str):
        raise ConfigError(f"hub repo id must be a string like 'user/model', got {type(repo_id).__name__}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"bad hub repo id {repo_id!r}: {e}") from None
    if "/" not in repo_id:
        raise ConfigError(f"hub repo id {repo_id!r} needs an owner: 'user/{repo_id}'")
    return repo_id


def default_api(token: str | None):
    """A huggingface_hub `HfApi` for `token` (None: the saved login)."""
    from huggingface_hub import HfApi

    return HfApi(token=token)


def upload_folder(
    folder: Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    path_in_repo: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    api=None,
) -> dict:
    """Upload every file under `folder` to the model repo `repo_id` (into `path_in_repo`, default the
    repo root), creating the repo if needed (`private` applies only then); returns what was sent:
    {repo_id, folder, files (relative paths, sorted), private, path_in_repo, commit_message, url}."""
    check_repo_id(repo_id)
    files = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())
    if not files:
        raise ConfigError(f"nothing to upload in {folder}")
    token = token or None
    plan = {
        "repo_id": repo_id,
        "folder": str(folder),
        "files": files,
        "private": private,
        "path_in_repo": path_in_repo,
        "commit_message": commit_message or f"velotune export ({len(files)} files)",
    }
    api = default_api(token) if api is None else api
    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        path_in_repo=path_in_repo,
        commit_message=plan["commit_message"],
        commit_description=commit_description,
        token=token,
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
    )
    plan["url"] = str(getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or commit)
    return plan


# upload_folder's keywords that the push_to_hub_* functions take (everything else goes to the saver)
UPLOAD_KEYWORDS = ("token", "private", "commit_message", "commit_description", "create_pr", "revision", "api")


def _push(repo_id: str, options: dict, save) -> dict:
    """check repo_id, then save(folder, **saver keywords) into a temporary folder and upload it with
    options' UPLOAD_KEYWORDS."""
    check_repo_id(repo_id)
    upload = {k: options.pop(k) for k in UPLOAD_KEYWORDS if k in options}
    with tempfile.TemporaryDirectory(prefix="velotune-push-") as d:
        folder = save(Path(d) / "upload", **options)
        return upload_folder(folder, repo_id, **upload)


def push_to_hub_merged(model, repo_id: str, tokenizer=None, save_method: str = "merged_16bit", **options) -> dict:
    """Save adapters / merged weights as `save_pretrained_merged(..., save_method, **saver keywords)`
    does, into a temporary folder, and upload that folder to the root of `repo_id`. options: the
    upload's keywords (UPLOAD_KEYWORDS: token, private, commit_message, commit_description, create_pr,
    revision, api; see `upload_folder`), the rest the saver's."""
    from velotune.export.merged import save_pretrained_merged

    def save(folder, **kw):
        return save_pretrained_merged(model, folder, tokenizer, save_method, quiet=True, **kw)

    return _push(repo_id, dict(options), save)


def push_to_hub_gguf(
    model, repo_id: str, tokenizer=None, quantization_method: str | Sequence[str] = "q8_0", **options
) -> dict:
    """Write the GGUF file(s) (`model.<METHOD>.gguf`, one per method) and the Ollama Modelfile as
    `save_pretrained_gguf` does, into a temporary folder, and upload them to the root of `repo_id`.
    options: as push_to_hub_merged's (upload keywords, the rest save_pretrained_gguf's)."""
    from velotune.export.gguf_export import save_pretrained_gguf

    def save(folder, **kw):
        save_pretrained_gguf(model, folder, tokenizer, quantization_method, quiet=True, **kw)
        return folder

    return _push(repo_id, dict(options), save)
