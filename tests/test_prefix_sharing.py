"""Prefix sharing (dpo.share_prompt): one row [prompt | chosen | rejected] per pair computes exactly what the
two rows [prompt | chosen] and [prompt | rejected] compute apart - log-probs, gradients, DPO losses."""

import random

import pytest
import torch

from llama4dpo import Config, LlamaModel, ModelConfig
from llama4dpo.data import collate_preference, collate_preference_shared
from llama4dpo.losses import shared_prompt_logps
from llama4dpo.model.masks import shared_prefix_masks
from llama4dpo.data.batches import ExampleBatches
from llama4dpo.objectives import Preference, pair_logps, precompute_reference_logps, sequence_tokens
from llama4dpo.train.trainer import Trainer

# chunked RoPE layers with a chunk of 4 (rows cross several boundaries), NoPE layers with temperature tuning,
# GQA, MoE and dense layers: every place where positions or the mask matter
TINY = dict(vocab_size=40, hidden_size=32, intermediate_size=48, intermediate_size_mlp=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, interleave_moe_layer_step=2,
            attention_chunk_size=4, floor_scale=2, attn_scale=0.5)


def pairs(n, seed=0, max_prompt=9, max_resp=8):
    rng = random.Random(seed)
    draw = lambda k: [rng.randrange(3, 40) for _ in range(k)]  # noqa: E731
    return [{"prompt_ids": [1] + draw(rng.randrange(0, max_prompt)),
             "chosen_ids": draw(rng.randrange(0, max_resp)) + [2],
             "rejected_ids": draw(rng.randrange(0, max_resp)) + ([2] if i % 3 else [])}  # some truncated, no eos
            for i in range(n)]


def test_collate_worked_example():
    """The example in collate_preference_shared's docstring, plus a second, shorter pair that is padded."""
    ex = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]},
          {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [4, 2]}]
    b = collate_preference_shared(ex, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 6, 7, 2, 8, 9, 2], [1, 2, 4, 2, 0, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 1, 2, 0, 0, 0, 0]]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 2, 2, -1, -1, -1, -1]]
    assert b["attention_mask"].tolist() == [[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]]
    assert b["logit_index"].tolist() == [[2, 3, 2, 5, 6], [0, 0, 2, 0, 0]]
    assert b["targets"].tolist() == [[7, 2, 8, 9, 2], [2, 4, 2, -100, -100]]
    assert b["branch"].tolist() == [[1, 1, 2, 2, 2], [1, 2, 2, 0, 0]]


def test_mask_worked_example():
    """Row [p p c c r]: the rejected token sees the prompt and itself, not the chosen tokens."""
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]])
    pos = torch.tensor([[0, 1, 2, 3, 2, 0]])
    full, chunked = shared_prefix_masks(pos, seg, chunk_size=3)
    assert full[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                         [1, 1, 0, 0, 0, 0],
                                         [1, 1, 1, 0, 0, 0],
                                         [1, 1, 1, 1, 0, 0],
                                         [1, 1, 0, 0, 1, 0],
                                         [1, 1, 0, 0, 0, 1]]  # padding: only itself and the prompt
    # chunks of 3 positions: position 3 starts a new chunk, so chosen token 2 (position 3) sees only itself
    assert chunked[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                            [1, 1, 0, 0, 0, 0],
                                            [1, 1, 1, 0, 0, 0],
                                            [0, 0, 0, 1, 0, 0],
                                            [1, 1, 0, 0, 1, 0],
                                            [1, 1, 0, 0, 0, 1]]


def test_shared_logps_are_each_response_scored_alone():
    """Against a hand-rolled reference: each response scored in its own unpadded row, token by token."""
    model = LlamaModel(ModelConfig(**TINY)).init_weights(seed=0).eval()
    ex = pairs(5, seed=1)
    with torch.no_grad():
        sums, counts = pair_logps(model, collate_preference_shared(ex, pad_id=0))
        for i, e in enumerate(ex):
            for col, resp in ((0, e["chosen_ids"]), (1, e["rejected_ids"])):
                p = e["prompt_ids"]
                logp = model(torch.tensor([p + resp]))[0].log_softmax(-1)
                want = sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(resp))
                assert sums[col * len(ex) + i].item() == pytest.approx(want, abs=1e-5)
                assert counts[col * len(ex) + i].item() == len(resp)


