"""Reading back the JSON-lines logs a run writes (`metrics.jsonl`, `samples.jsonl`): one object per line with its
"step"; a torn line (the process was killed in the middle of a write) is dropped with a warning."""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)


def read_metrics(path: str) -> list[tuple[dict, str]]:
    """[(row, raw line)] of a metrics.jsonl; torn or garbled lines are dropped with a warning."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "step" not in row:
                    raise ValueError("not a metrics record")
            except ValueError:
                log.warning("%s:%d: dropped a torn line (the run was stopped while writing it): %r", path, i,
                            line[:80])
                continue
            rows.append((row, line if line.endswith("\n") else line + "\n"))
    return rows
