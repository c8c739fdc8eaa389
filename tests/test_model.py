"""Properties of the model's layers: RoPE, causality, KV cache, padding, sparse MoE == dense MoE."""

import pytest
import torch
import torch.nn.functional as F

from llama4dpo import LlamaModel, ModelConfig
from llama4dpo.model import MoE, RMSNorm, RotaryPositionalEmbedding
from llama4dpo.kernels import attention as attention_kernels
from llama4dpo.kernels import experts as expert_kernels

TINY = dict(vocab_size=50, hidden_size=32, intermediate_size=48, intermediate_size_mlp=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, interleave_moe_layer_step=2,
            attention_chunk_size=8, floor_scale=4, attn_scale=0.5)


def tiny(**kw) -> LlamaModel:
    return LlamaModel(ModelConfig(**{**TINY, **kw})).init_weights(seed=0).eval()


def test_rmsnorm_matches_formula():
    x = torch.randn(3, 5, 8)
    norm = RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.arange(1.0, 9.0)
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * torch.arange(1.0, 9.0)
    torch.testing.assert_close(norm(x), expected)
    qk = RMSNorm(8, weight=False)(x)  # weightless qk-norm: L2 norm ~ sqrt(dim)
    torch.testing.assert_close(qk.norm(dim=-1), torch.full((3, 5), 8 ** 0.5), atol=1e-4, rtol=0)


def test_rope_preserves_norm_and_pairs_adjacent_dims():
    rope = RotaryPositionalEmbedding(ModelConfig(**TINY))
    x = torch.randn(2, 6, 3, 8)
    cos, sin = rope(torch.arange(6).expand(2, 6))
    y = rope.rotate(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # Hand-worked: position 1, pair 0 rotates (x0, x1) by angle inv_freq[0] = 1.
    c, s = torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0))
    torch.testing.assert_close(y[0, 1, 0, 0], x[0, 1, 0, 0] * c - x[0, 1, 0, 1] * s)
    torch.testing.assert_close(y[0, 1, 0, 1], x[0, 1, 0, 0] * s + x[0, 1, 0, 1] * c)
    # Relative property: <R(p)q, R(p')k> depends only on p - p'.
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    def dot(p, pk):
        cq, sq = rope(torch.tensor([[p]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return (rope.rotate(q, cq, sq) * rope.rotate(k, ck, sk)).sum()
    torch.testing.assert_close(dot(5, 2), dot(13, 10))


def test_llama3_scaling_changes_only_low_frequencies():
    from llama4dpo.model.rope import rope_frequencies
    base = rope_frequencies(ModelConfig(**TINY))
    scaled = rope_frequencies(ModelConfig(**TINY, rope_type="llama3", rope_factor=8.0,
                                          rope_original_max_position_embeddings=64))
    assert scaled[0] == base[0]                      # shortest wavelength kept
    torch.testing.assert_close(scaled[-1], base[-1] / 8)  # longest divided by the factor


def test_causal_future_tokens_do_not_change_past_logits():
    model = tiny()
    x = torch.randint(0, 50, (1, 24))
    y = x.clone()
    y[0, 15:] = (y[0, 15:] + 1) % 50
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :15], model(y)[:, :15])


def test_chunked_attention_resets_at_chunk_boundary():
    """On a model of only RoPE (chunked) layers, logits at position 8 ignore tokens 0..7 entirely."""
    model = tiny(no_rope_layers=[1, 1, 1, 1])
    x = torch.randint(0, 50, (1, 12))
    y = x.clone()
    y[0, :8] = (y[0, :8] + 7) % 50
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, 8:], b[:, 8:])
    assert not torch.allclose(a[:, :8], b[:, :8])


@pytest.mark.parametrize("kw", [{}, dict(no_rope_layer_interval=2), dict(attention_chunk_size=None),
                                dict(num_experts_per_tok=2, use_qk_norm=False)])
def test_kv_cache_decoding_equals_full_forward(kw):
    """Prefill 5 tokens, then decode one at a time across chunk boundaries (8, 16) and NoPE layers."""
    model = tiny(**kw)
    x = torch.randint(0, 50, (2, 21))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 32)
        steps = [model(x[:, :5], cache=cache)]
        for t in range(5, 21):
            steps.append(model(x[:, t:t + 1], cache=cache))
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5
    assert cache.length == 21


def test_left_padded_batch_equals_each_row_alone():
    model = tiny()
    a, b = torch.randint(4, 50, (1, 13)), torch.randint(4, 50, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :7] = 0
    with torch.no_grad():
        out = model(batch, attention_mask=mask)
        torch.testing.assert_close(out[0], model(a)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1, 7:], model(b)[0], atol=1e-5, rtol=0)
        cache = model.new_cache(2, 20)  # and the same through the cache, decoding one more token
        model(batch, attention_mask=mask, cache=cache)
        nxt = torch.tensor([[5], [6]])
        step = model(nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), cache=cache)
        torch.testing.assert_close(step[1, 0], model(torch.cat([b, nxt[1:]], 1))[0, -1], atol=1e-5, rtol=0)


def dense_moe_reference(moe: MoE, x):
    """transformers' formulation: every expert on every token, input pre-scaled by its (often zero) score."""
    xt = x.reshape(-1, x.shape[-1])
    logits = moe.router(xt)
    top, idx = logits.topk(moe.top_k, -1)
    scores = torch.full_like(logits, float("-inf")).scatter(1, idx, top).sigmoid()  # (T, E)
    out = moe.shared_expert(xt)
    I = moe.experts.down_proj.shape[1]
    for e in range(moe.num_experts):
        h = (xt * scores[:, e:e + 1]) @ moe.experts.gate_up_proj[e]
        out = out + (F.silu(h[:, :I]) * h[:, I:]) @ moe.experts.down_proj[e]
    return out.view_as(x)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("grouped", ["public", "private", None])
