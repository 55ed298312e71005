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
  template_error       the chat template rejected the row
  role_order           turns out of order: the first turn after an optional leading system message is not the
                       user's, two user (or two assistant) turns in a row, or a system turn after the first turn
  not_utf8             the row's bytes in the file are not UTF-8 (JSON Lines files; the detail names the line)

Every reason above is a skipped row unless it is listed under `truncated` (too_long with on_long="truncate").
`on_bad` (velotune.data.prepare, the YAML's data.on_bad) says what happens to skipped rows: "skip" (default)
trains on the rest and shows the counts; "raise" stops with a DataError naming the rows (`raise_if_bad`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from velotune.errors import ConfigError, DataError

REASONS = (
    "missing_field",
    "unknown_role",
    "empty",
    "too_long",
    "no_trainable_tokens",
    "identical_pair",
    "template_error",
    "role_order",
    "not_utf8",
)
ON_BAD = ("skip", "raise")


def check_on_bad(on_bad: str) -> None:
    if on_bad not in ON_BAD:
        raise ConfigError(f"on_bad={on_bad!r}: use 'skip' (count and leave out unusable rows) or 'raise'")


@dataclass
class DataReport:
    total: int = 0
    skipped: dict[str, list[int]] = field(default_factory=dict)  # reason -> row indices (input order)
    truncated: dict[str, list[int]] = field(default_factory=dict)  # reason -> row indices kept but shortened
    details: dict[str, list[str]] = field(default_factory=dict)  # "skipped:<reason>" -> first few lines
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
        lines = [
            f"{self.total} rows: {self.num_kept} kept ({self.num_truncated} truncated), {self.num_skipped} skipped"
        ]
        for kind, table in (("skipped", self.skipped), ("truncated", self.truncated)):
            for reason, rows in table.items():
                shown = ", ".join(map(str, rows[:max_rows])) + (", ..." if len(rows) > max_rows else "")
                lines.append(f"  {kind:9s} {reason} ({len(rows)}): rows {shown}")
                lines.extend(f"    e.g. {d}" for d in self.details.get(f"{kind}:{reason}", [])[:2])
        return "\n".join(lines)

    def rows_skipped(self) -> set[int]:
        """Indices of every skipped row (any reason)."""
        return {i for rows in self.skipped.values() for i in rows}

    def one_line(self, max_rows: int = 5) -> str:
        """The skipped rows in one line: 'not_utf8 rows 1, 4; role_order row 7 (e.g. row 7: ...)'."""
        parts = []
        for reason, rows in self.skipped.items():
            shown = ", ".join(map(str, rows[:max_rows])) + (", ..." if len(rows) > max_rows else "")
            example = self.details.get(f"skipped:{reason}", [])
            parts.append(
                f"{reason} ({len(rows)}): row{'s' if len(rows) > 1 else ''} {shown}"
                + (f" [e.g. {example[0]}]" if example else "")
            )
        return "; ".join(parts)

    def raise_if_bad(self, on_bad: str = "raise", what: str = "the data set") -> None:
        """With on_bad="raise": a DataError naming every skipped row's reason and row numbers (one line)."""
        check_on_bad(on_bad)
        if on_bad == "raise" and self.num_skipped:
            raise DataError(
                f"{what}: {self.num_skipped} of {self.total} rows unusable: {self.one_line()}; "
                "fix those rows, or set on_bad='skip' (YAML: data.on_bad: skip) to train without them"
            )

    def raise_if_empty(self) -> None:
        if self.total == 0:
            raise DataError("the data set has no rows")
        if self.num_kept == 0:
            raise DataError(f"no usable row left of {self.total}: {self.one_line()}")

    def __str__(self) -> str:
        return self.summary()
