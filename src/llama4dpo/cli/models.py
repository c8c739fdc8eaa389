"""Model-file commands: info, export-hf, import-hf, merge, manifest."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..checkpoint import (MANIFEST, has_tokenizer, load_config, load_model, load_tokenizer, refuse_symlinks, save_model,
                          write_manifest)
from ..checkpoint.adapters import is_adapter_checkpoint, read_base
from ..config import LoRAConfig
from ..errors import UserError
from ..interop import export_hf, import_hf
from ..model.lora import merge_lora, trainable_summary
from .args import checkpoint_arg


def cmd_info(args) -> int:
    ckpt = checkpoint_arg(args.ckpt)  # a run directory too, as the other commands take
    model = load_model(ckpt, merge=False)  # (an adapter checkpoint: its adapters on the base, counted)
    adapters = trainable_summary(model)
    m = model.cfg
    total, active = merge_lora(model).num_params()
    moe = m.moe_layer_ids
    rows = [
        ("checkpoint", str(ckpt)),
        ("layers", f"{m.num_hidden_layers} ({len(moe)} MoE: {moe}; NoPE: "
                   f"{[i for i, f in enumerate(m.rope_layer_flags) if not f]})"),
        ("hidden / heads / kv heads / head_dim", f"{m.hidden_size} / {m.num_attention_heads} / {m.n_kv_heads} / {m.d_head}"),
        ("family / source", f"{m.family} / {m.source or 'built by llama4dpo'}"),
        ("experts", f"{m.num_local_experts} routed (top-{m.num_experts_per_tok}) + 1 shared, width {m.expert_size}"
                    if moe else "none (every layer dense)"),
        ("dense MLP width", str(m.dense_size)),
        ("attention chunk", str(m.attention_chunk_size)),
        ("vocab", str(m.vocab_size)),
        ("parameters (total)", f"{total:,}"),
        ("parameters (active per token)", f"{active:,}"),
        ("tokenizer", "yes" if has_tokenizer(ckpt) else "none"),
    ]
    if is_adapter_checkpoint(ckpt):
        lora = load_config(ckpt).lora
        rows += [("LoRA adapters", f"rank {lora.rank}, alpha {lora.alpha:g} on {', '.join(lora.targets)}"
                                   f"{' + routers' if lora.train_router else ''}: {adapters}"),
                 ("base checkpoint", str(read_base(ckpt)))]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_export_hf(args) -> int:
    out = export_hf(checkpoint_arg(args.ckpt), args.out_dir)  # a run directory too, as the other commands take
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_import_hf(args) -> int:
    out = import_hf(args.hf_dir, args.out_ckpt)
    print(f"wrote {out}")
    return 0


def cmd_merge(args) -> int:
    ckpt = checkpoint_arg(args.ckpt)
    if not is_adapter_checkpoint(ckpt):
        raise UserError(f"{ckpt}: holds a whole model already (no adapters.safetensors): nothing to merge")
    base = read_base(ckpt)
    if Path(args.out_ckpt).resolve() == base.resolve():
        raise UserError(f"{args.out_ckpt}: is the base of {ckpt}; write the merged model elsewhere")
    cfg = dataclasses.replace(load_config(ckpt), lora=LoRAConfig())  # a plain model from here on
    out = save_model(args.out_ckpt, load_model(ckpt), cfg, load_tokenizer(ckpt) if has_tokenizer(ckpt) else None)
    print(f"wrote {out}: {ckpt}'s adapters folded into its base, a full checkpoint")
    return 0


def cmd_manifest(args) -> int:
    path = Path(args.ckpt)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise UserError(f"{path}: not a checkpoint directory (no config.json and model.safetensors)")
    refuse_symlinks(path)
    write_manifest(path)
    print(f"wrote {path / MANIFEST}: this checkpoint's files as they are now are trusted from here on")
    return 0



def add_commands(sub) -> None:
    s = sub.add_parser("info", help="layers, experts, total and active parameter counts of a checkpoint or "
                                    "run directory")
    s.add_argument("ckpt")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("export-hf", help="write a directory transformers loads (AutoModelForCausalLM, AutoTokenizer)")
    s.add_argument("ckpt")
    s.add_argument("out_dir")
    s.set_defaults(func=cmd_export_hf)

    s = sub.add_parser("import-hf", help="convert a transformers directory (Llama 4 or dense Llama) or a llama "
                                         "GGUF file into a checkpoint")
    s.add_argument("hf_dir")
    s.add_argument("out_ckpt")
    s.set_defaults(func=cmd_import_hf)

    s = sub.add_parser("merge", help="fold a LoRA run's adapters into its base: a full checkpoint (generate, eval, "
                                     "export-hf and training take either)")
    s.add_argument("ckpt")
    s.add_argument("out_ckpt")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("manifest", help="trust a checkpoint as it is: (re)write its manifest.json of sizes and "
                                        "sha256 sums, which resuming requires")
    s.add_argument("ckpt")
    s.set_defaults(func=cmd_manifest)
