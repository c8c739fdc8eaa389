"""Memory estimates from a config, checked before anything large is allocated.

A config far too large for the machine (`model.hidden_size=1000000`, `train.batch_size=100000`, a crafted
checkpoint config.json) should fail at once with a one-line `UserError` that names the setting and the memory
it needs, not after minutes of work with an allocator's traceback. Everything here is arithmetic on the config:
no model is built, nothing iterates over the layers, so a check costs microseconds whatever the sizes.

    check_training(cfg, device, reference=...)       parameters + gradients + AdamW state (+ a DPO reference)
                                                     + activations of one micro-batch
    check_model(model_cfg, device, what)             the weights alone (loading a checkpoint)
    check_generation(model_cfg, batch, max_len, device)   KV cache + logits + prefill activations

The estimates are lower bounds in spirit (see `estimate_training`): a config refused here cannot run, one
accepted may still run short of memory at its edge.
"""

from __future__ import annotations

import dataclasses
import os

from .config import Config, ModelConfig
from .errors import UserError

FP32 = 4
ADAMW_STATE = 2  # exp_avg and exp_avg_sq, one fp32 value each per parameter


def available_bytes(device="cpu") -> int | None:
    """Memory free for new allocations on `device` (a torch.device or its name), None where unknown.

    CPU: MemAvailable from /proc/meminfo, else psutil's, else free pages from os.sysconf.
    CUDA: free device memory (torch.cuda.mem_get_info) plus what PyTorch's caching allocator holds unused.
    """
    kind = _kind(device)
    if kind == "cuda":
        import torch

        try:
            free, _ = torch.cuda.mem_get_info(device)
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        except (RuntimeError, AssertionError, ValueError):  # no usable CUDA device: the run fails elsewhere
            return None
    if kind != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # not installed, or no answer on this platform
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def human(n: float) -> str:
    """Bytes as '1.5 GB' (powers of 1024, one decimal; PB the largest unit)."""
    units = ("B", "KB", "MB", "GB", "TB", "PB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:,.1f} {units[i]}"


# ---- parameters ----------------------------------------------------------------------------------------------

def _num_moe_layers(m: ModelConfig) -> int:
    """`len(m.moe_layer_ids)` without building a list of num_hidden_layers entries (duplicates counted once)."""
    if m.moe_layers is not None:
        return len({i for i in m.moe_layers if 0 <= i < m.num_hidden_layers})
    step = m.interleave_moe_layer_step
    return len(range(step - 1, m.num_hidden_layers, step))


def _parts(m: ModelConfig) -> dict[str, int]:
    """Parameter counts by part: embeddings (+ LM head), attention, MoE and dense feed-forwards, norms."""
    D, L, V = m.hidden_size, m.num_hidden_layers, m.vocab_size
    H, K, d = m.num_attention_heads, m.n_kv_heads, m.d_head
    I, E = m.expert_size, m.num_local_experts
    attention = D * H * d + 2 * D * K * d + H * d * D          # q, k, v, o (qk-norm has no weight)
    if m.attention_bias:
        attention += H * d + 2 * K * d + D
    moe = D * E + E * 3 * D * I + 3 * D * I                     # router, E SwiGLU experts, the shared expert
    dense = 3 * D * m.dense_size
    n_moe = _num_moe_layers(m)
    return {"embeddings": V * D * (1 if m.tie_word_embeddings else 2),
            "attention": L * attention,
            "experts": n_moe * moe,
            "dense": (L - n_moe) * dense,
            "norms": L * 2 * D + D}


def parameter_count(m: ModelConfig) -> int:
    """Total parameters of `LlamaModel(m)`, equal to `LlamaModel(m).num_params()[0]`, in O(1) time."""
    return sum(_parts(m).values())


def _model_settings(m: ModelConfig) -> str:
    """The model.* settings behind most of the parameters, e.g. 'model.vocab_size=..., model.hidden_size=...'."""
    parts = _parts(m)
    big = max(parts, key=parts.get)
    if big == "embeddings":
        return f"model.vocab_size={m.vocab_size}, model.hidden_size={m.hidden_size}"
    keys = [f"model.num_hidden_layers={m.num_hidden_layers}", f"model.hidden_size={m.hidden_size}"]
    if big == "experts":
        keys.append(f"model.num_local_experts={m.num_local_experts}")
        if m.intermediate_size is not None:
            keys.append(f"model.intermediate_size={m.intermediate_size}")
    elif big == "dense" and m.intermediate_size_mlp is not None:
        keys.append(f"model.intermediate_size_mlp={m.intermediate_size_mlp}")
    elif big == "attention":
        keys.append(f"model.num_attention_heads={m.num_attention_heads}")
        if m.head_dim is not None:
            keys.append(f"model.head_dim={m.head_dim}")
    return ", ".join(keys)


# ---- activations ---------------------------------------------------------------------------------------------

def _activations_per_token(m: ModelConfig) -> int:
    """Values autograd keeps per token for backward, summed over the layers (attention scores excluded)."""
    D, H, K, d = m.hidden_size, m.num_attention_heads, m.n_kv_heads, m.d_head
    attention = 4 * D + 2 * (H + 2 * K) * d + H * d      # block input, norms, residual; q/k/v before and after
    #                                                      RoPE and qk-norm; the attention output
    moe = m.num_local_experts + 3 * m.expert_size + m.num_experts_per_tok * (D + 3 * m.expert_size)
    dense = 3 * m.dense_size                              # SwiGLU: gate, up and their product
    n_moe = _num_moe_layers(m)
    return m.num_hidden_layers * attention + n_moe * moe + (m.num_hidden_layers - n_moe) * dense


def _tokens_per_row(cfg: Config, command: str) -> tuple[int, str]:
    if command == "pretrain":
        return cfg.data.block_size + 1, f"data.block_size={cfg.data.block_size}"
    return cfg.data.max_length, f"data.max_length={cfg.data.max_length}"


def lora_parameter_count(cfg: Config) -> int:
    """The parameters a LoRA run trains (the [lora] section on this model): r (in + out) per adapted linear layer,
    E r (in + out) per routed-expert projection, E D per trained router."""
    m, lora, r = cfg.model, cfg.lora, cfg.lora.rank
    D, I, E = m.hidden_size, m.expert_size, m.num_local_experts
    q, kv = m.num_attention_heads * m.d_head, m.n_kv_heads * m.d_head
    n_moe = _num_moe_layers(m)
    swiglu = r * 3 * (D + I)  # gate and up D -> width, down width -> D: r (in + out) each
    count = 0
    if "attention" in lora.targets:
        count += m.num_hidden_layers * r * ((D + q) * 2 + (D + kv) * 2)
    if "mlp" in lora.targets:
        count += (m.num_hidden_layers - n_moe) * r * 3 * (D + m.dense_size)
    if "shared_expert" in lora.targets:
        count += n_moe * swiglu
    if "experts" in lora.targets:
        count += n_moe * E * r * (D + 2 * I + I + D)
    if lora.train_router:
        count += n_moe * E * D
    return count


def estimate_training(cfg: Config, *, reference: bool = False, command: str = "pretrain", world_size: int = 1,
                      sharded: bool = False) -> dict[str, int]:
    """Bytes one training process needs, by part. What it counts:

    parameters  fp32 weights (fp32 master weights under bf16 autocast too; with LoRA a bf16 base where
                lora.base_dtype says so, and the fp32 adapters)
    gradients   one fp32 value per trained parameter (with LoRA: the adapters only)
    optimizer   AdamW's two moments of each trained parameter, fp32
    reference   a frozen fp32 copy of the weights, when DPO holds a reference model (`reference=True`)
    activations one micro-batch (train.batch_size // train.grad_accum_steps rows, split over `world_size`
                processes) of full-length rows (pretrain: data.block_size + 1 tokens; sft/dpo: data.max_length,
                a preference pair counted as one row), each token keeping per layer its hidden states, q/k/v and
                feed-forward intermediates (bf16 under train.precision=bf16), plus fp32 logits and their
                gradient (2 x V values). Attention scores, temporaries, the reference's forward, the allocator's
                slack and the framework itself are left out: a lower bound.

    `sharded` (FSDP) divides the first four parts over `world_size` processes.
    """
    n = parameter_count(cfg.model)
    trained, weight_bytes = n, n * FP32
    if cfg.lora.enabled and command != "pretrain":
        trained = lora_parameter_count(cfg)
        weight_bytes = n * (2 if cfg.lora.bf16_base(cfg.train.precision) else FP32) + trained * FP32
    shards = world_size if sharded else 1
    micro = cfg.train.batch_size // cfg.train.grad_accum_steps
    rows = -(-micro // world_size)
    tokens = rows * _tokens_per_row(cfg, command)[0]
    act_bytes = 2 if cfg.train.precision == "bf16" else FP32
    return {
        "parameters": weight_bytes // shards,
        "gradients": trained * FP32 // shards,
        "optimizer": trained * FP32 * ADAMW_STATE // shards,
        "reference": n * FP32 // shards if reference else 0,
        "activations": tokens * (_activations_per_token(cfg.model) * act_bytes + 2 * cfg.model.vocab_size * FP32),
    }


def check_training(cfg: Config, device, *, reference: bool, command: str = "pretrain", world_size: int = 1,
                   sharded: bool = False) -> dict[str, int]:
    """Raise a one-line UserError when `estimate_training` exceeds the memory available on `device`. It names
    the model settings when the weights and their state alone do not fit, the row length (and the model) when
    not even a micro-batch of one row fits, else train.batch_size. On CPU the `world_size` processes are taken
    to share this machine's memory. `command`: "pretrain" (rows of data.block_size) or "sft"/"dpo" (rows of
    data.max_length). Returns the estimate."""
    est = estimate_training(cfg, reference=reference, command=command, world_size=world_size, sharded=sharded)
    avail = available_bytes(device)
    per_host = world_size if _kind(device) == "cpu" else 1
    whole = parameter_count(cfg.model) * FP32 * per_host
    if sharded and avail is not None and whole > avail:  # each process builds the whole model, then FSDP2 shards it
        raise UserError(f"{_model_settings(cfg.model)}: {parameter_count(cfg.model):,} parameters; each process "
                        f"builds the whole model before FSDP2 shards it, {human(whole)}, {_where(device, avail)}; "
                        f"choose a smaller model")
    total = sum(est.values()) * per_host
    if avail is None or total <= avail:
        return est
    state = total - est["activations"] * per_host
    where = _where(device, avail)
    if state > avail:
        ref = " and the DPO reference copy" if reference else ""
        raise UserError(f"{_model_settings(cfg.model)}: {parameter_count(cfg.model):,} parameters; their weights, "
                        f"gradients and AdamW state{ref} need {human(state)}, {where}; choose a smaller model")
    tokens, row_key = _tokens_per_row(cfg, command)
    one_row = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=1, grad_accum_steps=1))
    row_bytes = estimate_training(one_row, command=command)["activations"] * per_host
    if state + row_bytes > avail:
        raise UserError(f"{row_key} with {_model_settings(cfg.model)}: one row of {tokens} tokens needs "
                        f"{human(row_bytes)} of activations besides {human(state)} of weights and optimizer state, "
                        f"{where}; lower {row_key.split('=')[0]} or choose a smaller model")
    micro = cfg.train.batch_size // cfg.train.grad_accum_steps
    also = f" besides {human(state)} of weights and optimizer state" if human(state) != "0 B" else ""
    raise UserError(f"train.batch_size={cfg.train.batch_size}: a micro-batch of {micro} rows "
                    f"(train.grad_accum_steps={cfg.train.grad_accum_steps}) x {tokens} tokens ({row_key}) needs "
                    f"{human(est['activations'] * per_host)} of activations{also}, {where}; "
                    f"lower train.batch_size, raise train.grad_accum_steps or lower {row_key.split('=')[0]}")


