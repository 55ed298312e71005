"""Shared builders for the export tests: a mini model with non-trivial LoRA adapters, a local hub stand-in."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import torch
from huggingface_hub import CommitInfo, HfApi
from huggingface_hub.hf_api import RepoUrl

from mini import mini_model, mini_tokenizer


def lora_model(family: str = "llama", r: int = 4, seed: int = 0, **overrides):
    """A stock transformers mini model wrapped by velotune's get_peft_model, lora_B randomised
    (PEFT initialises B to zero, which would make every merge test pass trivially)."""
    from velotune import FastLanguageModel

    model = mini_model(family, seed=seed, **overrides)
    peft_model = FastLanguageModel.get_peft_model(
        model, r=r, lora_alpha=8, use_gradient_checkpointing=False, random_state=seed
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    peft_model.eval()
    return peft_model, mini_tokenizer()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


class RecordingHfApi(HfApi):
    """A local stand-in for huggingface_hub's `HfApi`: `create_repo` and `upload_folder` record their
    arguments, bound to the real methods' signatures (a keyword velotune passes that HfApi does not
    take fails here as it would against the hub), and each uploaded folder is copied into
    `store/<upload number>` instead of being sent."""

    def __init__(self, store, token=None):
        super().__init__(token=token)
        self.store = Path(store)
        self.calls: list[tuple[str, dict]] = []
        self.uploads: list[Path] = []

    @staticmethod
    def _bound(method: str, *args, **kwargs) -> dict:
        arguments = inspect.signature(getattr(HfApi, method)).bind(None, *args, **kwargs).arguments
        arguments.pop("self")
        return dict(arguments)

    def create_repo(self, *args, **kwargs):
        call = self._bound("create_repo", *args, **kwargs)
        self.calls.append(("create_repo", call))
        return RepoUrl(f"https://huggingface.co/{call['repo_id']}")

    def upload_folder(self, *args, **kwargs):
        call = self._bound("upload_folder", *args, **kwargs)
        self.calls.append(("upload_folder", call))
        dst = self.store / str(len(self.uploads))
        shutil.copytree(call["folder_path"], dst)
        self.uploads.append(dst)
        repo = f"https://huggingface.co/{call['repo_id']}"
        return CommitInfo(
            commit_url=f"{repo}/commit/{'0' * 40}",
            commit_message=call.get("commit_message") or "",
            commit_description=call.get("commit_description") or "",
            oid="0" * 40,
            pr_url=f"{repo}/discussions/1" if call.get("create_pr") else None,
        )
