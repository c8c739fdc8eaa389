"""Generation: cache == no cache, batched == one by one, seeded sampling, top-k and top-p filters."""

import math

import pytest
import torch

from llama4dpo import LlamaModel, ModelConfig
from llama4dpo.errors import UserError
from llama4dpo.generate import Sampling, filter_top_k, filter_top_p, generate_ids
from llama4dpo.runtime import Decoder

CFG = dict(vocab_size=40, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
           num_local_experts=4, interleave_moe_layer_step=2, attention_chunk_size=8, floor_scale=4,
           attn_scale=0.5, max_position_embeddings=64)
PROMPTS = [[1, 5, 9, 12, 7, 30, 22], [1, 17], [1, 3, 3, 8, 20, 21, 22, 23, 24, 25, 11]]


@pytest.fixture(scope="module")
def model():
    # A larger init scale makes the distribution peaked enough that argmax is never a near-tie.
    return LlamaModel(ModelConfig(**CFG, initializer_range=0.2)).init_weights(seed=0).eval()


def gen(model, prompts, s, **kw):
    return generate_ids(model, prompts, s, eos_id=2, pad_id=0, **kw)


def test_greedy_with_cache_equals_without(model):
    s = Sampling(max_new_tokens=20)  # crosses the chunk boundaries at 8 and 16 and runs NoPE layer 3
    assert gen(model, PROMPTS, s, use_cache=True) == gen(model, PROMPTS, s, use_cache=False)


def test_batched_left_padding_equals_one_by_one(model):
    s = Sampling(max_new_tokens=15)
    batched = gen(model, PROMPTS, s)
    alone = [gen(model, [p], s)[0] for p in PROMPTS]
    assert batched == alone


def test_seeded_sampling_is_reproducible(model):
    s = Sampling(max_new_tokens=12, temperature=1.0, seed=7)
    a, b = gen(model, PROMPTS, s), gen(model, PROMPTS, s)
    assert a == b
    assert gen(model, PROMPTS, Sampling(max_new_tokens=12, temperature=1.0, seed=8)) != a


def test_top_k_1_equals_greedy(model):
    greedy = gen(model, PROMPTS, Sampling(max_new_tokens=10))
    assert gen(model, PROMPTS, Sampling(max_new_tokens=10, temperature=1.3, top_k=1, seed=3)) == greedy


def test_top_p_on_a_hand_made_distribution():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    keep = lambda p: torch.isfinite(filter_top_p(logits, p))[0].tolist()  # noqa: E731
    assert keep(0.5) == [True, False, False, False, False]   # 0.5 alone reaches 0.5
    assert keep(0.6) == [True, True, False, False, False]    # 0.5 + 0.2 = 0.7 >= 0.6
    assert keep(0.85) == [True, True, True, False, False]    # 0.85 reached exactly by three
    assert keep(0.9) == [True, True, True, True, False]
    assert keep(1.0) == [True] * 5
    shuffled = logits[:, [3, 0, 4, 2, 1]]                      # order does not matter
    assert torch.isfinite(filter_top_p(shuffled, 0.6))[0].tolist() == [False, True, False, False, True]
    # sampling only ever returns kept tokens, with renormalised probabilities
    filtered = filter_top_p(logits, 0.6).softmax(-1)[0]
    assert filtered[0].item() == pytest.approx(0.5 / 0.7) and filtered[2:].sum() == 0


def test_top_k_filter():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    assert torch.isfinite(filter_top_k(logits, 2))[0].tolist() == [False, True, True, False]


