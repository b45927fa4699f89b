"""Evaluation results as plain-text tables and JSON."""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Optional, Sequence

import numpy as np


def _cell(value: Any, width: int) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value).replace("\n", "\\n")
    return text if len(text) <= width else text[:width - 1] + "…"


def format_table(rows: Sequence[dict], columns: Optional[Sequence[str]] = None, max_width: int = 40) -> str:
    """A plain-text table of ``rows`` (dicts) over ``columns`` (default: the first row's keys)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_cell(r.get(c, ""), max_width) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[k]) for row in cells)) for k, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def summary_table(summary: dict) -> str:
    rows = [{"metric": k, "value": v} for k, v in summary.items() if not isinstance(v, (dict, list))]
    return format_table(rows, ["metric", "value"])


def to_json(result: Any) -> str:
    def default(obj):
        if hasattr(obj, "__dataclass_fields__"):
            return asdict(obj)
        if isinstance(obj, (np.integer, np.floating, np.bool_)):
            return obj.item()
        raise TypeError(f"cannot serialise {type(obj).__name__}")
    return json.dumps(result, indent=2, default=default, ensure_ascii=False)
