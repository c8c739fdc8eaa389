"""What the benchmarks run: the model presets, their checkpoints (ours and the transformers export of the same
weights), the synthetic preference data, and `llama4dpo dpo`'s recipe run in-process with a hook per step.

Presets come from config files, never restated here: "100m" and "tiny" are the package's presets
(`src/llama4dpo/configs/llama4-100m.toml`, `tiny.toml`), "15m" is `benchmarks/configs/15m.toml`; all are read by
`Config.load`, as `llama4dpo dpo --config NAME` reads them. A preset here adds only the benchmark's shape: pairs
per step, tokens per sequence and the expert counts measured.

Data: random token ids, each sequence exactly `seq` tokens (bos + prompt of seq/2, response of seq/2 ending in
eos, no padding), or pairs of a given (prompt, chosen, rejected) length (`lengths`). Token i is written as the character chr(0x20000 + i) (CJK Extension B: one code point each,
unchanged by NFKC), so our character tokenizer and the transformers tokenizer given to TRL both read the text
back as exactly the ids it spells.
"""

from __future__ import annotations

import json
from pathlib import Path

import harness

PAD, BOS, EOS = 0, 1, 2
FIRST_ID = 4  # ids 0..3 are <pad>, <bos>, <eos>, <unk> in our tokenizers: the data draws from 4..vocab-1
CHAR_BASE = 0x20000

PRESETS = {
    "15m": dict(config=str(harness.HERE / "configs" / "15m.toml"), pairs=8, seq=128, experts=[4, 8, 16]),
    "100m": dict(config="llama4-100m", pairs=8, seq=512, experts=[16]),  # one GPU
    "tiny": dict(config="tiny", pairs=4, seq=32, experts=[4]),           # smoke runs
}


# ---- model and checkpoints ---------------------------------------------------------------------------------
def load_config(preset: str, overrides: list[str] = ()):
    from llama4dpo import Config
    return Config.load(PRESETS[preset]["config"], list(overrides))


def model_config(preset: str, experts: int):
    return load_config(preset, [f"model.num_local_experts={experts}", f"model.pad_token_id={PAD}",
                                f"model.bos_token_id={BOS}", f"model.eos_token_id={EOS}"]).model


def our_tokenizer(vocab: int):
    """Our character tokenizer whose id i is chr(CHAR_BASE + i) (sorted after the 4 specials: ids line up)."""
    from llama4dpo.tokenizer import CharTokenizer
    return CharTokenizer([chr(CHAR_BASE + i) for i in range(FIRST_ID, vocab)])


def build_checkpoints(preset: str, experts: int, workdir: Path, seed: int = 0) -> tuple[Path, Path, dict]:
    """Our checkpoint (with its tokenizer) and its `export_hf` twin (identical weights): (ckpt, hf_dir, info).
    Made once per workdir: a second call (another benchmark given the same --workdir) reuses them."""
    import torch
    from llama4dpo import Config, LlamaModel, save_model
    from llama4dpo.interop.hf import export_hf

    cfg = model_config(preset, experts)
    ckpt, hf_dir = Path(workdir) / f"{preset}-ours-e{experts}", Path(workdir) / f"{preset}-hf-e{experts}"
    info_file = Path(workdir) / f"{preset}-e{experts}.json"
    if info_file.is_file() and (hf_dir / "config.json").is_file():
        return ckpt, hf_dir, json.loads(info_file.read_text())
    torch.manual_seed(seed)
    model = LlamaModel(cfg).init_weights(seed=seed)
    total, active = model.num_params()
    embed = model.embed_tokens.weight.numel()
    save_model(ckpt, model, Config(model=cfg), our_tokenizer(cfg.vocab_size))
    export_hf(ckpt, hf_dir)
    info = dict(experts=experts, total_params=total, active_params=active, flop_params=active - embed,
                expert_width=cfg.expert_size, dense_width=cfg.dense_size, moe_layers=list(cfg.moe_layer_ids),
                vocab=cfg.vocab_size)
    info_file.write_text(json.dumps(info))
    return ckpt, hf_dir, info


def describe_models(models: dict) -> list[str]:
    return [f"- E={E}: {i['total_params'] / 1e6:.2f}M parameters, {i['active_params'] / 1e6:.2f}M active per token "
            f"({i['flop_params'] / 1e6:.2f}M counted for FLOPs), expert width {i['expert_width']}, dense width "
            f"{i['dense_width']}, MoE layers {i['moe_layers']}" for E, i in models.items()]


def load_hf(hf_dir, device):
    """transformers' Llama4ForCausalLM (LlamaForCausalLM for a dense export) on the exported weights, fp32, SDPA
    attention."""
    import torch
    from transformers import Llama4ForCausalLM, LlamaForCausalLM
    dense = json.loads((Path(hf_dir) / "config.json").read_text())["model_type"] == "llama"
    model = (LlamaForCausalLM if dense else Llama4ForCausalLM).from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation="sdpa").to(device)
    model.base_model_prefix = "model"  # the class says "language_model"; TRL's fused LM head needs the backbone
    return model


