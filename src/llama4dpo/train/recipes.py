"""Recipes: wire data, model, objective and the one Trainer together for pretrain, sft and dpo."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import WEIGHTS, load_model, load_tokenizer, save_model
from ..config import Config
from ..errors import UserError
from ..model import LlamaModel
from .batches import ExampleBatches, StreamBatches
from .objectives import LanguageModeling, Preference, precompute_reference_logps
from .run_dir import prepare_run_dir
from .trainer import Trainer, autocast, resolve_device


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, or a run directory (its final/ or its latest checkpoint)."""
    from .state import checkpoint_dirs

    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    if (path / "final" / WEIGHTS).is_file():
        return path / "final"
    found = checkpoint_dirs(path)
    if found:
        return found[-1]
    raise UserError(f"{path}: not a checkpoint or run directory (no {WEIGHTS})")


def _finish(trainer: Trainer, out: Path, cfg: Config, tokenizer, show: bool) -> Path:
    final = save_model(out / "final", trainer.model, cfg, tokenizer)
    from ..plot import plot_run
    plot_run(out)
    if show:
        print(f"done: {final} (metrics: {out / 'metrics.jsonl'}, plots: {out / 'plots'})")
    return final


def _start(trainer: Trainer, resume_from: Path | None) -> None:
    if resume_from is not None:
        trainer.resume(resume_from)


