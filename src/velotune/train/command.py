"""`velotune train CONFIG.yaml`: train from a YAML config (SFT, DPO, ORPO, continued pretraining).

Bad configs raise ConfigError, which the CLI router prints as one line (exit code 2).
"""
from __future__ import annotations

import argparse

EPILOG = """\
examples:
  velotune train examples/sft.yaml
  velotune train examples/dpo.yaml --max-steps 20 --output-dir outputs/dpo-try
  velotune train examples/sft.yaml --resume            # continue from the latest checkpoint-N

The config reference is in README.md (section "Training from YAML") and examples/*.yaml.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("config", metavar="CONFIG.yaml", help="training config (see examples/*.yaml)")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--max-steps", type=int, help="override training.max_steps")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="resume from the latest checkpoint in output_dir, or from CHECKPOINT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")


def apply_overrides(cfg, args: argparse.Namespace):
    """CLI flags over the YAML values (validated like the YAML)."""
    from pathlib import Path

    from velotune.errors import ConfigError

    if args.output_dir:
        cfg.output_dir = str(Path(args.output_dir).resolve())
    if args.max_steps is not None:
        if args.max_steps <= 0:
            raise ConfigError(f"--max-steps: must be a positive number of steps (got {args.max_steps})")
        cfg.training.max_steps = args.max_steps
    if args.resume is not None:
        cfg.training.resume_from_checkpoint = args.resume if args.resume is True else str(Path(args.resume).resolve())
    return cfg


def run(args: argparse.Namespace) -> int:
    from velotune.train.config import check_paths, load_config

    cfg = apply_overrides(load_config(args.config), args)
    check_paths(cfg, source=args.config)
    from velotune.train.runner import run_training  # heavy imports (torch, transformers, TRL) only now

    result = run_training(cfg, progress=not args.no_progress)
    print(f"adapter and tokenizer: {result.adapter_path}")
    print(f"loss curve:            {result.png_path}")
    print(f"summary:               {result.summary_path}")
    return 0