def test_padding_to_a_multiple_changes_shapes_not_logps():
    """data.pad_to_multiple_of: packed rows and their scored positions both rounded up (fewer distinct shapes for
    compiled graphs and CUDA graphs), the log-probs and counts unchanged."""
    model = LlamaModel(ModelConfig(**TINY)).init_weights(seed=0).eval()
    ex = pairs(5, seed=3)
    plain, padded = collate_preference_shared(ex, pad_id=0), collate_preference_shared(ex, pad_id=0,
                                                                                      pad_to_multiple_of=16)
    assert padded["input_ids"].shape[1] % 16 == 0 and padded["targets"].shape[1] % 16 == 0
    assert padded["input_ids"].shape[1] > plain["input_ids"].shape[1]  # (so the test pads something)
    with torch.no_grad():
        (s0, c0), (s1, c1) = pair_logps(model, plain), pair_logps(model, padded)
    torch.testing.assert_close(s1, s0, atol=1e-5, rtol=0)
    assert torch.equal(c0, c1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_and_separate_rows_give_the_same_logps_and_gradients(seed):
    model = LlamaModel(ModelConfig(**TINY)).init_weights(seed=seed)
    ex = pairs(6, seed=seed, max_prompt=12, max_resp=10)
    grads, logps = [], []
    for collate in (collate_preference, collate_preference_shared):
        model.zero_grad()
        s, c = pair_logps(model, collate(ex, pad_id=0))
        (s * torch.linspace(0.5, 1.5, len(s))).sum().backward()  # a weighted sum: rows must not be mixed up
        logps.append((s.detach(), c))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(logps[0][0], logps[1][0], atol=1e-5, rtol=0)
    assert torch.equal(logps[0][1], logps[1][1])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_shared_prompt_logps_hand_worked():
    """Two pairs, vocabulary of 2, logits chosen so log-softmax is easy: [0, 0] -> ln 1/2 each."""
    logits = torch.zeros(2, 3, 2)
    logits[1, 0] = torch.tensor([0.0, torch.log(torch.tensor(3.0))])  # p = [1/4, 3/4]
    targets = torch.tensor([[0, 1, 1], [1, 0, -100]])
    branch = torch.tensor([[1, 2, 2], [1, 2, 0]])
    sums, counts = shared_prompt_logps(logits, targets, branch)
    half, q = torch.log(torch.tensor(0.5)).item(), torch.log(torch.tensor(0.75)).item()
    assert sums.tolist() == pytest.approx([half, q, 2 * half, half])
    assert counts.tolist() == [1, 1, 2, 1]


def _dpo_losses(tmp_path, share, precompute, steps=4):
    cfg = Config.load("configs/tiny.toml", ["model.vocab_size=40", "train.lr=1e-2", "train.warmup_steps=0",
                                            "train.batch_size=4", "train.grad_accum_steps=2",
                                            f"dpo.share_prompt={str(share).lower()}",
                                            f"dpo.precompute_ref={str(precompute).lower()}"])
    model = LlamaModel(cfg.model).init_weights(seed=0)
    reference = LlamaModel(cfg.model).init_weights(seed=1).requires_grad_(False)
    ex = pairs(16, seed=3)
    collate = collate_preference_shared if share else collate_preference
    batches = ExampleBatches(ex, lambda e: collate(e, 0), 2, 2, seed=0)
    if precompute:
        objective = Preference(cfg.dpo, reference_logps=precompute_reference_logps(
            reference, ExampleBatches(ex, lambda e: collate(e, 0), 3, 1, seed=0).fixed(), len(ex), "cpu"))
    else:
        objective = Preference(cfg.dpo, reference=reference)
    trainer = Trainer(cfg, model, objective, batches, None, tmp_path, device=torch.device("cpu"), show_progress=False)
    return [trainer.train_step() for _ in range(steps)]


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_training_is_the_same_with_and_without_sharing(tmp_path, precompute):
    shared = _dpo_losses(tmp_path / "a", True, precompute)
    separate = _dpo_losses(tmp_path / "b", False, precompute)
    for a, b in zip(shared, separate):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected", "length/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), key
    # tokens_per_s counts the prompt once per response in both layouts (the shared row runs it once)
    assert [a["tokens"] for a in shared] == [b["tokens"] for b in separate]
    ex = pairs(3)
    want = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in ex)
    assert sequence_tokens(collate_preference_shared(ex, 0)) == sequence_tokens(collate_preference(ex, 0)) == want