# ---- data --------------------------------------------------------------------------------------------------
def lengths(seq: int, shape: list | tuple | None = None) -> tuple[int, int, int]:
    """(prompt incl. bos, chosen incl. eos, rejected incl. eos) token counts of every pair: `shape` when given
    (e.g. [150, 110, 90]: HH-like pairs), else a prompt of seq/2 and responses of seq/2."""
    return tuple(shape) if shape else (seq // 2, seq - seq // 2, seq - seq // 2)


def step_tokens(pairs: int, seq: int, shape=None) -> int:
    """Tokens of a step's prompt+chosen and prompt+rejected rows (no padding): the count every side's tokens/s
    uses."""
    p, c, r = lengths(seq, shape)
    return pairs * (2 * p + c + r)


def make_examples(n_pairs: int, seq: int, vocab: int, seed: int, shape=None) -> list[dict]:
    """Random pairs of fixed lengths (see `lengths`): bos + prompt, responses ending in eos."""
    import torch
    g = torch.Generator().manual_seed(seed)
    p_len, c_len, r_len = lengths(seq, shape)

    def draw(n):
        return torch.randint(FIRST_ID, vocab, (n,), generator=g).tolist()
    return [{"prompt_ids": [BOS] + draw(p_len - 1), "chosen_ids": draw(c_len - 1) + [EOS],
             "rejected_ids": draw(r_len - 1) + [EOS]} for _ in range(n_pairs)]


def text(ids) -> str:
    return "".join(chr(CHAR_BASE + i) for i in ids)


def pair_texts(e: dict, bos_in_text: bool = False) -> dict:
    """An example as explicit-format text, without the responses' eos (both tokenizers append it) and without
    the prompt's bos (ours adds it; TRL does not, so its text starts with the bos character: bos_in_text)."""
    return {"prompt": text(e["prompt_ids"][0 if bos_in_text else 1:]), "chosen": text(e["chosen_ids"][:-1]),
            "rejected": text(e["rejected_ids"][:-1])}


def write_pairs(examples: list[dict], path: Path) -> Path:
    """A JSONL preference file in the explicit format, what `llama4dpo dpo --data` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps(pair_texts(e), ensure_ascii=False) + "\n")
    return path


def hf_tokenizer(vocab: int):
    """A transformers tokenizer whose token i is the single character chr(CHAR_BASE + i) (BPE with no merges)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE(vocab={chr(CHAR_BASE + i): i for i in range(vocab)}, merges=[]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=chr(CHAR_BASE + PAD),
                                   bos_token=chr(CHAR_BASE + BOS), eos_token=chr(CHAR_BASE + EOS))


def preference_rows(examples: list[dict]) -> dict:
    """[prompt+chosen rows; prompt+rejected rows], right-padded, labels -100 on prompt and padding: the
    two-row layout TRL and the hand-written transformers step train on."""
    import torch
    rows, labels = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for e in examples:
            rows.append(e["prompt_ids"] + e[key])
            labels.append([-100] * len(e["prompt_ids"]) + e[key])
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    lab = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, :len(r)], lab[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), torch.tensor(lb), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


# ---- the CLI's DPO recipe, in this process ------------------------------------------------------------------
class StopRun(Exception):
    """Raised by a step hook once the benchmark has what it measures: the run ends there, writing nothing more."""


def dpo_overrides(pairs: int, seq: int, steps: int, device: str, seed: int, shape=None) -> list[str]:
    """The `key=value` overrides of the benchmark's `llama4dpo dpo` run: one micro-batch of `pairs` per step, a
    flat learning rate of 1e-6, no weight decay, no held-out split, no log row / evaluation / checkpoint before
    the last step (the step hook ends the run there)."""
    later = steps + 1
    p, c, r = lengths(seq, shape)
    return [f"train.batch_size={pairs}", "train.grad_accum_steps=1", "train.lr=1e-6", "train.warmup_steps=0",
            f"train.max_steps={steps}", "train.weight_decay=0.0", "train.grad_clip=1.0", f"train.seed={seed}",
            f"train.device={device}", f"train.log_every={later}", f"train.eval_every={later}",
            f"train.save_every={later}", "data.format=explicit", "data.eval_fraction=0.0",
            f"data.max_length={p + max(c, r)}", f"data.max_prompt_length={p}", "dpo.beta=0.1"]


def run_dpo_recipe(cfg, data: Path, out: Path, init: Path, on_step) -> None:
    """`llama4dpo dpo --data DATA --init INIT --out OUT` with `cfg` (what the CLI builds from --config and its
    overrides), see `run_recipe`."""
    run_recipe("dpo", cfg, data, out, init, on_step)


def run_recipe(stage: str, cfg, data, out: Path, init, on_step) -> None:
    """`llama4dpo STAGE` with `cfg`: the CLI's own recipe, `llama4dpo.train.recipes.run(stage, ...)`. `on_step(trainer,
    step)` wraps each optimizer step of its training loop: `step()` runs the step and returns its metrics; the hook
    may raise StopRun to end the run."""
    from llama4dpo.train import recipes

    trainer_cls = recipes.Trainer  # the class the recipe builds its trainer from
    original = trainer_cls.train_step

    def train_step(self):
        return on_step(self, lambda: original(self))
    trainer_cls.train_step = train_step
    try:
        recipes.run(stage, cfg, str(data), out, init, show=False)
    except StopRun:
        pass
    finally:
        trainer_cls.train_step = original


def dpo_cli(preset: str, overrides: list[str]) -> str:
    """The command line that trains as a benchmark setting does (for the report)."""
    cfg = PRESETS[preset]["config"]
    name = cfg if "/" not in cfg else "benchmarks/configs/" + Path(cfg).name
    return " ".join([f"llama4dpo dpo --config {name} --data PAIRS --init CKPT --out RUN", *overrides])
