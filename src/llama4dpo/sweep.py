"""`llama4dpo sweep`: the reward-against-KL frontier of preference objectives, as one command.

    llama4dpo sweep --init runs/demo/sft --out runs/sweep                       # the default grid below
    llama4dpo sweep --init CKPT --data SRC --out DIR dpo.loss_type=[sigmoid,ipo] dpo.beta=[0.1,0.5] train.lr=1e-4

Every combination of the list-valued overrides (the grid; a field that is itself a list, such as lora.targets,
is never a grid axis) trains from the same --init on the same data, batches and seed. The reference log-probs
are computed once, by the first run that needs them, and every later run reuses them (`recipes.run`'s
`shared_ref`: the cache is keyed by the reference weights and the token ids). Each run is evaluated at `points`
steps along its training on the held-out prompts: the ground-truth reward of its sampled answers (the source's
program-computed score, `builtin:` tasks) and KL(pi || pi_ref) per answer, so each run traces a curve from the
reference (KL 0). Written: results.jsonl (a row per run and point), frontier.png (reward against KL, a colour
per objective, each curve's beta labelled) and a table. A killed sweep continues: runs whose rows are in
results.jsonl are skipped, an interrupted run resumes from its latest checkpoint. Under torchrun every process
trains each run (DDP or FSDP2, as `dpo` does) and the first one evaluates and writes.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import typing
from pathlib import Path

from .checkpoint import checkpoint_dirs, load_model, load_tokenizer, resolve_checkpoint
from .config import Config
from .config.load import _SECTION_TYPES
from .data import load_preference_data
from .errors import UserError
from .evaluate import ground_truth_metrics
from .faults import fault_point
from .metrics import read_metrics
from .plot import plot_frontier
from .train.distributed import Dist
from .train.recipes import run

DEFAULT_GRID = ["dpo.loss_type=[sigmoid,ipo,simpo]", "dpo.beta=[0.03,0.1,0.3,1.0]"]
# The demo's DPO stage without its NLL term: the objectives as their papers define them.
RECIPE = ["train.max_steps=150", "train.lr=1e-4", "train.warmup_steps=20", "train.log_every=25"]
QUICK = ["train.max_steps=4", "train.warmup_steps=1", "train.log_every=1", "data.builtin_size=120"]


def split_grid(overrides: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(fixed overrides, grid axes): `key=[a,b,...]` on a field that is not itself a list is an axis."""
    fixed, axes = [], []
    for item in overrides:
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        section, _, name = key.partition(".")
        hints = typing.get_type_hints(_SECTION_TYPES[section]) if section in _SECTION_TYPES else {}
        listy = typing.get_origin(hints.get(name)) is list
        if value.startswith("[") and value.endswith("]") and not listy:
            values = [v.strip() for v in value[1:-1].split(",") if v.strip()]
            if not values:
                raise UserError(f"sweep: {key}=[] holds no value")
            axes.append((key, values))
        else:
            fixed.append(item)
    return fixed, axes


