"""What the user sees during and after training: a progress bar with live loss, log lines,
a loss-curve PNG and a summary JSON.

    trainer.add_callback(ProgressCallback())          # replaces transformers' own bar (disable_tqdm=True)
    write_loss_curve(trainer.state.log_history, out / "loss_curve.png")
    write_json(out / "summary.json", summarize(trainer.state, ...))

The curve and the summary are built from `state.log_history`, which a resumed run restores from its
checkpoint, so they cover the whole run, not only the part after the resume.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

# log key -> label in the one-line log
_SHOWN = (
    ("loss", "loss", "{:.4f}"),
    ("learning_rate", "lr", "{:.3g}"),
    ("grad_norm", "grad-norm", "{:.3f}"),
    ("tokens_per_second", "tok/s", "{:,.0f}"),
    ("rewards/accuracies", "reward-acc", "{:.2f}"),
    ("eval_loss", "eval-loss", "{:.4f}"),
)


def format_log_line(step: int, max_steps: int, logs: dict) -> str:
    parts = [f"step {step}/{max_steps}"]
    for key, label, fmt in _SHOWN:
        value = logs.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(f"{label} {fmt.format(value)}")
    return " | ".join(parts)


class ProgressCallback(TrainerCallback):
    """A tqdm bar over optimizer steps with the live loss; one readable line per log.

    `print_logs=False` keeps only the bar (the logs still reach report_to loggers and the summary).
    """

    def __init__(self, print_logs: bool = True, desc: str = "training"):
        self.print_logs = print_logs
        self.desc = desc
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step", dynamic_ncols=True
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
        if self.print_logs and ("loss" in logs or "eval_loss" in logs):
            self.bar.write(format_log_line(state.global_step, state.max_steps, logs))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self.bar.close()
            self.bar = None


def loss_points(log_history: list[dict]) -> tuple[list[int], list[float]]:
    """(steps, losses) of the training logs, one point per logged step (last one wins on repeats)."""
    by_step: dict[int, float] = {}
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            by_step[int(entry["step"])] = float(entry["loss"])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: a crash never leaves half a file."""
    from velotune.fsio import make_temp_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_file(path.parent, path.name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_loss_curve(log_history: list[dict], path: str | Path, title: str = "training loss") -> Path:
    """Plot loss (and eval loss, when logged) against the optimizer step into a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    path = Path(path)
    steps, losses = loss_points(log_history)
    eval_pts = [(int(e["step"]), float(e["eval_loss"])) for e in log_history if "eval_loss" in e and "step" in e]
    fig = Figure(figsize=(6.4, 4.0), dpi=100)  # a Figure without pyplot: no global state, no GUI backend
    ax = fig.add_subplot()
    ax.plot(steps, losses, marker="o" if len(steps) < 30 else None, markersize=3, label="train loss")
    if eval_pts:
        ax.plot(*zip(*eval_pts), marker="s", markersize=4, label="eval loss")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def summarize(log_history: list[dict], *, global_step: int, train_seconds: float, **extra: Any) -> dict:
    """The run summary: steps, first/last loss, mean tokens per second, time, plus `extra` entries."""
    steps, losses = loss_points(log_history)
    tps = [e["tokens_per_second"] for e in log_history if "tokens_per_second" in e]
    tokens = sum(int(e.get("tokens", 0)) for e in log_history)
    grad = [e["grad_norm"] for e in log_history if isinstance(e.get("grad_norm"), (int, float))]
    evals = [e["eval_loss"] for e in log_history if "eval_loss" in e]
    summary = {
        "steps": global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "min_loss": min(losses) if losses else None,
        "tokens": tokens,
        "tokens_per_second": round(sum(tps) / len(tps), 1) if tps else None,
        "last_grad_norm": grad[-1] if grad else None,
        "last_eval_loss": evals[-1] if evals else None,
        "train_seconds": round(train_seconds, 2),
    }
    summary.update(extra)
    return summary


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    text = json.dumps(data, indent=2, default=str) + "\n"
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path
