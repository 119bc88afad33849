"""Metrics out: every step to `<workdir>/metrics.jsonl`, TensorBoard event files (tensorboardX, no TensorFlow)
every `log_every` steps and for evaluations, and a tqdm progress bar with the loss and tokens/s."""

from __future__ import annotations

import json
import math
import os

from tqdm.auto import tqdm


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops logged lines of steps > `step` (logged by a run killed after its last checkpoint)."""
        if not self.enabled:
            return
        path = self.jsonl.name
        self.jsonl.close()
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(lines)
        self.jsonl = open(path, "a")

    def write(self, step: int, metrics: dict, *, tensorboard: bool = True) -> None:
        if not self.enabled or not metrics:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in metrics.items()}
        self.jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self.jsonl.flush()
        if tensorboard:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


class ProgressBar:
    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, disable=not enabled, desc="train")

    def update(self, step: int, m: dict) -> None:
        self.bar.n = step
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m.get('tokens_per_second', 0):.0f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
