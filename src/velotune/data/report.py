"""DataReport: what happened to every row that was not used as given (never a silent drop).

    ds, report = tokenize_conversations(raw, tokenizer, max_seq_length=2048)
    print(report.summary())
    # 1000 rows: 990 kept (3 truncated), 10 skipped
    #   skipped  empty (7): rows 4, 18, 33, 90, 101, ...
    #   skipped  too_long (3): rows 2, 7, 11
    #   truncated too_long (3): rows 5, 9, 12

Reasons (stable strings, so code can test for them):
  missing_field        the row lacks a field the format needs (e.g. no assistant content, no 'rejected')
  unknown_role         a message's role is not system/user/assistant (after the ShareGPT mapping)
  empty                no messages, or every message / the reply is blank
  too_long             longer than max_seq_length (skipped with on_long="skip", else truncated)
  no_trainable_tokens  nothing left to learn, e.g. truncation cut the whole reply away
  identical_pair       a preference row whose chosen equals rejected
  template_error       the chat template rejected the row (e.g. a system turn mid-conversation for mistral/gemma)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from velotune.errors import DataError

REASONS = ("missing_field", "unknown_role", "empty", "too_long", "no_trainable_tokens", "identical_pair",
           "template_error")


@dataclass
class DataReport:
    total: int = 0
    skipped: dict[str, list[int]] = field(default_factory=dict)    # reason -> row indices (input order)
    truncated: dict[str, list[int]] = field(default_factory=dict)  # reason -> row indices kept but shortened
    details: dict[str, list[str]] = field(default_factory=dict)    # "skipped:<reason>" -> first few lines
    max_details: int = 5

    def add(self, reason: str, row: int, detail: str | None = None, *, truncated: bool = False) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        (self.truncated if truncated else self.skipped).setdefault(reason, []).append(row)
        if detail is not None:
            lines = self.details.setdefault(f"{'truncated' if truncated else 'skipped'}:{reason}", [])
            if len(lines) < self.max_details:
                lines.append(detail)

    def details_for(self, reason: str, *, truncated: bool = False) -> list[str]:
        return self.details.get(f"{'truncated' if truncated else 'skipped'}:{reason}", [])

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    @property
    def num_truncated(self) -> int:
        return sum(len(v) for v in self.truncated.values())

    @property
    def num_kept(self) -> int:
        return self.total - self.num_skipped

    @property
    def counts(self) -> dict[str, int]:
        """reason -> number of skipped rows (truncated rows under 'truncated:<reason>')."""
        out = {r: len(v) for r, v in self.skipped.items()}
        out.update({f"truncated:{r}": len(v) for r, v in self.truncated.items()})
        return out

    def summary(self, max_rows: int = 5) -> str:
        lines = [f"{self.total} rows: {self.num_kept} kept ({self.num_truncated} truncated), "
                 f"{self.num_skipped} skipped"]
        for kind, table in (("skipped", self.skipped), ("truncated", self.truncated)):
            for reason, rows in table.items():
                shown = ", ".join(map(str, rows[:max_rows])) + (", ..." if len(rows) > max_rows else "")
                lines.append(f"  {kind:9s} {reason} ({len(rows)}): rows {shown}")
                lines.extend(f"    e.g. {d}" for d in self.details.get(f"{kind}:{reason}", [])[:2])
        return "\n".join(lines)

    def raise_if_empty(self) -> None:
        if self.total == 0:
            raise DataError("the data set has no rows")
        if self.num_kept == 0:
            raise DataError("no usable row left:\n" + self.summary())

    def __str__(self) -> str:
        return self.summary()
