"""BENCHMARKS.md stays small and every figure in its tables traces to a row of bench/results: each
number in a table cell must be a value of the subject's rows (bench/results/<script>.jsonl, the
script named in the section's heading), a percentage or KiB of one, or a ratio of two of them,
rounded as the cell shows it; and every commit a table names has rows."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"^([\d,]+(?:\.\d+)?)(x|%| KiB)?$")


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


def _sections(text: str):
    """(results file stem, [table data rows as cell lists]) per '## ... — `bench/X.py`' section."""
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        m = re.search(r"`bench/(\w+)\.py`", part.splitlines()[0])
        if not m:
            continue
        lines = part.splitlines()
        rows = [
            [c.strip() for c in line.strip().strip("|").split("|")]
            for i, line in enumerate(lines)
            if line.startswith("|")
            and not line.startswith("|---")
            and not (i + 1 < len(lines) and lines[i + 1].startswith("|---"))
        ]  # not a header
        yield m.group(1), rows


def _explained(shown: str, unit: str, values: list[float], ratios: list[float]) -> bool:
    v = float(shown.replace(",", ""))
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    if unit == "%":
        cands = [100 * x for x in values] + [100 * r for r in ratios] + values
    elif unit == " KiB":
        cands = [x / 1024 for x in values]
    else:
        cands = values + ratios
    return any(abs(round(c, decimals) - v) < 1e-9 or abs(c - v) < 0.5 * 10**-decimals for c in cands)


def test_benchmarks_md_small_and_every_table_figure_in_the_results():
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert len(text.encode()) <= 10_000
    checked, missing = 0, []
    for subject, rows in _sections(text):
        path = ROOT / "bench" / "results" / f"{subject}.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        commits = {r["commit"] for r in records}
        values = sorted({x for r in records for x in _numbers({k: v for k, v in r.items() if k != "commit"})})
        ratios = [a / b for a in values for b in values if b]
        for row in rows:
            for cell in row:
                cell = cell.replace("**", "").replace("`", "")
                if re.fullmatch(r"[0-9a-f]{7}", cell):
                    assert cell in commits, f"{subject}: commit {cell} has no rows"
                    continue
                for part in cell.split(" / "):
                    m = NUMBER.match(part.strip())
                    if not m:
                        continue
                    checked += 1
                    if not _explained(m.group(1), m.group(2) or "", values, ratios):
                        missing.append(f"{subject}: {part.strip()} (row {row[0]!r})")
    assert checked > 100
    assert not missing, "figures with no row in bench/results:\n" + "\n".join(missing)
