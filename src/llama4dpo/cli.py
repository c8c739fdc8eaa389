"""The `llama4dpo` command line. Each subcommand is a small function; heavy imports happen inside them.

A user's mistake (bad config key, missing file, malformed data) is printed as one line, `error: ...`,
with exit status 2 - never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def cmd_info(args) -> int:
    from .checkpoint import load_model, has_tokenizer
    from .commands import checkpoint_arg

    ckpt = checkpoint_arg(args.ckpt)  # a run directory too, as the other commands take
    model = load_model(ckpt)
    m = model.cfg
    total, active = model.num_params()
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
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_export_hf(args) -> int:
    from .commands import checkpoint_arg
    from .interop import export_hf

    out = export_hf(checkpoint_arg(args.ckpt), args.out_dir)  # a run directory too, as the other commands take
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_import_hf(args) -> int:
    from .interop import import_hf

    out = import_hf(args.hf_dir, args.out_ckpt)
    print(f"wrote {out}")
    return 0


def cmd_manifest(args) -> int:
    from pathlib import Path

    from .checkpoint import MANIFEST, refuse_symlinks, write_manifest

    path = Path(args.ckpt)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise UserError(f"{path}: not a checkpoint directory (no config.json and model.safetensors)")
    refuse_symlinks(path)
    write_manifest(path)
    print(f"wrote {path / MANIFEST}: this checkpoint's files as they are now are trusted from here on")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama4dpo", description="Llama 4 (text, MoE) with pretraining, SFT and DPO.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

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

    s = sub.add_parser("manifest", help="trust a checkpoint as it is: (re)write its manifest.json of sizes and "
                                        "sha256 sums, which resuming requires")
    s.add_argument("ckpt")
    s.set_defaults(func=cmd_manifest)

    from .commands import add_commands  # training, evaluation and generation commands
    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides (section.key=value) may come before or after options, so collect them from the leftovers.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except UserError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # always exactly one line
        return 2
    except OSError as e:  # a file we could not write or read (disk full, read-only, permissions) that no
        where = f"{e.filename}: " if e.filename else ""  # narrower handler named: still one line
        print("error: " + " ".join(f"{where}{e.strerror or e}".split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
