"""`velotune train CONFIG.yaml`: train from a YAML config (SFT, DPO, ORPO, continued pretraining).

Bad configs raise ConfigError, which the CLI router prints as one line (exit code 2).
"""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  velotune train examples/sft.yaml
  velotune train examples/dpo.yaml --max-steps 20 --output-dir outputs/dpo-try
  velotune train examples/sft.yaml --resume            # continue from the newest complete checkpoint-N
  velotune train examples/sft.yaml --overwrite         # output_dir holds an old run: move it aside first
  velotune train examples/sft.yaml --nproc 2           # DDP on 2 GPUs (same as the torchrun line below)
  torchrun --nproc-per-node 2 --no-python velotune train examples/sft.yaml

The config reference is in README.md (section "Training from YAML") and examples/*.yaml.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("config", metavar="CONFIG.yaml", help="training config (see examples/*.yaml)")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--max-steps", type=int, help="override training.max_steps")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="resume from the latest checkpoint in output_dir, or from CHECKPOINT",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="if output_dir holds another run, move it aside to OUTPUT_DIR.old-<time> first "
        "(without this flag such a folder is refused)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="data-parallel (DDP) training in N processes on this machine, one per GPU "
        "(launches torchrun --standalone --nproc-per-node N; CPU-only: N gloo processes)",
    )


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


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this command under torchrun with N processes (everything but --nproc passed through)."""
    import subprocess
    import sys

    from velotune.errors import ConfigError

    if args.nproc < 1:
        raise ConfigError(f"--nproc: must be at least 1 (got {args.nproc})")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        "-m",
        "velotune.cli",
        "train",
        *argv,
    ]
    return subprocess.call(cmd)


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line of this run without --nproc (what each launched process runs)."""
    argv = [args.config]
    if args.output_dir:
        argv += ["--output-dir", args.output_dir]
    if args.max_steps is not None:
        argv += ["--max-steps", str(args.max_steps)]
    if args.resume is True:
        argv += ["--resume"]
    elif args.resume:
        argv += ["--resume", str(args.resume)]
    if args.no_progress:
        argv += ["--no-progress"]
    if args.overwrite:
        argv += ["--overwrite"]
    return argv


def run(args: argparse.Namespace) -> int:
    import os

    from velotune.train.config import check_paths, load_config

    from pathlib import Path

    from velotune.train.output_dir import check_early, resumes_here

    cfg = apply_overrides(load_config(args.config), args)
    check_paths(cfg, source=args.config)
    if int(os.environ.get("RANK", "0")) == 0:  # refusals before the heavy imports (run_training checks again)
        out = Path(cfg.output_dir)
        check_early(out, resuming=resumes_here(out, cfg.training.resume_from_checkpoint), overwrite=args.overwrite)
    if args.nproc is not None and "LOCAL_RANK" not in os.environ:  # not yet inside a launched process
        return launch(args, _argv(args))
    from velotune.distributed import is_main_process
    from velotune.train.runner import run_training  # heavy imports (torch, transformers, TRL) only now

    # ends with a barrier: outputs are written
    result = run_training(cfg, progress=not args.no_progress, overwrite=args.overwrite)
    if is_main_process():
        print(f"adapter and tokenizer: {result.adapter_path}")
        print(f"loss curve:            {result.png_path}")
        print(f"summary:               {result.summary_path}")
    if "LOCAL_RANK" in os.environ:
        _exit_launched_worker()
    return 0


def _exit_launched_worker() -> None:
    """A worker under torchrun / accelerate launch leaves without interpreter teardown.

    Tearing down a gloo process group from Python's exit can deadlock (the DDP reducer's destructor joins
    gloo's run-loop thread while holding the GIL, and that thread needs the GIL to free a tensor of a
    finished all-gather; seen with torch 2.13) or abort ("terminate called without an active exception").
    Everything is saved and every rank has passed the final barrier, so nothing is lost by skipping it.
    """
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