def test_stops_at_eos(model):
    out = gen(model, PROMPTS, Sampling(max_new_tokens=30, temperature=1.0, seed=0))
    for ids in out:
        assert 2 not in ids[:-1]  # nothing after an eos


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_row_that_stops_leaves_the_others_unchanged(model, use_cache):
    """eos mid-batch: each row is its run without an eos, cut after its first eos; rows still going are unaffected
    by the finished one (fed pad from then on)."""
    s = Sampling(max_new_tokens=12)
    free = generate_ids(model, PROMPTS, s, eos_id=-1, pad_id=0, use_cache=use_cache)  # -1: never produced
    # eos: a token some row produces midway and another row never does (so one stops, one goes on to the end)
    eos = next(t for ids in free for t in ids[1:-1] if any(t not in other for other in free))
    want = [ids[:ids.index(eos) + 1] if eos in ids else ids for ids in free]
    assert 1 < min(len(w) for w in want) and max(len(w) for w in want) == 12
    assert generate_ids(model, PROMPTS, s, eos_id=eos, pad_id=0, use_cache=use_cache) == want


def test_prompt_longer_than_context_is_a_clear_error(model):
    with pytest.raises(UserError, match="exceeds the model's context of 64 tokens"):
        gen(model, [[1] * 60], Sampling(max_new_tokens=10))


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2)])
def test_bad_sampling_settings(model, bad):
    with pytest.raises(UserError):
        gen(model, PROMPTS, Sampling(**bad))


