"""The kernels behind the model's fast paths (src/llama4dpo/kernels): each equals the plain formula it replaces,
values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from llama4dpo.kernels import attention as attention_kernels
from llama4dpo.kernels import experts as expert_kernels
from llama4dpo.model import ExpertMLP


def test_gathered_matmul_equals_per_group_products():
    """The static-shape product compiled CUDA decoding uses where grouped_mm is missing (fp32, pre-Hopper)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 8, 5, generator=g)
    for counts in (torch.tensor([2, 0, 3, 1]), torch.tensor([0, 1, 0, 1])):  # rows >= experts, rows < experts
        x = torch.randn(int(counts.sum()), 8, generator=g)
        want = torch.cat([xe @ w[e] for e, xe in enumerate(x.split(counts.tolist()))])
        torch.testing.assert_close(expert_kernels.gathered_matmul(x, w, counts), want)
    x = torch.randn(6, 8, generator=g)
    compiled = torch.compile(expert_kernels.gathered_matmul, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x, w, torch.tensor([0, 6, 0, 0])), x @ w[1])


def test_rowwise_matmul_equals_per_row_products():
    g = torch.Generator().manual_seed(0)
    w, x, group = torch.randn(4, 8, 5, generator=g), torch.randn(6, 8, generator=g), torch.tensor([2, 0, 2, 3, 3, 3])
    want = torch.stack([x[n] @ w[group[n]] for n in range(len(x))])
    torch.testing.assert_close(expert_kernels.rowwise_matmul(x, w, group), want)
    got = expert_kernels.rowwise_matmul(x.bfloat16(), w.bfloat16(), group)  # fp32 sums, rounded once to bf16
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, (x.bfloat16().float()[:, None] @ w.bfloat16().float()[group])[:, 0].bfloat16())


@pytest.mark.parametrize("rows", [8, 100])
def test_bf16_experts_compile_whole(rows):
    """CPU bf16 experts trace as one graph (fullgraph: a graph break fails): decoding's few rows without autograd
    (per-expert products of data-dependent sizes), and training's many rows with autograd (padded groups)."""
    import torch._dynamo
    experts = ExpertMLP(8, 16, 24).bfloat16()
    experts.init_weights(0.3)
    counts = torch.tensor([rows // 2, 0, 1, 0, rows - rows // 2 - 2, 0, 1, 0])
    x = torch.randn(rows, 16, dtype=torch.bfloat16)
    compiled = torch.compile(experts, fullgraph=True, dynamic=False)

    def close(a, b):  # bf16: the compiled kernels round at other points than eager's ops
        assert (a.float() - b.float()).norm() <= 0.02 * b.float().norm()

    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        if rows < expert_kernels.FEW_ROWS:
            with torch.no_grad():
                close(compiled(x, counts), experts(x, counts))
            return
        x.requires_grad_()
        got, want = compiled(x, counts), experts(x, counts)
    close(got, want)
    g = torch.randn_like(want)
    params = [x, experts.gate_up_proj, experts.down_proj]
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        close(a, b)


def test_padded_expert_groups_equal_unpadded_values_and_grads():
    """CPU bf16 rounds expert groups up to 64 rows; the padding rows must not change any value or gradient."""
    experts = ExpertMLP(5, 16, 24)
    experts.init_weights(0.3)
    counts = torch.tensor([3, 0, 70, 1, 26])
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    params = [x, experts.gate_up_proj, experts.down_proj]
    g = torch.randn(len(x), 16)
    plain = expert_kernels._swiglu(x, counts, experts.gate_up_proj, experts.down_proj)
    padded = expert_kernels._padded(x, counts, experts.gate_up_proj, experts.down_proj)
    torch.testing.assert_close(padded, plain, atol=1e-6, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(padded, params, g), torch.autograd.grad(plain, params, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_kind", ["causal", "bool", "additive"])
def test_bf16_attention_equals_sdpa_values_and_grads(mask_kind):
    """The plain-products attention (CPU bf16, few scores) computes SDPA's function, with GQA and any mask."""
    torch.manual_seed(0)
    B, H, K, S, d = 2, 4, 2, 9, 8
    q = torch.randn(B, H, S, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, K, S, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = None
    if mask_kind != "causal":  # causal, plus a hole per row (a key no query may see, except itself)
        mask = (torch.ones(S, S, dtype=torch.bool).tril() & (torch.arange(S) != 3))[None, None].repeat(B, 1, 1, 1)
        mask[:, :, 3, 3] = True
        if mask_kind == "additive":
            mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -torch.inf)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=0.3, enable_gqa=True)
    got = attention_kernels.small_bf16_attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(got, ref)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)
    low = attention_kernels.small_bf16_attention(*(t.detach().bfloat16() for t in (q, k, v)), mask, 0.3)  # and in bf16, as it runs
    assert low.dtype == torch.bfloat16 and (low.double() - ref).abs().max() < 0.05