def run_pretrain(cfg: Config, data: str, out: str | Path, *, overwrite=False, resume=False, show=True) -> Path:
    from ..data import load_token_streams, training_texts
    from ..tokenizer import build_tokenizer, load_tokenizer as load_tok

    out = Path(out)
    if (out / "tokenizer.json").is_file() and not overwrite:
        tokenizer = load_tok(out / "tokenizer.json")  # a resumed run keeps its tokenizer
    else:
        tokenizer = build_tokenizer(cfg.data.tokenizer, training_texts(data, cfg.data), cfg.data.bpe_vocab_size)
    m = cfg.model
    m.vocab_size, m.pad_token_id, m.bos_token_id, m.eos_token_id = (
        tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    cfg.validate()
    resume_from = prepare_run_dir(out, cfg, overwrite=overwrite, resume=resume,
                                  inputs={"command": "pretrain", "data": data})
    _save_tokenizer(out, tokenizer)
    train_stream, eval_stream = load_token_streams(data, cfg.data, tokenizer)
    if show:
        print(f"pretraining on {data}: {len(train_stream):,} tokens, vocabulary {tokenizer.vocab_size}")
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = LlamaModel(cfg.model).init_weights(seed=cfg.train.seed).to(device)
    micro = cfg.train.batch_size // cfg.train.grad_accum_steps
    eval_batches = StreamBatches(eval_stream, micro, cfg.train.seed).fixed(cfg.train.eval_batches) if eval_stream else None
    trainer = Trainer(cfg, model, LanguageModeling(), StreamBatches(train_stream, micro, cfg.train.seed),
                      eval_batches, out, tokenizer, device=device, show_progress=show)
    _start(trainer, resume_from)
    trainer.fit()
    return _finish(trainer, out, cfg, tokenizer, show)


def _save_tokenizer(out: Path, tokenizer) -> None:
    """A resumed run must keep the tokenizer it started with (ids would silently mean other text)."""
    from ..tokenizer import load_tokenizer as load_tok

    path = out / "tokenizer.json"
    if path.is_file() and load_tok(path).fingerprint() != tokenizer.fingerprint():
        raise UserError(f"{out}: holds a run with a different tokenizer than {tokenizer.__class__.__name__} "
                        f"of vocabulary {tokenizer.vocab_size} now given; use another --out or --overwrite")
    tokenizer.save(path)


def _init_from(cfg: Config, init: str | Path) -> tuple[Path, Config, object]:
    init = resolve_checkpoint(init)
    init_cfg = Config.load_json(init / "config.json")
    cfg.model = init_cfg.model  # the architecture comes from the checkpoint being fine-tuned
    cfg.validate()
    return init, cfg, load_tokenizer(init)


def _preference_data(cfg: Config, data: str, out: Path, tokenizer, show: bool, sft: bool = False):
    from ..data import load_preference_data

    if not show:
        import datasets
        datasets.disable_progress_bars()
    pdata = load_preference_data(data, cfg.data, tokenizer, sft=sft)
    summary = pdata.report.summary()
    (out / "data_report.txt").write_text(summary + "\n", encoding="utf-8")
    if show:
        print(summary)
    return pdata


def run_sft(cfg: Config, data: str, out: str | Path, init: str | Path, *, overwrite=False, resume=False,
            show=True) -> Path:
    from ..data import collate_sft

    out = Path(out)
    init, cfg, tokenizer = _init_from(cfg, init)
    resume_from = prepare_run_dir(out, cfg, overwrite=overwrite, resume=resume,
                                  inputs={"command": "sft", "data": data, "init": init.resolve()})
    _save_tokenizer(out, tokenizer)
    pdata = _preference_data(cfg, data, out, tokenizer, show, sft=True)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = load_model(init, device)
    micro = cfg.train.batch_size // cfg.train.grad_accum_steps
    collate = functools.partial(collate_sft, pad_id=tokenizer.pad_id)
    train = ExampleBatches(pdata.train, collate, micro, cfg.train.grad_accum_steps, cfg.train.seed)
    evals = ExampleBatches(pdata.eval, collate, micro, 1, cfg.train.seed).fixed(cfg.train.eval_batches) if len(pdata.eval) else None
    trainer = Trainer(cfg, model, LanguageModeling(), train, evals, out, tokenizer, device=device, show_progress=show)
    _start(trainer, resume_from)
    trainer.fit()
    return _finish(trainer, out, cfg, tokenizer, show)


def run_dpo(cfg: Config, data: str, out: str | Path, init: str | Path, ref: str | Path | None = None, *,
            overwrite=False, resume=False, show=True) -> Path:
    from ..data import collate_preference

    out = Path(out)
    init, cfg, tokenizer = _init_from(cfg, init)
    ref = resolve_checkpoint(ref) if ref is not None else init
    resume_from = prepare_run_dir(out, cfg, overwrite=overwrite, resume=resume,
                                  inputs={"command": "dpo", "data": data, "init": init.resolve(), "ref": ref.resolve()})
    _save_tokenizer(out, tokenizer)
    pdata = _preference_data(cfg, data, out, tokenizer, show)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = load_model(init, device)
    micro = cfg.train.batch_size // cfg.train.grad_accum_steps
    collate = functools.partial(collate_preference, pad_id=tokenizer.pad_id)
    train = ExampleBatches(pdata.train, collate, micro, cfg.train.grad_accum_steps, cfg.train.seed)
    evals = ExampleBatches(pdata.eval, collate, micro, 1, cfg.train.seed).fixed(cfg.train.eval_batches) if len(pdata.eval) else None
    reference = load_model(ref, device)
    reference.requires_grad_(False)
    if cfg.dpo.precompute_ref:
        with autocast(cfg.train, device):
            train_logps = cached_reference_logps(out, "train", reference, train, len(pdata.train), ref, device)
            eval_logps = cached_reference_logps(out, "eval", reference, evals, len(pdata.eval), ref, device) if evals else None
        objective = Preference(cfg.dpo, reference_logps=train_logps)
        eval_objective = Preference(cfg.dpo, reference_logps=eval_logps) if evals else None
        del reference  # the point of precomputing: the reference is not held during training
    else:
        objective = eval_objective = Preference(cfg.dpo, reference=reference)
    trainer = Trainer(cfg, model, objective, train, evals, out, tokenizer, device=device, show_progress=show,
                      eval_objective=eval_objective)
    _start(trainer, resume_from)
    trainer.fit()
    return _finish(trainer, out, cfg, tokenizer, show)


def cached_reference_logps(out: Path, split: str, reference, batches, n: int, ref_path: Path, device):
    """Reference log-probs for every example, cached in OUT/ref_logps_{split}.safetensors and keyed by the
    reference weights and the exact token ids, so a resumed run reuses them and a changed input does not."""
    if isinstance(batches, ExampleBatches):
        batches = batches.fixed()
    key = hashlib.sha256()
    key.update((ref_path / WEIGHTS).read_bytes())
    for b in batches:
        key.update(np.ascontiguousarray(b["input_ids"].numpy()).tobytes())
        key.update(np.ascontiguousarray(b["labels"].numpy()).tobytes())
    key = key.hexdigest()
    path = out / f"ref_logps_{split}.safetensors"
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if f.metadata().get("key") == key:
                return f.get_tensor("sums"), f.get_tensor("counts")
    sums, counts = precompute_reference_logps(reference, batches, n, device)
    save_file({"sums": sums, "counts": counts}, str(path), metadata={"key": key})
    return sums, counts