def check_model(model_cfg: ModelConfig, device, what: str, *, copies: int = 1) -> int:
    """Raise a one-line UserError naming `what` (e.g. the checkpoint's config.json) and the model settings when
    `copies` fp32 copies of the weights (2 while a checkpoint's state dict is read next to the model) exceed
    the memory available on `device`. Returns the bytes estimated."""
    need = parameter_count(model_cfg) * FP32 * copies
    avail = available_bytes(device)
    if avail is not None and need > avail:
        raise UserError(f"{what}: {_model_settings(model_cfg)}: {parameter_count(model_cfg):,} parameters need "
                        f"{human(need)}, {_where(device, avail)}")
    return need


def estimate_generation(model_cfg: ModelConfig, batch_size: int, max_len: int, *, dtype_bytes: int = FP32,
                        prompt_len: int | None = None, kv_cache: bool = True) -> dict[str, int]:
    """Bytes generation adds to a loaded model: the KV cache (layers x 2 x batch x kv_heads x head_dim x max_len
    values of the cache dtype), the next-token logits with their sampling copies (3 x batch x vocab fp32), and
    one layer's prefill activations over the prompt (batch x prompt_len x (hidden + feed-forward width))."""
    m = model_cfg
    kv = m.num_hidden_layers * 2 * batch_size * m.n_kv_heads * m.d_head * max_len * dtype_bytes if kv_cache else 0
    width = m.hidden_size + 3 * max(m.dense_size, m.expert_size)
    return {"kv_cache": kv,
            "logits": 3 * batch_size * m.vocab_size * FP32,
            "prefill": batch_size * (prompt_len or max_len) * width * dtype_bytes}


def check_generation(model_cfg: ModelConfig, batch_size: int, max_len: int, device, *,
                     max_new_tokens: int | None = None, dtype_bytes: int = FP32, prompt_len: int | None = None,
                     kv_cache: bool = True) -> dict[str, int]:
    """Raise a one-line UserError naming the batch size and max_new_tokens when `estimate_generation` exceeds
    the memory available on `device`. Returns the estimate."""
    est = estimate_generation(model_cfg, batch_size, max_len, dtype_bytes=dtype_bytes, prompt_len=prompt_len,
                              kv_cache=kv_cache)
    avail = available_bytes(device)
    total = sum(est.values())
    if avail is not None and total > avail:
        new = f"max_new_tokens={max_new_tokens}" if max_new_tokens is not None else "max_new_tokens"
        raise UserError(f"generating batch size {batch_size} x {max_len} tokens ({new}): the KV cache, logits and "
                        f"prefill need {human(total)}, {_where(device, avail)}; lower the batch size or {new}")
    return est


def _kind(device) -> str:
    return str(getattr(device, "type", device)).split(":")[0]


def _where(device, avail: int) -> str:
    return f"this machine has {human(avail)} available" + ("" if _kind(device) == "cpu" else f" on {device}")