def run_name(combo: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{key.split('.')[-1]}={value}" for key, value in combo)


def run_sweep(init: str | Path, out: str | Path, data: str = "builtin:assistant", config: str | None = None,
              overrides: list[str] = (), *, points: int = 3, samples: int = 2, quick: bool = False,
              show: bool = True) -> list[dict]:
    start, out = time.perf_counter(), Path(out)
    device = _config(resolve_checkpoint(init), config, split_grid(list(overrides))[0]).train.device
    # Under torchrun, one process group serves every run: a group made again after one was destroyed would find
    # its peers' stale addresses in torchrun's store.
    group = Dist.from_env("ddp", device)
    try:
        return _sweep(init, out, data, config, list(overrides), points, samples, quick, show, start, group)
    finally:
        group.close()


def _sweep(init, out: Path, data: str, config, overrides: list[str], points: int, samples: int, quick: bool,
           show: bool, start: float, group: Dist) -> list[dict]:
    main_process = group.is_main
    init = resolve_checkpoint(init)
    fixed, axes = split_grid(list(overrides))
    if not axes:
        axes = split_grid(DEFAULT_GRID)[1]
    if any(key == "dpo.loss_type" and "kto" in values for key, values in axes):
        raise UserError("sweep: kto trains on unpaired data; sweep the pairwise objectives")
    combos = list(itertools.product(*[[(key, v) for v in values] for key, values in axes]))
    base = [*RECIPE, *fixed, *(QUICK if quick else []), "dpo.precompute_ref=true"]
    base_cfg = _config(init, config, base)
    steps = base_cfg.train.max_steps
    every = max(1, steps // points)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = read_metrics(results)
    counts = {}
    for r in rows:
        counts[r["run"]] = counts.get(r["run"], 0) + 1
    done = {r["run"] for r in rows if counts[r["run"]] == r["points"]}  # (a run cut by a kill mid-write is redone)
    if len(done) < len(counts) and main_process:  # its partial rows go, so that the file holds each run once
        rows = [r for r in rows if r["run"] in done]
        results.with_suffix(".tmp").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(results.with_suffix(".tmp"), results)
    rows = [r for r in rows if r["run"] in done]
    reference, tokenizer = load_model(init), load_tokenizer(init)
    heldout = load_preference_data(data, base_cfg.data, tokenizer)  # (before anything trains)
    if heldout.score is None:
        raise UserError(f"sweep: {data} has no program-computed reward to draw the frontier with (use builtin:NAME)")
    prompts = heldout.eval_prompts[:8] if quick else heldout.eval_prompts
    shared = None
    say = print if main_process else (lambda *a, **k: None)
    say(f"sweep: {len(combos)} runs ({' x '.join(f'{k} {v}' for k, v in axes)}) of {steps} steps from {init}, "
        f"{len(done)} done already; each evaluated at {min(points, steps)} points", flush=True)
    for i, combo in enumerate(combos):
        name = run_name(combo)
        run_dir = out / "runs" / name
        if name in done:
            shared = shared or _cache_dir(run_dir)
            continue
        fault_point("sweep_run", i)
        cfg = _config(init, config, [*base, *[f"{k}={v}" for k, v in combo], f"train.save_every={every}",
                                     f"train.keep_last={points + 2}", f"train.eval_every={steps}"])
        say(f"[{i + 1}/{len(combos)}] {name}", flush=True)
        run("dpo", cfg, data, run_dir, init, show=show, shared_ref=shared)
        shared = shared or _cache_dir(run_dir)
        if not main_process:  # (under torchrun every process trains; the first one evaluates and writes)
            group.barrier()
            continue
        labels = {"loss_type": cfg.dpo.loss_type, "beta": cfg.dpo.beta, **dict(combo)}  # (fixed ones too)
        new = _evaluate(run_dir, labels, name, reference, tokenizer, prompts, heldout.score, samples, quick)
        with results.open("a", encoding="utf-8") as f:  # a run counts as done once its rows are written
            f.write("".join(json.dumps(r) + "\n" for r in new))
        rows += new
        group.barrier()
    if not main_process:
        return rows
    png = plot_frontier(rows, out / "frontier.png")
    seconds = time.perf_counter() - start
    print(table(rows) + f"\n\n{len(combos)} runs, results in {results}, frontier in {png}; {seconds:.0f} s", flush=True)
    return rows


def _config(init: Path, config: str | None, overrides: list[str]) -> Config:
    """--config with the overrides; without one, the --init checkpoint's own config (its data settings fit it)."""
    if config is not None:
        return Config.load(config, overrides)
    return Config.load_json(init / "config.json").with_overrides(overrides)


def _cache_dir(run_dir: Path) -> Path | None:
    return run_dir if (run_dir / "ref_logps_train.safetensors").is_file() else None


def _evaluate(run_dir: Path, combo: dict, name: str, reference, tokenizer, prompts: list[str], score, samples: int,
              quick: bool) -> list[dict]:
    """Each kept checkpoint of the run scored on the held-out prompts (the same samples' seed at every point)."""
    rows, checkpoints = [], checkpoint_dirs(run_dir)
    for ckpt in checkpoints:
        gt = ground_truth_metrics(load_model(ckpt), reference, tokenizer, prompts, score,
                                  max_new_tokens=8 if quick else 48, samples=samples, show=0)
        rows.append({"run": name, **{k.split(".")[-1]: _number(v) if isinstance(v, str) else v
                                     for k, v in combo.items()},
                     "step": int(ckpt.name.split("-")[1]), "reward": gt["reward_policy"],
                     "reward_reference": gt["reward_reference"], "win_rate": gt["win_rate"], "kl": gt["kl"],
                     "prompts": gt["prompts"], "samples": samples, "points": len(checkpoints)})
    return rows


def _number(value: str):
    try:
        return float(value)
    except ValueError:
        return value


def table(rows: list[dict]) -> str:
    """Each run's last point, best reward first: reward, its gain over the reference, KL, reward per nat."""
    last: dict[str, dict] = {}
    for r in rows:
        if r["run"] not in last or r["step"] > last[r["run"]]["step"]:
            last[r["run"]] = r
    lines = ["| run | step | reward | gain over reference | KL (nats/answer) | gain per nat | win rate |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(last.values(), key=lambda r: -r["reward"]):
        gain = r["reward"] - r["reward_reference"]
        lines.append(f"| {r['run']} | {r['step']} | {r['reward']:.3f} | {gain:+.3f} | {r['kl']:.2f} | "
                     f"{gain / r['kl'] if r['kl'] > 0 else float('nan'):+.3f} | {r['win_rate']:.3f} |")
    n = {(r["prompts"], r["samples"]) for r in rows}
    lines.append(f"\n(held-out prompts x samples per point: {', '.join(f'{p} x {s}' for p, s in sorted(n))})")
    return "\n".join(lines)
