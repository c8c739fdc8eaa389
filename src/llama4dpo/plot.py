"""`llama4dpo plot RUN_DIR`: PNG curves of a run's metrics.jsonl (train and eval), one figure per metric."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .metrics import read_metrics

PANELS = ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
          "logps/chosen", "logps/rejected", "lr", "grad_norm", "tokens_per_s"]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise UserError(f"{run_dir}: no metrics.jsonl rows to plot")
    out_dir = Path(out_dir or run_dir / "plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PANELS:
        train = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
        evals = [(r["step"], r["eval_" + name]) for r in rows if isinstance(r.get("eval_" + name), (int, float))]
        if not train and not evals:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for series, label, style in ((train, "train", "-"), (evals, "eval", "o--")):
            if series:
                ax.plot(*zip(*series), style, label=label, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / (name.replace("/", "_") + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