@pytest.mark.parametrize("top_k", [1, 2])
def test_decode_step_equals_forward_with_cache(top_k):
    """model.decode (static shapes: the whole cache under a mask of filled slots, a lone token's expert taken
    directly) gives the logits of forward(token, cache=...) step by step: left padding, chunk boundaries
    (chunk 8), the NoPE layer's temperature tuning, GQA, top-1 and top-2 routing."""
    model = LlamaModel(ModelConfig(**{**CFG, "num_experts_per_tok": top_k}, initializer_range=0.2))
    model.init_weights(seed=1).eval()
    for prompts in (PROMPTS, PROMPTS[1:2]):  # batch 3 with left padding, and a lone row (one token per step)
        B, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(B, L, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
        with torch.inference_mode():
            a, b = model.new_cache(B, L + 12), model.new_cache(B, L + 12)
            model(ids, attention_mask=mask, cache=a), model(ids, attention_mask=mask, cache=b)
            tok = torch.tensor([[4]] * B)
            for step in range(12):
                mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
                want = model(tok, attention_mask=mask, cache=a)[:, -1]
                got = model.decode(tok, b)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
                assert b.length == a.length == L + step + 1
                tok = want.argmax(-1, keepdim=True)
            torch.testing.assert_close(b.positions, a.positions, atol=0, rtol=0)


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_tokens(model):
    s = Sampling(max_new_tokens=12)
    # the third batch reuses the first one's cache (same batch size and cache length), now with other prompts
    decoder = Decoder(model)
    for prompts in (PROMPTS, PROMPTS[:1], [PROMPTS[1], PROMPTS[0], PROMPTS[1]]):
        assert gen(model, prompts, s, compile=True, decoder=decoder) == gen(model, prompts, s)
    assert len(decoder._caches) == 2
    # a generation started from inside another one's token callback (same shape) leaves the outer one intact
    want = gen(model, PROMPTS[:1], s, compile=True, decoder=decoder)
    nested = lambda i, t: gen(model, [PROMPTS[2]], s, compile=True, decoder=decoder)  # noqa: E731
    got = gen(model, PROMPTS[:1], s, compile=True, decoder=decoder, on_token=nested)
    assert got == want
    # on CPU the weights are compiled in as constants: weights changed in place are seen (the step compiles again)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    assert gen(model, PROMPTS, s, compile=True, decoder=decoder) == gen(model, PROMPTS, s) != want
    # ... which drops every model's compiled code: a second model's step, which skips guard evaluation for
    # shapes it has run, compiles again
    other = LlamaModel(ModelConfig(**CFG, initializer_range=0.2)).init_weights(seed=5).eval()
    other_decoder = Decoder(other)
    assert gen(other, PROMPTS[:1], s, compile=True, decoder=other_decoder) == gen(other, PROMPTS[:1], s)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    assert gen(model, PROMPTS, s, compile=True, decoder=decoder) == gen(model, PROMPTS, s)
    assert gen(other, PROMPTS[:1], s, compile=True, decoder=other_decoder) == gen(other, PROMPTS[:1], s)


def test_a_reused_static_cache_decodes_as_a_fresh_one():
    """Decoder.cache hands out the same tensors for the same shape, emptied: what the last generation left in
    them (here even NaN values) must not reach the next one; a nested use of the same shape gets its own."""
    model = LlamaModel(ModelConfig(**CFG, initializer_range=0.2)).init_weights(seed=3).eval()
    static_cache = Decoder(model).cache
    long_ids, short_ids = torch.tensor([PROMPTS[2]]), torch.tensor([PROMPTS[1]])
    with torch.inference_mode():
        with static_cache(1, 32) as first:
            model(long_ids, cache=first)
            for t in range(8):
                model.decode(torch.tensor([[t + 3]]), first)
            with static_cache(1, 32) as nested:
                assert nested is not first
            for v in first.v:
                v.fill_(float("nan"))
        with static_cache(1, 32) as again:
            assert again is first and again.length == 0
            fresh = model.new_cache(1, 32)
            model(short_ids, cache=again), model(short_ids, cache=fresh)
            for t in range(4):
                torch.testing.assert_close(model.decode(torch.tensor([[t + 5]]), again),
                                           model.decode(torch.tensor([[t + 5]]), fresh), atol=0, rtol=0)
        with static_cache(2, 32) as other:
            assert other is not first

def test_decode_on_a_rewound_cache_sees_no_stale_slots_and_a_full_cache_is_an_error():
    model = LlamaModel(ModelConfig(**CFG, initializer_range=0.2)).init_weights(seed=2).eval()
    ids = torch.tensor([PROMPTS[0]])
    L = ids.shape[1]
    with torch.inference_mode():
        fresh = model.new_cache(1, L + 4)
        model(ids, cache=fresh)
        want = model.decode(torch.tensor([[9]]), fresh)
        used = model.new_cache(1, L + 4)
        model(ids, cache=used)
        for t in (3, 4, 5):  # fill three slots, then go back to the prompt's end
            model.decode(torch.tensor([[t]]), used)
        used.slot.fill_(L)
        torch.testing.assert_close(model.decode(torch.tensor([[9]]), used), want, atol=1e-6, rtol=1e-6)
        with pytest.raises(ValueError, match="KV cache full"):
            model(torch.tensor([[1, 2, 3, 4]]), cache=used)


def test_decode_under_autocast_into_an_fp32_cache():
    """A cache made outside autocast (fp32) takes bf16 keys/values, as forward's slice assignment does."""
    model = LlamaModel(ModelConfig(**CFG, initializer_range=0.2)).init_weights(seed=2).eval()
    ids = torch.tensor([PROMPTS[2]])
    with torch.inference_mode():
        a, b = model.new_cache(1, 20), model.new_cache(1, 20)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, cache=a), model(ids, cache=b)
            got = model.decode(torch.tensor([[7]]), b)
            want = model(torch.tensor([[7]]), cache=a)[:, -1]
    assert a.k[0].dtype == torch.float32
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


def test_rope_frequencies_stay_fp32_when_the_model_is_cast_to_bf16():
    from llama4dpo.model.rope import rope_frequencies
    cfg = ModelConfig(**CFG)
    model = LlamaModel(cfg).init_weights(seed=0).to(torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.rotary_emb.inv_freq, rope_frequencies(cfg), atol=0, rtol=0)


def test_a_failing_compile_is_a_one_line_error(model, monkeypatch):
    import torch._dynamo

    def broken(fn, **kw):
        def run(*a, **k):
            raise torch._dynamo.exc.Unsupported("data-dependent shape\nmore detail")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    fresh = LlamaModel(ModelConfig(**CFG)).init_weights(seed=0).eval()  # no compiled step cached yet
    with pytest.raises(UserError, match=r"^torch.compile failed \(data-dependent shape\); generate without --compile$"):
        gen(fresh, PROMPTS[:1], Sampling(max_new_tokens=3), compile=True)
