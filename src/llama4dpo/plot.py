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


def plot_frontier(rows: list[dict], path: str | Path) -> Path:
    """Ground-truth reward against KL(pi || pi_ref) (the DPO paper's frontier, its fig. 2): a curve per sweep run
    from the reference (KL 0) through its evaluated steps, a colour per objective, the run's beta at its end."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, list[dict]] = {}
    for r in rows:
        runs.setdefault(r["run"], []).append(r)
    objectives = sorted({str(r.get("loss_type", "sigmoid")) for r in rows})
    colours = {o: plt.get_cmap("tab10")(i % 10) for i, o in enumerate(objectives)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in runs.items():
        points = sorted(points, key=lambda r: r["step"])
        objective = str(points[0].get("loss_type", "sigmoid"))
        kl = [0.0] + [p["kl"] for p in points]
        reward = [points[0]["reward_reference"]] + [p["reward"] for p in points]
        ax.plot(kl, reward, "o-", color=colours[objective], markersize=3, alpha=0.8)
        if "beta" in points[-1]:
            ax.annotate(f"β={points[-1]['beta']:g}", (kl[-1], reward[-1]), fontsize=7, xytext=(3, 2),
                        textcoords="offset points")
    for o in objectives:
        ax.plot([], [], "o-", color=colours[o], label=o)
    if rows:
        ax.axhline(rows[0]["reward_reference"], color="grey", lw=0.8, ls=":", label="reference")
    ax.set_xlabel("KL(policy ‖ reference), nats per answer (held-out prompts)")
    ax.set_ylabel("ground-truth reward (held-out)")
    ax.set_title("reward against KL along training, per objective and β")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
