"""The recipe: `run(stage, ...)` wires data, model, objective and the one Trainer together for pretrain, sft and dpo."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..checkpoint import (WRITE_ERRORS, load_model, load_tokenizer, resolve_checkpoint, save_model,
                          write_error_cause)
from ..checkpoint.adapters import base_record, checkpoint_fingerprint
from ..checkpoint.run_dir import holds_run_dir, prepare_run_dir, release_run_dir
from ..config import Config, TrainConfig
from ..data import (check_context, collate_sft, load_preference_data, load_sft_data, load_token_streams,
                    load_unpaired_data, preference_collator, training_texts)
from ..data.batches import ExampleBatches, StreamBatches
from ..errors import UserError
from ..losses import REFERENCE_FREE
from ..model import LlamaModel
from ..model.lora import WithoutAdapters, apply_lora, trainable_summary
from ..objectives import LanguageModeling, precompute_reference_logps, preference_objective
from ..resources import check_training
from ..runtime import ThreadChooser, autocast, resolve_device
from ..tokenizer import build_tokenizer, load_tokenizer as load_tokenizer_file
from .distributed import Dist
from .trainer import Trainer, check_compile_mode


def _setup(cfg: Config, show: bool) -> tuple[Dist, torch.device, bool, ThreadChooser]:
    """Join torchrun's process group if there is one; set the CPU thread count (train.threads) before any work;
    only rank 0 prints."""
    dist = Dist.from_env(cfg.distributed.strategy, cfg.train.device)
    check_compile_mode(cfg.train, dist)
    if dist.enabled and show and dist.is_main:
        print(f"{dist.world} processes, {dist.strategy}; batch_size {cfg.train.batch_size} is the global batch")
    device = dist.place(resolve_device(cfg.train.device))
    threads = ThreadChooser(cfg.train.threads, device)
    said = threads.start()
    if show and dist.is_main and device.type == "cpu":
        print(said)
    return dist, device, show and dist.is_main, threads


def _finish(trainer: Trainer, out: Path, cfg: Config, tokenizer, show: bool) -> Path:
    state = trainer.dist.model_state(trainer.model)  # every rank takes part (FSDP2 gathers shards)

    def write():
        try:
            final = save_model(out / "final", trainer.model, cfg, tokenizer, state, trainer.base)
        except UserError as e:  # (a write error, or a NaN the checks before could not see)
            raise UserError(f"{e}; stopped. Last good checkpoint: {trainer.latest_checkpoint()}") from None
        return final
    final = trainer.dist.on_main(write)
    if show:
        print(f"done: {final} (metrics: {out / 'metrics.jsonl'})")
    trainer.engine = trainer.model  # drop the DDP wrapper (and its hold on the process group) first
    trainer.dist.close()
    return final


def releases_run_dir(run):
    """The run directory's lock (taken by prepare_run_dir) is released however the run ends - by the call
    that took it only (a second call refused for the same directory leaves the first one's lock alone)."""
    @functools.wraps(run)
    def wrapper(stage: str, cfg: Config, data: str, out: str | Path, *args, **kwargs) -> Path:
        held_before = holds_run_dir(Path(out))
        try:
            return run(stage, cfg, data, out, *args, **kwargs)
        finally:
            if not held_before:
                release_run_dir(Path(out))
    return wrapper


STAGES = ("pretrain", "sft", "dpo")


@releases_run_dir
def run(stage: str, cfg: Config, data: str, out: str | Path, init: str | Path | None = None,
        ref: str | Path | None = None, *, overwrite=False, resume=False, show=True,
        shared_ref: Path | None = None) -> Path:
    """Train one stage into the run directory `out` and return its final checkpoint.

    pretrain: a new model, and a tokenizer built from `data`'s text, trained on its token stream.
    sft:      the checkpoint `init` trained on the chosen responses of `data`'s pairs.
    dpo:      the checkpoint `init` trained on `data`'s pairs against the reference `ref` (default: `init`).
    `shared_ref`: a directory whose ref_logps_*.safetensors another run computed (`llama4dpo sweep`): reused
    where their key (reference weights and token ids) matches this run's.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage == "pretrain" and cfg.lora.enabled:
        raise UserError("lora.rank > 0 adapts a trained model (sft, dpo); pretraining trains every weight: "
                        "set lora.rank=0")
    out = Path(out)
    dist, device, show, threads = _setup(cfg, show)
    micro, rows = batch_plan(cfg.train, dist)
    if stage == "pretrain":
        tokenizer, inputs = _new_tokenizer(cfg, data, out, overwrite, dist), {"command": stage, "data": data}
    else:
        init, cfg, tokenizer = _init_from(cfg, init)
        ref = resolve_checkpoint(ref) if ref is not None else init
        inputs = {"command": stage, "data": data, "init": init.resolve(),
                  **({"ref": ref.resolve()} if stage == "dpo" else {})}
    # LoRA: the base's fingerprint taken once, before it is read; DPO's reference is then the adapters off
    base = dist.on_main(base_record, init) if cfg.lora.enabled else None
    own_ref = stage == "dpo" and ref.resolve() == init.resolve()
    free = stage == "dpo" and cfg.dpo.loss_type in REFERENCE_FREE  # its loss never reads a reference
    check_training(cfg, device, reference=stage == "dpo" and not (cfg.dpo.precompute_ref or free or (base and own_ref)),
                   command=stage, world_size=dist.world,
                   sharded=dist.strategy == "fsdp")
    resume_from = dist.on_main(prepare_run_dir, out, cfg, overwrite=overwrite, resume=resume, inputs=inputs)
    dist.on_main(_save_tokenizer, out, tokenizer)
    if stage == "pretrain":
        model, objective, eval_objective, train, evals = _pretrain_parts(cfg, data, tokenizer, micro, rows, device, show)
    else:
        pdata = _examples(stage, cfg, data, out, tokenizer, show, dist)
        torch.manual_seed(cfg.train.seed)
        model = load_model(init, device)
        if cfg.lora.enabled:
            apply_lora(model, cfg.lora, cfg.lora.bf16_base(cfg.train.precision))
            if show:
                print(f"LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}"
                      f"{' and the routers' if cfg.lora.train_router else ''}: {trainable_summary(model)}")
        collate = collate_sft if stage == "sft" else preference_collator(cfg.dpo.share_prompt)
        collate = functools.partial(collate, pad_id=tokenizer.pad_id, pad_to_multiple_of=cfg.data.pad_to_multiple_of)
        train = ExampleBatches(pdata.train, collate, micro, cfg.train.grad_accum_steps, cfg.train.seed, rows)
        evals = (ExampleBatches(pdata.eval, collate, micro, 1, cfg.train.seed).fixed(cfg.train.eval_batches)
                 if len(pdata.eval) else None)
        if stage == "sft":
            objective = eval_objective = LanguageModeling()
        else:
            objective, eval_objective = _preference_objectives(cfg, model, own_ref, ref, train, evals, pdata, out,
                                                               device, dist, show, shared_ref)
    trainer = Trainer(cfg, model, objective, train, evals, out, tokenizer, device=device, show_progress=show,
                      eval_objective=eval_objective, dist=dist, base=base, threads=threads)
    if resume_from is not None:
        trainer.resume(resume_from)
    trainer.fit()
    return _finish(trainer, out, cfg, tokenizer, show)


def batch_plan(t: TrainConfig, dist: Dist) -> tuple[int, slice]:
    """The global batch split once: (rows of one micro-batch over all processes, this process's share of them).
    batch_size must divide into grad_accum_steps micro-batches of equal rows on every process."""
    if t.batch_size % (t.grad_accum_steps * dist.world):
        raise UserError(f"train.batch_size={t.batch_size} must be divisible by grad_accum_steps x processes "
                        f"= {t.grad_accum_steps} x {dist.world}")
    micro = t.batch_size // t.grad_accum_steps
    return micro, dist.rows(micro)


def _new_tokenizer(cfg: Config, data: str, out: Path, overwrite: bool, dist: Dist):
    """Pretraining's tokenizer, built from the data (or the resumed run's own); the model's vocabulary and
    special ids follow it."""
    if (out / "tokenizer.json").is_file() and not overwrite:
        tokenizer = load_tokenizer_file(out / "tokenizer.json")  # a resumed run keeps its tokenizer
    else:
        tokenizer = build_tokenizer(cfg.data.tokenizer, training_texts(data, cfg.data), cfg.data.bpe_vocab_size)
    m = cfg.model
    m.vocab_size, m.pad_token_id, m.bos_token_id, m.eos_token_id = (
        tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    cfg.validate()
    if dist.on_main(tokenizer.fingerprint) != tokenizer.fingerprint():
        raise UserError("the processes built different tokenizers from the same data; train one with a single "
                        "process first and resume from its run directory")
    return tokenizer


def _pretrain_parts(cfg: Config, data: str, tokenizer, micro: int, rows: slice, device, show: bool):
    train_stream, eval_stream = load_token_streams(data, cfg.data, tokenizer)
    if show:
        print(f"pretraining on {data}: {len(train_stream):,} tokens, vocabulary {tokenizer.vocab_size}")
    torch.manual_seed(cfg.train.seed)
    model = LlamaModel(cfg.model).init_weights(seed=cfg.train.seed).to(device)
    evals = StreamBatches(eval_stream, micro, cfg.train.seed).fixed(cfg.train.eval_batches) if eval_stream else None
    train = StreamBatches(train_stream, micro, cfg.train.seed, rows=rows)
    return model, LanguageModeling(), None, train, evals


def _preference_objectives(cfg: Config, model, own_ref: bool, ref: Path, train, evals, pdata, out: Path, device,
                           dist: Dist, show: bool = False, shared_ref: Path | None = None):
    """DPO's objectives for training and eval: against the reference model, or against its log-probs computed
    once (dpo.precompute_ref), in which case no reference is held while training. With LoRA the reference is
    the policy with its adapters off: the same weights, no second copy. A reference-free loss (SimPO, ORPO) gets
    none at all: no model loaded, no table computed."""
    if cfg.dpo.loss_type in REFERENCE_FREE:
        if show:
            print(f"dpo.loss_type={cfg.dpo.loss_type} is reference-free: no reference model is loaded")
        objective = preference_objective(cfg.dpo)
        return objective, objective
    if cfg.lora.enabled and own_ref:
        reference = WithoutAdapters(model)
    elif cfg.dpo.precompute_ref and own_ref:
        reference = model  # the policy before its first step is the reference: no second copy is loaded
    else:
        reference = load_model(ref, device)
        reference.requires_grad_(False)
        if dist.enabled and dist.strategy == "fsdp":
            dist.shard(reference, cfg.train.precision)  # every rank holds a shard; forwards gather it per block
    if not cfg.dpo.precompute_ref:
        objective = preference_objective(cfg.dpo, reference=reference)
        return objective, objective
    # Every rank computes the whole table (all take part in FSDP2's gathers); rank 0 caches it.
    with autocast(cfg.train.precision, device):
        train_logps = cached_reference_logps(out, "train", reference, train, len(pdata.train), ref, device, dist,
                                             shared_ref)
        eval_logps = (cached_reference_logps(out, "eval", reference, evals, len(pdata.eval), ref, device, dist,
                                             shared_ref) if evals else None)
    return (preference_objective(cfg.dpo, reference_logps=train_logps),
            preference_objective(cfg.dpo, reference_logps=eval_logps) if evals else None)


def _save_tokenizer(out: Path, tokenizer) -> None:
    """A resumed run must keep the tokenizer it started with (ids would silently mean other text)."""
    path = out / "tokenizer.json"
    if path.is_file() and load_tokenizer_file(path).fingerprint() != tokenizer.fingerprint():
        raise UserError(f"{out}: holds a run with a different tokenizer than {tokenizer.__class__.__name__} "
                        f"of vocabulary {tokenizer.vocab_size} now given; use another --out or --overwrite")
    tokenizer.save(path)


def _init_from(cfg: Config, init: str | Path) -> tuple[Path, Config, object]:
    init = resolve_checkpoint(init)
    init_cfg = Config.load_json(init / "config.json")
    cfg.model = init_cfg.model  # the architecture comes from the checkpoint being fine-tuned
    cfg.validate()
    check_context(cfg.data, cfg.model.max_position_embeddings)  # before the run directory is touched
    return init, cfg, load_tokenizer(init)


def _examples(stage: str, cfg: Config, data: str, out: Path, tokenizer, show: bool, dist: Dist):
    """SFT demonstrations or DPO pairs, with their data report printed and written to OUT/data_report.txt."""
    if not show:
        import datasets
        datasets.disable_progress_bars()
    load = (load_sft_data if stage == "sft" else load_unpaired_data if cfg.dpo.loss_type == "kto"
            else load_preference_data)
    examples = load(data, cfg.data, tokenizer)
    summary = examples.report.summary()
    if dist.is_main:
        (out / "data_report.txt").write_text(summary + "\n", encoding="utf-8")
    if show:
        print(summary)
    return examples


def cached_reference_logps(out: Path, split: str, reference, batches, n: int, ref_path: Path, device,
                           dist: Dist | None = None, shared: Path | None = None):
    """Reference log-probs for every example, cached in OUT/ref_logps_{split}.safetensors and keyed by the
    reference weights and the exact token ids, so a resumed run reuses them and a changed input does not; so does
    a run given another's cache (`shared`, a directory)."""
    if isinstance(batches, ExampleBatches):
        batches = batches.fixed()
    key = hashlib.sha256()
    key.update(checkpoint_fingerprint(ref_path).encode())
    for b in batches:
        for name in sorted(b):  # the token ids and the layout (labels, or targets and their positions)
            if name != "index":
                key.update(name.encode())
                key.update(np.ascontiguousarray(b[name].numpy()).tobytes())
    key = key.hexdigest()
    path = out / f"ref_logps_{split}.safetensors"
    dist = dist or Dist()
    if shared is not None and dist.on_main(_read_cache, shared / path.name, key):
        dist.on_main(shutil.copyfile, shared / path.name, path)
    cached = dist.on_main(_read_cache, path, key)  # every rank decides alike (they all read, or all compute)
    if cached:
        with safe_open(str(path), "pt") as f:
            return f.get_tensor("sums"), f.get_tensor("counts")
    sums, counts = precompute_reference_logps(reference, batches, n, device)
    dist.on_main(_write_cache, path, {"sums": sums, "counts": counts}, key)
    return sums, counts


def _write_cache(path: Path, tensors: dict, key: str) -> None:
    """Written beside, then renamed: a full disk never leaves a truncated cache under the real name."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"key": key})
        os.replace(tmp, path)
    except WRITE_ERRORS as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({write_error_cause(e, path.parent)})") from None


def _read_cache(path: Path, key: str) -> bool:
    """Whether the cache holds this key (an unreadable cache is a miss: it is computed and written anew)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("key") == key
    except (SafetensorError, OSError):
        return False