"""The DPO benchmark's settings and the three sides that train, each setting in its own process
(`python benchmarks/dpo_sides.py --worker SPEC`, started by dpo_speed.py):

  * ours: `llama4dpo dpo`'s own recipe (`llama4dpo.train.recipes.run("dpo", ...)`) on a JSONL file of the pairs, with
    the setting's `key=value` overrides, as the CLI runs it; a step is the interval between the ends of
    consecutive optimizer steps of its training loop.
  * trl: TRL's DPOTrainer; a step is the interval between consecutive `on_step_end` callbacks.
  * hf: transformers' model with a hand-written DPO step (frozen reference, AdamW), where TRL is missing.

TRL friction handled here (TRL 1.16, transformers 5.x): Llama4ForCausalLM declares base_model_prefix =
"language_model" while its backbone is `.model`, which breaks TRL's fused LM head -> the instance's prefix is
set to "model" (workload.load_hf); router_aux_loss_coef=0.0 in DPOConfig (else TRL reads config.num_experts,
which Llama4TextConfig lacks); bf16 and gradient_checkpointing are always set explicitly.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import harness
import workload

# side, precision, gradient checkpointing (TRL only), precomputed reference log-probs; for ours also
# train.compile (compile), train.compile_mode (mode), train.activation_memory_budget (budget), dpo.share_prompt
# (share) and any further overrides (overrides); for TRL also a PEFT LoraConfig's arguments (peft)
SETTINGS = {
    "ours-fp32":          dict(side="ours", precision="fp32", gc=False, preref=False),
    "ours-bf16":          dict(side="ours", precision="bf16", gc=False, preref=False),
    "ours-fp32-preref":   dict(side="ours", precision="fp32", gc=False, preref=True),
    "ours-bf16-preref":   dict(side="ours", precision="bf16", gc=False, preref=True),
    # train.compile=true: the model through torch.compile (6 untimed steps first: compilation, recompiles)
    "ours-bf16-compile":  dict(side="ours", precision="bf16", gc=False, preref=False, compile=True),
    "ours-bf16-preref-compile": dict(side="ours", precision="bf16", gc=False, preref=True, compile=True),
    # the same with train.activation_memory_budget=0.8: the compiled step recomputes some activations in backward
    "ours-bf16-preref-compile-lean": dict(side="ours", precision="bf16", gc=False, preref=True, compile=True,
                                          budget=0.8),
    # train.compile_mode=reduce-overhead: the compiled model's graphs replayed as CUDA graphs (on CPU: as compile)
    "ours-bf16-cgraphs":  dict(side="ours", precision="bf16", gc=False, preref=False, compile=True,
                               mode="reduce-overhead"),
    "ours-bf16-preref-cgraphs": dict(side="ours", precision="bf16", gc=False, preref=True, compile=True,
                                     mode="reduce-overhead"),
    # dpo.share_prompt=false: [chosen; rejected] rows, the prompt computed twice (the layout TRL uses)
    "ours-fp32-unshared": dict(side="ours", precision="fp32", gc=False, preref=False, share=False),
    "ours-bf16-unshared": dict(side="ours", precision="bf16", gc=False, preref=False, share=False),
    # reference-free objectives: no reference model loaded, no reference table computed
    "ours-fp32-simpo":    dict(side="ours", precision="fp32", gc=False, preref=False, overrides=["dpo.loss_type=simpo"]),
    "ours-bf16-simpo":    dict(side="ours", precision="bf16", gc=False, preref=False, overrides=["dpo.loss_type=simpo"]),
    "ours-fp32-orpo":     dict(side="ours", precision="fp32", gc=False, preref=False, overrides=["dpo.loss_type=orpo"]),
    "trl-fp32":           dict(side="trl", precision="fp32", gc=False, preref=False),
    "trl-default":        dict(side="trl", precision="bf16", gc=True, preref=False),   # TRL's own defaults
    "trl-bf16":           dict(side="trl", precision="bf16", gc=False, preref=False),
    "trl-fp32-gc":        dict(side="trl", precision="fp32", gc=True, preref=False),
    "trl-default-preref": dict(side="trl", precision="bf16", gc=True, preref=True),
    "trl-bf16-preref":    dict(side="trl", precision="bf16", gc=False, preref=True),
    # transformers model + a hand-written DPO step (frozen reference, AdamW): the fallback where TRL is missing
    "hf-fp32":            dict(side="hf", precision="fp32", gc=False, preref=False),
    "hf-bf16":            dict(side="hf", precision="bf16", gc=False, preref=False),
}
UNTIMED_COMPILE_STEPS = 6  # steps a compiled setting runs before its timed ones (compiling, recompiling)


def describe(name: str) -> str:
    s = SETTINGS[name]
    side = {"ours": "llama4dpo Trainer", "trl": "TRL DPOTrainer", "hf": "transformers + hand-written DPO"}[s["side"]]
    prec = "fp32" if s["precision"] == "fp32" else "bf16 autocast"
    extra = (", grad ckpt" if s["gc"] else "") + (", precomputed ref" if s["preref"] else "") + \
        (", torch.compile" if s.get("compile") else "") + \
        (f", activation memory budget {s['budget']}" if s.get("budget") else "") + \
        (", CUDA graphs" if s.get("mode") == "reduce-overhead" else "") + \
        (", no prefix sharing" if s.get("share") is False else "") + \
        "".join(f", {o.split('=')[1]} (reference-free)" for o in s.get("overrides", ()) if o.startswith("dpo.loss_type"))
    return f"{side} ({prec}{extra})"


def ours_overrides(name: str) -> list[str]:
    """A llama4dpo setting as `llama4dpo dpo` overrides (all explicit: a preset may set some of them), then the
    setting's own `overrides` (e.g. lora.rank=8: benchmarks/lora_speed.py's settings)."""
    s = SETTINGS[name]
    low = lambda b: str(bool(b)).lower()  # noqa: E731
    return [f"train.precision={s['precision']}", f"dpo.precompute_ref={low(s['preref'])}",
            f"train.compile={low(s.get('compile'))}", f"train.compile_mode={s.get('mode', 'default')}",
            f"train.activation_memory_budget={s.get('budget', 1.0)}", f"dpo.share_prompt={low(s.get('share', True))}",
            *s.get("overrides", ())]


# ---- one setting, in its own process -------------------------------------------------------------------------
def worker(spec: dict) -> dict:
    import torch
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    rss0 = harness.rss_bytes()
    if spec["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    st = SETTINGS[spec["setting"]]
    times, others, tokens, *losses = {"ours": dpo_ours, "trl": dpo_trl, "hf": dpo_hf}[st["side"]](spec, st)
    w = spec["warmup"]
    med, n_quiet = harness.quiet_median(times[w:], others[w:])
    out = dict(setting=spec["setting"], experts=spec["experts"], tokens_per_step=tokens, step_s=med,
               tokens_per_s=tokens / med, step_times=[round(t, 4) for t in times],
               others=[round(o, 2) for o in others], quiet_steps=n_quiet, steady_steps=len(times[w:]),
               median_all_s=statistics.median(times[w:]),
               rss_base_mb=rss0 / 2**20, rss_peak_mb=harness.peak_rss_bytes() / 2**20)
    out["rss_train_mb"] = out["rss_peak_mb"] - out["rss_base_mb"]
    # tokens actually run through the model: with prefix sharing our rows hold each prompt once
    P, C, R = workload.lengths(spec["seq"], spec.get("shape"))
    out["computed_tokens"] = spec["pairs"] * (P + C + R) if st["side"] == "ours" and st.get("share", True) \
        else tokens
    if spec["device"].startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if losses:
        out["losses"] = [round(v, 6) for v in losses[0]]
    return out


def dpo_ours(spec, s):
    """`llama4dpo dpo` itself (the CLI's recipe) on the pairs written as JSONL, timed at each step's end."""
    n_steps = spec["warmup"] + spec["steps"]
    untimed = UNTIMED_COMPILE_STEPS if s.get("compile") else 0
    total = untimed + n_steps
    work = Path(spec["workdir"])
    # the same examples (and so the same order) in every llama4dpo setting, compiled or not: step i trains on the
    # same batch in all of them, so their losses can be set side by side
    vocab = json.loads((Path(spec["ckpt"]) / "config.json").read_text())["model"]["vocab_size"]
    examples = workload.make_examples(spec["pairs"] * (UNTIMED_COMPILE_STEPS + n_steps), spec["seq"], vocab,
                                      spec["seed"], spec.get("shape"))
    data = workload.write_pairs(examples, work / "pairs.jsonl")
    cfg = workload.load_config(spec["preset"], workload.dpo_overrides(spec["pairs"], spec["seq"], total,
                                                                      spec["device"], spec["seed"], spec.get("shape"))
                               + ours_overrides(spec["setting"]))
    clock, losses = None, []

    def on_step(trainer, step):
        nonlocal clock
        clock = clock or harness.StepClock(spec["device"])  # from the start of the first step
        out = step()
        losses.append(out["loss"])  # summed over the step's pairs
        clock.tick()
        if len(losses) == total:
            raise workload.StopRun  # no final checkpoint: the run has given what is measured
        return out
    workload.run_dpo_recipe(cfg, data, work / "run", Path(spec["ckpt"]), on_step)
    if len(losses) < total:
        raise RuntimeError(f"the recipe ran {len(losses)} of {total} steps")
    # untimed compile steps (compiling, recompiling; CUDA graphs recorded) first, then the timed ones. The same
    # token count on every side: prompt+chosen and prompt+rejected rows (equal-length rows, no padding),
    # whether or not our rows hold the prompt once (prefix sharing)
    return clock.times[untimed:], clock.others[untimed:], workload.step_tokens(spec["pairs"], spec["seq"],
                                                                               spec.get("shape")), losses


def dpo_trl(spec, s):
    from datasets import Dataset
    import transformers
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    transformers.logging.set_verbosity_error()

    n_steps = spec["warmup"] + spec["steps"]
    vocab = json.loads((Path(spec["hf_dir"]) / "config.json").read_text())["vocab_size"]
    examples = workload.make_examples(spec["pairs"] * n_steps, spec["seq"], vocab, spec["seed"], spec.get("shape"))
    P, C, R = workload.lengths(spec["seq"], spec.get("shape"))
    # TRL tokenizes text and appends eos to the responses itself (and adds no bos: the text holds it)
    texts = [workload.pair_texts(e, bos_in_text=True) for e in examples]
    ds = Dataset.from_dict({k: [t[k] for t in texts] for k in ("prompt", "chosen", "rejected")})
    model = workload.load_hf(spec["hf_dir"], spec["device"])
    peft_config, ref = None, None
    if s.get("peft"):  # PEFT LoRA (lora_speed.py): TRL's reference is then the model with its adapters disabled
        from peft import LoraConfig
        peft_config = LoraConfig(task_type="CAUSAL_LM", **s["peft"])
    else:
        ref = workload.load_hf(spec["hf_dir"], spec["device"])
    args = DPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl-run"), per_device_train_batch_size=spec["pairs"],
        gradient_accumulation_steps=1, max_steps=n_steps, learning_rate=1e-6, weight_decay=0.0, max_grad_norm=1.0,
        bf16=s["precision"] == "bf16", gradient_checkpointing=s["gc"], precompute_ref_log_probs=s["preref"],
        router_aux_loss_coef=0.0, beta=0.1, loss_type="sigmoid", max_length=P + max(C, R) + 8,
        logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=not spec["device"].startswith("cuda"), dataloader_num_workers=0, seed=spec["seed"])
    clock = harness.StepClock(spec["device"])

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.start()

        def on_step_end(self, *a, **k):
            clock.tick()

    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds,
                         processing_class=workload.hf_tokenizer(vocab), callbacks=[Clock()], peft_config=peft_config)
    first = trainer.train_dataset[0]
    want = {(tuple(e["prompt_ids"]), tuple(e["chosen_ids"]), tuple(e["rejected_ids"])) for e in examples}
    got = (tuple(first["prompt_ids"]), tuple(first["chosen_ids"]), tuple(first["rejected_ids"]))
    assert got in want, "TRL tokenized the data differently from our token ids"
    trainer.train()
    return clock.times, clock.others, workload.step_tokens(spec["pairs"], spec["seq"], spec.get("shape"))


def dpo_hf(spec, s):
    """transformers' model with a hand-written DPO step: reference forward (no grad), policy forward + backward,
    clip, AdamW (fused on CUDA). The loss is DPO's sigmoid loss on summed response log-probs."""
    import torch
    import torch.nn.functional as F

    device = spec["device"]
    n_steps = spec["warmup"] + spec["steps"]
    vocab = json.loads((Path(spec["hf_dir"]) / "config.json").read_text())["vocab_size"]
    examples = workload.make_examples(spec["pairs"] * n_steps, spec["seq"], vocab, spec["seed"], spec.get("shape"))
    model = workload.load_hf(spec["hf_dir"], device).train()
    ref = workload.load_hf(spec["hf_dir"], device).eval().requires_grad_(False)
    if s["gc"]:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, fused=device.startswith("cuda"))

    def seq_logps(logits, labels):
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        mask = labels != -100
        picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return ((picked - logits.logsumexp(-1)) * mask).sum(-1)

    clock, tokens = harness.StepClock(device), 0
    for i in range(n_steps):
        rows = workload.preference_rows(examples[i * spec["pairs"]:(i + 1) * spec["pairs"]])
        b = {k: v.to(device) for k, v in rows.items()}
        with harness.autocast(s["precision"], device):
            with torch.no_grad():
                r = seq_logps(ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
            p = seq_logps(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        B = p.shape[0] // 2
        h = (p[:B] - r[:B]) - (p[B:] - r[B:])
        loss = -F.logsigmoid(0.1 * h).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        clock.tick()
        tokens = int(b["attention_mask"].sum())
    return clock.times, clock.others, tokens


def pool_rounds(runs: list[dict], warmup: int) -> dict:
    """One row per setting: the median over the steady steps of all its rounds; memory: the median peak."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[-1]
    steady = [t for r in good for t in r["step_times"][warmup:]]
    others = [o for r in good for o in r["others"][warmup:]]
    out = dict(good[0])
    out["step_s"], out["quiet_steps"] = harness.quiet_median(steady, others)
    out["steady_steps"] = len(steady)
    out["median_all_s"] = statistics.median(steady)
    out["tokens_per_s"] = out["tokens_per_step"] / out["step_s"]
    out["round_tokens_per_s"] = [r["tokens_per_s"] for r in good]
    out["failed_rounds"] = len(runs) - len(good)
    for k in ("rss_peak_mb", "rss_train_mb", "rss_base_mb", "cuda_peak_mb"):
        if k in out:
            out[k] = statistics.median(r[k] for r in good)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        harness.worker_main(worker, sys.argv[2])
    else:
        sys.exit("dpo_sides.py runs one DPO setting for dpo_speed.py (--worker SPEC); run benchmarks/dpo_speed.py")