def test_sparse_dispatch_equals_dense_moe_values_and_grads(top_k, grouped, monkeypatch):
    """Through F.grouped_mm, through torch._grouped_mm (what older CUDA builds use instead), and through
    per-expert products."""
    op = {"public": getattr(F, "grouped_mm", None), "private": getattr(torch, "_grouped_mm", None)}.get(grouped)
    if grouped and op is None:
        pytest.skip(f"this torch has no {grouped} grouped_mm")
    monkeypatch.setattr(expert_kernels, "_grouped_mm", lambda x, w: op)
    cfg = ModelConfig(**{**TINY, "num_local_experts": 6, "num_experts_per_tok": top_k})
    moe = MoE(cfg)
    moe.init_weights(0.2)
    x = torch.randn(3, 7, 32, requires_grad=True)
    sparse = moe(x)
    g = torch.randn_like(sparse)
    grads_sparse = torch.autograd.grad(sparse, [x, *moe.parameters()], g)
    dense = dense_moe_reference(moe, x)
    grads_dense = torch.autograd.grad(dense, [x, *moe.parameters()], g)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_sparse, grads_dense):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert moe.tokens_per_expert.sum() == 21 * top_k


@pytest.mark.parametrize("top_k", [1, 2])
def test_compiled_cpu_decoding_moe_equals_dense(top_k):
    """Compiled without autograd on CPU, a few token slots (decoding) skip the dispatch: each slot runs through
    its own expert (`kernels.experts.rowwise_matmul`); more slots than ROWWISE_SLOTS take the per-expert products."""
    cfg = ModelConfig(**{**TINY, "num_local_experts": 6, "num_experts_per_tok": top_k})
    moe = MoE(cfg)
    moe.init_weights(0.2)
    compiled = torch.compile(moe, dynamic=False)
    with torch.inference_mode(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        for tokens in (1, 5, expert_kernels.ROWWISE_SLOTS // top_k + 1):
            x = torch.randn(1, tokens, 32)
            got = compiled(x)
            rowwise = tokens * top_k <= expert_kernels.ROWWISE_SLOTS
            assert (moe.tokens_per_expert is None) == rowwise  # (the dispatch counts tokens per expert)
            torch.testing.assert_close(got, dense_moe_reference(moe, x), atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights: the output in autocast's dtype, as eager
            x = torch.randn(1, 3, 32)
            got, want = compiled(x), moe(x)
        assert got.dtype == want.dtype == torch.bfloat16
        assert (got.float() - want.float()).norm() <= 0.02 * want.float().norm()


@pytest.mark.parametrize("tokens", [1, 3, 21])
def test_inference_dispatch_skips_empty_experts_and_equals_dense(tokens):
    """Without autograd on CPU the MoE runs one product per non-empty expert (decoding): a single token
    leaves all but one expert empty, and the result must still equal the dense reference."""
    cfg = ModelConfig(**{**TINY, "num_local_experts": 6, "num_experts_per_tok": 1})
    moe = MoE(cfg)
    moe.init_weights(0.2)
    x = torch.randn(1, tokens, 32)
    with torch.inference_mode():
        out = moe(x)
        if tokens == 1:  # a lone token takes its one expert directly, without dispatch or counts
            assert moe.tokens_per_expert is None
        else:
            assert tokens > 6 or (moe.tokens_per_expert == 0).any()  # 3 tokens, 6 experts: some are empty
        torch.testing.assert_close(out, dense_moe_reference(moe, x), atol=1e-5, rtol=1e-5)
    assert expert_kernels.grouped_matmul(torch.empty(0, 32), moe.experts.down_proj.detach()[:, :32],
                                     torch.zeros(6, dtype=torch.long)).shape == (0, 32)


def test_balance_loss_off_by_default_and_differentiable_when_on():
    model = tiny().train()
    model(torch.randint(0, 50, (2, 10)))
    assert model.aux_loss() is None
    assert {i: sum(c) for i, c in model.expert_load().items()} == {1: 20, 3: 20}
    model = LlamaModel(ModelConfig(**TINY, router_aux_loss_coef=0.01)).init_weights(seed=0).train()
    model(torch.randint(0, 50, (2, 10)))
    aux = model.aux_loss()
    aux.backward()
    assert aux > 0 and model.layers[1].feed_forward.router.weight.grad.abs().sum() > 0


def test_bf16_autocast_runs_and_stays_close():
    model = tiny()
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and gradients flow through the fp32 attention path
        model(x).float().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "proj" in n)


def test_cpu_bf16_attention_paths_agree(monkeypatch):
    """Under CPU bf16 autocast, few scores take the plain products, many take SDPA in fp32: the same logits."""
    model = tiny()
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(x).float()
        monkeypatch.setattr(attention_kernels, "small_bf16_attention", None)  # any call to it would now fail
        monkeypatch.setattr(attention_kernels, "SMALL_SCORES", 0)
        fused = model(x).float()
    assert (plain - fused).abs().max() < 0.05


def test_tied_embeddings_and_padding_row():
    model = LlamaModel(ModelConfig(**TINY, tie_word_embeddings=True, pad_token_id=0)).init_weights(seed=0)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.embed_tokens.weight[0].abs().sum() == 0