def test_segment_ids_refuse_what_they_would_silently_ignore():
    model = LlamaModel(ModelConfig(**TINY)).init_weights(seed=0).eval()
    b = collate_preference_shared(pairs(2), pad_id=0)
    ids, pos, seg = b["input_ids"], b["position_ids"], b["segment_ids"]
    for kwargs in ({}, {"position_ids": pos, "attention_mask": b["attention_mask"]},
                   {"position_ids": pos, "cache": model.new_cache(2, ids.shape[1])}):
        with pytest.raises(ValueError, match="segment_ids"):
            model(ids, segment_ids=seg, **kwargs)


def test_additive_mask_in_another_dtype_than_the_query():
    """FSDP2's bf16 policy casts a block's float inputs, the additive mask too; CPU attention runs in fp32."""
    model = LlamaModel(ModelConfig(**TINY)).init_weights(seed=0).eval()
    b = collate_preference_shared(pairs(3), pad_id=0)
    pos, seg = b["position_ids"], b["segment_ids"]
    attn, x = model.layers[0].self_attn.bfloat16(), torch.randn(3, pos.shape[1], 32)
    rope = model.rotary_emb(pos)
    bool_mask = shared_prefix_masks(pos, seg, TINY["attention_chunk_size"])[1]
    additive = torch.zeros(bool_mask.shape).masked_fill_(~bool_mask, -torch.inf)
    with torch.no_grad():
        want = attn(x.bfloat16(), rope, pos, bool_mask).float()
        got = attn(x.bfloat16(), rope, pos, additive.bfloat16()).float()
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("layers", [4, 3])  # the last layer MoE, or dense
def test_logit_index_scores_only_its_positions(layers):
    """logit_index (B, M) gives the full forward's outputs at those positions, while the last layer's
    feed-forward runs on those M positions alone (its expert load counts them) - unless that layer's balance
    loss is on, which is a mean over every position."""
    torch.manual_seed(0)
    b = collate_preference_shared(pairs(3, seed=1), pad_id=0)
    kw = dict(position_ids=b["position_ids"], segment_ids=b["segment_ids"])
    index = b["logit_index"]
    for coef in (0.0, 0.01):
        model = LlamaModel(ModelConfig(**{**TINY, "num_hidden_layers": layers, "router_aux_loss_coef": coef}))
        model.init_weights(seed=0).train()
        full = model(b["input_ids"], **kw)
        full_aux, full_load = model.aux_loss(), model.expert_load()
        scored = model(b["input_ids"], logit_index=index, **kw)
        expected = full.gather(1, index[:, :, None].expand(-1, -1, full.shape[-1]))
        torch.testing.assert_close(scored, expected, rtol=1e-5, atol=1e-5)
        load = model.expert_load()
        assert load[1] == full_load[1]  # an earlier layer: every position
        if layers == 4 and coef == 0:
            assert sum(load[3]) == index.numel() < sum(full_load[3])
        elif layers == 4:
            assert load[3] == full_load[3] and torch.equal(model.aux_loss(), full_aux)


def test_logit_index_on_plain_causal_rows():
    """Without segment_ids (causal attention, chunked layers' masks built, full layers' left to SDPA) and with
    a cache (a prefill): the outputs at logit_index are the full forward's there."""
    torch.manual_seed(0)
    model = LlamaModel(ModelConfig(**TINY)).init_weights(seed=0).eval()
    ids = torch.randint(3, 40, (2, 11))
    index = torch.tensor([[10, 3, 7], [0, 10, 10]])
    full = model(ids)
    expected = full.gather(1, index[:, :, None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(model(ids, logit_index=index), expected, rtol=1e-5, atol=1e-5)
    cache = model.new_cache(2, 16)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        prefill = model(ids, attention_mask=mask, cache=cache, logit_index=index)
    torch.testing.assert_close(prefill, expected, rtol=1e-5, atol=1e-5)
