"""The `velotune` command line.

Each subcommand lives in the module that owns its work and exposes two functions:
`add_arguments(parser)` and `run(args) -> int`. This file only routes, so `velotune --help`
stays fast (modules are imported when their command runs).

Errors: a `velotune.errors.VelotuneError` (bad config, model folder, data, paths, arguments) is printed
as one line, `velotune COMMAND: error: MESSAGE`, and the exit code is 2; `--traceback` (anywhere on the
command line) prints its traceback too. Any other exception is a bug in velotune and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("velotune.demo.command", "fine-tune the shipped mini model on the shipped data set (no network, CPU ok)"),
    "train": ("velotune.train.command", "train from a YAML config (SFT, DPO, ORPO)"),
    "export": (
        "velotune.export.command",
        "export a training output: LoRA, merged safetensors, GGUF + Ollama Modelfile",
    ),
    "chat": ("velotune.infer.command", "chat with a model in the terminal (streaming)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="velotune", description="Fast, exact LLM fine-tuning.")
    parser.add_argument("--version", action="version", version=f"velotune {_version()}")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="on an error, show the Python traceback too (may also follow the command)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.set_defaults(_module=module)
        # Arguments are added lazily only for the command being run or asked about.
        p.set_defaults(_name=name)
    return parser


def _version() -> str:
    from velotune import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in argv
    argv = [a for a in argv if a != "--traceback"]
    parser = build_parser()
    # Find the subcommand first so only its module is imported.
    name = next((a for a in argv if not a.startswith("-")), None)
    if name in COMMANDS:
        module = importlib.import_module(COMMANDS[name][0])
        sub = parser._subparsers._group_actions[0].choices[name]  # noqa: SLF001
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 0
    from velotune.errors import VelotuneError

    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except VelotuneError as e:
        if show_traceback:
            import traceback

            traceback.print_exc()
        print(f"velotune {args._name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nvelotune {args._name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
