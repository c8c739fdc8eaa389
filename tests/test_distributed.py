"""torchrun on CPU (gloo), 2 processes, through the real CLI: per-step losses equal a 1-process run with the
same global batch, for DDP and FSDP2, for pretraining, DPO and LoRA DPO; checkpoints move between 1 and 2 processes."""

import gc
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from llama4dpo.metrics import read_metrics

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TINY = str(Path(__file__).parent.parent / "configs" / "tiny.toml")
COMMON = ["--config", TINY, "--data", "builtin:assistant", "--quiet", "data.builtin_size=120", "train.log_every=1",
          "train.eval_every=3", "train.save_every=3", "train.keep_last=5", "train.batch_size=4",
          "train.grad_accum_steps=2", "train.device=cpu"]
PRETRAIN = ["pretrain", *COMMON, "train.max_steps=6"]
KEYS = ("loss", "grad_norm", "eval_loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "eval_rewards/margins")


def launch(args, nproc: int = 1, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    env.pop("LLAMA4DPO_FAULT", None)
    if fault:
        env["LLAMA4DPO_FAULT"] = fault
    if nproc == 1:
        cmd = [sys.executable, "-m", "llama4dpo", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "llama4dpo", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if nproc > 1 and not fault and result.returncode != 0 and TEARDOWN_ABORT in result.stderr:
        # Seen once in this project's test runs: a process aborts in gloo's teardown after the run has
        # written everything (final/ and metrics complete). The same command resumes the finished run: once more.
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return result


TEARDOWN_ABORT = "terminate called without an active exception"


def ok(result):
    assert result.returncode == 0, "\n".join(l for l in result.stderr.splitlines() if l.strip())[-6000:]
    return result


def assert_same_losses(a: Path, b: Path, tol: float = 1e-5):
    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    compared = 0
    for x, y in zip(ra, rb):
        for k in KEYS:
            if k in x:
                assert y[k] == pytest.approx(x[k], abs=tol), (x["step"], k, x[k], y[k])
                compared += 1
    assert compared >= 10


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The 1-process references: pretraining, and DPO from its result."""
    root = tmp_path_factory.mktemp("single")
    ok(launch([*PRETRAIN, "--out", str(root / "pre")]))
    ok(launch([*dpo_args(root), "--out", str(root / "dpo")]))
    ok(launch([*dpo_args(root), "--out", str(root / "lora"), *LORA]))
    return root


LORA = ["lora.rank=4", "lora.train_router=true"]  # adapters on every layer kind, and the routers in full


def dpo_args(root: Path, steps: int = 6) -> list[str]:
    return ["dpo", *COMMON, "--init", str(root / "pre"), f"train.max_steps={steps}", "train.lr=3e-3"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_give_the_losses_of_one(single, tmp_path, strategy):
    ok(launch([*PRETRAIN, "--out", str(tmp_path / "pre"), f"distributed.strategy={strategy}"], nproc=2))
    assert_same_losses(single / "pre", tmp_path / "pre")
    ok(launch([*dpo_args(single), "--out", str(tmp_path / "dpo"), f"distributed.strategy={strategy}"], nproc=2))
    assert_same_losses(single / "dpo", tmp_path / "dpo")
    # the written files are a plain checkpoint: the same weights as the 1-process run's, to float tolerance
    from safetensors.torch import load_file
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (single / "dpo", tmp_path / "dpo"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # LoRA DPO (reference = adapters off): adapters replicated under DDP, sharded with their blocks under FSDP2
    ok(launch([*dpo_args(single), "--out", str(tmp_path / "lora"), f"distributed.strategy={strategy}", *LORA], nproc=2))
    assert_same_losses(single / "lora", tmp_path / "lora")
    a, b = (load_file(str(d / "final" / "adapters.safetensors")) for d in (single / "lora", tmp_path / "lora"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(".router." in k for k in a) and any("experts.adapters" in k for k in a)


def test_checkpoints_move_between_two_processes_and_one(single, tmp_path):
    # pretraining: 2 processes (ddp) killed after step 4 (checkpoint at 3), resumed by 1 process
    killed = launch([*PRETRAIN, "--out", str(tmp_path / "pre")], nproc=2, fault="step:4")
    assert killed.returncode != 0
    resumed = ok(launch([*PRETRAIN, "--out", str(tmp_path / "pre")]))
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_same_losses(single / "pre", tmp_path / "pre")
    # DPO: 1 process killed after step 4, resumed by 2 processes with FSDP2 and precomputed reference log-probs.
    # The uninterrupted run precomputes too: at step 1 the policy IS the reference, every reward is 0 up to
    # rounding, and rewards/accuracies (a strict >) would count the rounding of two ways of computing it.
    ok(launch([*dpo_args(single), "--out", str(tmp_path / "straight"), "dpo.precompute_ref=true"]))
    args = [*dpo_args(single), "--out", str(tmp_path / "dpo")]
    assert launch(args + ["dpo.precompute_ref=true"], fault="step:4").returncode == -9
    resumed = ok(launch(args + ["dpo.precompute_ref=true", "distributed.strategy=fsdp"], nproc=2))
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_same_losses(tmp_path / "straight", tmp_path / "dpo")


def test_two_torchrun_agents_meet_like_two_nodes(single, tmp_path):
    """The multi-node command of README (c10d rendezvous, one agent per node), with both "nodes" on this host."""
    import socket
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    env.pop("LLAMA4DPO_FAULT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "nodes",
           "-m", "llama4dpo", *PRETRAIN, "--out", str(tmp_path / "pre")]
    agents = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    for agent in agents:
        _, err = agent.communicate(timeout=300)
        assert agent.returncode == 0, err[-3000:]
    assert_same_losses(single / "pre", tmp_path / "pre")


def test_batch_that_does_not_split_across_processes_is_one_line_error(single, tmp_path):
    r = launch([*PRETRAIN, "--out", str(tmp_path / "x"), "train.batch_size=6", "train.grad_accum_steps=2"], nproc=2)
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert lines and "divisible by grad_accum_steps x processes" in lines[0]  # (torchrun adds its own report)


# ---- in-process checks of the pieces ---------------------------------------------------------------------
def test_rank_slices_of_a_step_are_the_one_process_batch():
    from llama4dpo.data.lm import TokenStream
    from llama4dpo.data.batches import ExampleBatches, StreamBatches
    from llama4dpo.train.distributed import Dist

    examples = [{"i": i} for i in range(11)]
    collate = lambda ex: {"ids": torch.tensor([e["i"] for e in ex])}  # noqa: E731
    whole = ExampleBatches(examples, collate, 4, 2, seed=3)
    stream = TokenStream(torch.arange(500), block_size=8)
    for world in (2, 4):
        ranks = [Dist(rank=r, world=world) for r in range(world)]
        shards = [ExampleBatches(examples, collate, 4, 2, seed=3, rows=d.rows(4)) for d in ranks]
        sshards = [StreamBatches(stream, 4, seed=5, rows=d.rows(4)) for d in ranks]
        for step in range(4):
            for micro in range(2):
                got = torch.cat([s(step, micro)["ids"] for s in shards])
                assert got.tolist() == whole(step, micro)["ids"].tolist()
                rows = torch.cat([s(step, micro)["input_ids"] for s in sshards])
                assert torch.equal(rows, StreamBatches(stream, 4, seed=5)(step, micro)["input_ids"])


def test_ddp_all_reduces_once_per_step_whatever_the_accumulation(tmp_path, monkeypatch):
    """Micro-batches before the last skip DDP's gradient all-reduce (no_sync): the number of all-reduced
    buckets per optimizer step is the same with 4 micro-batches as with 1."""
    from llama4dpo import Config, LlamaModel
    from llama4dpo.data import collate_sft
    from llama4dpo.data.batches import ExampleBatches
    from llama4dpo.train.distributed import Dist
    from llama4dpo.objectives import LanguageModeling
    from llama4dpo.train.trainer import Trainer

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    trainer = None
    try:
        monkeypatch.setattr(Dist, "enabled", property(lambda self: True))  # a real DDP over a 1-rank group
        examples = [{"prompt_ids": [1, 5 + i % 7], "response_ids": [6, 7 + i % 5, 2]} for i in range(16)]
        calls = {}
        for accum in (1, 4):
            cfg = Config.load(TINY, ["model.vocab_size=20", f"train.grad_accum_steps={accum}", "train.batch_size=8"])
            model = LlamaModel(cfg.model).init_weights(seed=0)
            batches = ExampleBatches(examples, lambda ex: collate_sft(ex, 0), 8 // accum, accum, seed=0)
            trainer = Trainer(cfg, model, LanguageModeling(), batches, None, tmp_path / str(accum),
                              device=torch.device("cpu"), show_progress=False, dist=Dist(strategy="ddp"))
            count = [0]

            def hook(state, bucket):
                count[0] += 1
                fut = torch.futures.Future()
                fut.set_result(bucket.buffer())
                return fut
            trainer.engine.register_comm_hook(None, hook)
            trainer.train_step()
            calls[accum] = count[0]
        assert calls[1] >= 1 and calls[4] == calls[1]
    finally:
        # DDP's reducer holds the process group: freed after destroy_process_group, gloo's destructor can hang
        # joining its threads (seen once in a clean-clone CI run)
        del trainer
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.parametrize("tied", [False, True])
def test_one_process_checkpoint_state_is_what_torch_distributed_checkpoint_gives(tied):
    """One process writes and reads plain state dicts keyed by parameter name; the reference is
    torch.distributed.checkpoint's full state dicts, which several processes write."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from llama4dpo import Config, LlamaModel
    from llama4dpo.config import TrainConfig
    from llama4dpo.train.distributed import Dist
    from llama4dpo.train.trainer import make_optimizer

    cfg = Config.load(TINY)
    cfg.model.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = LlamaModel(cfg.model).init_weights(seed=0)
    opt = make_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1), torch.device("cpu"))
    ids = torch.randint(0, cfg.model.vocab_size, (2, 12))

    def loss(m):
        return torch.nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten())
    for _ in range(2):
        loss(model).backward()
        opt.step()
        opt.zero_grad()
    one = Dist()
    ours = one.optimizer_state(model, opt)
    ref = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    assert ours["param_groups"] == ref["param_groups"]
    assert list(ours["state"]) == list(ref["state"]) and len(ours["state"]) > 10
    for name, s in ref["state"].items():
        for k, v in s.items():
            assert torch.equal(ours["state"][name][k], v), (name, k)
    assert set(one.model_state(model)) == set(model.state_dict())

    # through a file, as checkpoints go, into a fresh model and optimizer: the next step is the same
    buf = io.BytesIO()
    torch.save(ours, buf)
    ours = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    torch.manual_seed(1)
    other = LlamaModel(cfg.model).init_weights(seed=1)
    other_opt = make_optimizer(other, TrainConfig(lr=1e-3, weight_decay=0.1), torch.device("cpu"))
    one.load_model_state(other, {k: v.clone() for k, v in one.model_state(model).items()})
    one.load_optimizer_state(other, other_opt, ours)
    for m, o in ((model, opt), (other, other_opt)):
        loss(m).backward()
        o.step()
    for (n, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        assert not a.isnan().any() and torch.equal(a, b), n

    ours["state"]["not.a.parameter"] = ours["state"].popitem()[1]
    with pytest.raises(KeyError):
        one.load_optimizer_state(other, other_opt, ours)


def test_importing_the_trainer_leaves_torch_distributed_checkpoint_unloaded():
    """Its import costs ~47 MiB of resident memory and ~0.9 s; only several processes need it."""
    code = "import sys, llama4dpo.train.trainer, llama4dpo.cli; print('torch.distributed.checkpoint' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
