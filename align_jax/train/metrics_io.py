"""Metrics out: every step to `<workdir>/metrics.jsonl`, TensorBoard event files (tensorboardX, no TensorFlow)
every `log_every` steps and for evaluations; on the console a tqdm progress bar with the loss and tokens/s on a
terminal, or else (CI, nohup, `progress_bar=False`) a plain log line every `log_every` steps.

metrics.jsonl: one JSON object per line with its "step"; a finished run's last line carries `"final": true`
(written after the final checkpoint and the export), which is how a re-run knows there is nothing left to do.
A torn line (a kill in the middle of a write) is dropped with a warning when the file is read back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys

from tqdm.auto import tqdm

from align_jax.logfile import read_metrics

log = logging.getLogger(__name__)


def final_metrics(path: str, step: int) -> dict | None:
    """What a finished run returned (its last step's training metrics and final evaluation, from the lines of
    `step`), or None when the run's final line is not in the log."""
    at = [row for row, _ in read_metrics(path) if row["step"] == step]
    if not any(row.get("final") for row in at):
        return None
    out = {}
    for row in at:
        out.update({k: float(v) for k, v in row.items() if k not in ("step", "final")})
    return out


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops logged lines of steps > `step` (logged by a run killed after its last checkpoint) and torn ones."""
        if not self.enabled:
            return
        path = self.jsonl.name
        self.jsonl.close()
        lines = [line for row, line in read_metrics(path) if row["step"] <= step]
        with open(path, "w") as f:
            f.writelines(lines)
        self.jsonl = open(path, "a")

    def write(self, step: int, metrics: dict, *, tensorboard: bool = True, final: bool = False) -> None:
        """One line of `metrics` at `step` (none when empty, unless `final`: the run's last line)."""
        if not self.enabled or not (metrics or final):
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": int(step), **clean, **({"final": True} if final else {})}) + "\n")
        self.jsonl.flush()
        if tensorboard:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


class ProgressBar:
    """A tqdm bar when `bar` and stderr is a terminal; otherwise one log line every `log_every` steps."""

    def __init__(self, total: int, initial: int, enabled: bool = True, *, bar: bool = True, log_every: int = 10):
        self.total, self.log_every = total, max(int(log_every), 1)
        self.lines = enabled and not (bar and sys.stderr.isatty())
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, disable=not enabled or self.lines,
                        desc="train")

    def update(self, step: int, m: dict) -> None:
        if self.lines:
            if step % self.log_every == 0 or step == self.total:
                log.info("step %d/%d: loss %.4f, %.0f tok/s, lr %.3g", step, self.total, m["loss"],
                         m.get("tokens_per_second", 0.0), m.get("learning_rate", float("nan")))
            return
        self.bar.n = step
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m.get('tokens_per_second', 0):.0f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class ZeroGradWatch:
    """Warns once when the gradient norm has been exactly 0 for `n` consecutive steps: nothing is learning."""

    HINT = ("the loss does not depend on the trainable parameters: e.g. a loss whose terms cancel (soft labels "
            "chosen_prob = 0.5, or loss.kwargs.label_smoothing = 0.5), frozen or disconnected parameters, or batches "
            "whose loss masks are all zero (every completion truncated away: data.max_length, "
            "data.max_prompt_length); a tiny learning rate does not do this (the gradient is measured before it)")

    def __init__(self, n: int = 3):
        self.n, self.run, self.warned = n, 0, False

    def update(self, step: int, grad_norm: float) -> bool:
        """True when this step triggered the warning."""
        self.run = self.run + 1 if grad_norm == 0.0 else 0
        if self.n <= 0 or self.warned or self.run < self.n:
            return False
        self.warned = True
        log.warning("the gradient norm has been exactly 0 for %d consecutive steps (steps %d-%d): the parameters do "
                    "not change. Likely %s", self.n, step - self.n + 1, step, self.HINT)
        return True
