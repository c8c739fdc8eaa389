"""Metrics: JSON lines in `metrics.jsonl` (train and eval rows), a tqdm bar, optionally TensorBoard.

Rows carry TRL's names: `loss`, `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
`rewards/margins`, `logps/chosen`, `logps/rejected`, plus `lr`, `grad_norm`, `tokens_per_s`, `threads` (CPU) and
`expert_load/layer_N` (share of routed tokens per expert; with prefix-shared DPO rows the last layer routes only
the scored positions, see `LlamaModel.forward`'s logit_index). Eval rows prefix names with `eval_`, as TRL does.
Only Python floats are kept between steps - no tensors, so nothing accumulates on the device.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm.auto import tqdm

TIMING_KEYS = {"tokens_per_s", "elapsed_s", "threads"}  # the only fields that differ between identical runs


class MetricsLog:
    def __init__(self, path: Path | None, total_steps: int, start_step: int, *, show: bool = True,
                 tensorboard_dir: Path | None = None, desc: str = "train"):
        self.path = path  # None: write nothing (e.g. every rank but 0)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, disable=not show)
        self.tb = None
        if path is not None and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                print("note: tensorboard is not installed; metrics go to metrics.jsonl only")

    def write(self, row: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def progress(self, step: int, row: dict | None = None) -> None:
        self.bar.update(step - self.bar.n)
        if row:
            shown = {k.split("/")[-1] if k.startswith("rewards/") else k: row[k]
                     for k in ("loss", "rewards/accuracies", "eval_loss", "eval_rewards/accuracies") if k in row}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def note(self, line: str) -> None:
        """A line printed above the progress bar."""
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    """All complete rows; a torn last line (a run killed mid-write) is ignored."""
    rows = []
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep rows up to `last_step` (the checkpoint being resumed), so no step appears twice."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)
