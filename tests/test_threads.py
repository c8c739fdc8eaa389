"""train.threads: a fixed count, or "auto" - the cores other processes leave free, followed as training runs."""

import subprocess
import sys
import time

import pytest
import torch

from llama4dpo.errors import ConfigError
from llama4dpo.metrics import read_metrics
from llama4dpo.runtime import threads as th
from llama4dpo.runtime.threads import Reading, ThreadChooser


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def reading(others: float, rate: float, wall: float = 1.0) -> Reading:
    r = Reading()
    r.wall, r.others, r.tokens = wall, others * wall, rate * wall
    return r


def auto_chooser(monkeypatch, cores: int) -> ThreadChooser:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    c = ThreadChooser("auto", "cpu", cores=cores)
    assert c.auto
    return c


def test_the_count_is_the_cores_others_leave(monkeypatch):
    c = auto_chooser(monkeypatch, cores=2)
    assert [c.want(x) for x in (0.0, 0.4, 0.7, 1.0, 1.9, 5.0)] == [2, 2, 1, 1, 1, 1]
    c = auto_chooser(monkeypatch, cores=16)
    assert [c.want(x) for x in (0.0, 1.0, 3.4, 15.2)] == [16, 15, 13, 1]


def test_auto_follows_load_after_two_agreeing_readings_and_takes_a_slower_change_back(monkeypatch, restore_threads):
    c = auto_chooser(monkeypatch, cores=2)
    torch.set_num_threads(2)
    c._decide(reading(others=1.0, rate=100))  # one reading of load: not yet
    assert c.threads == 2 and c.take_note() is None
    c._decide(reading(others=1.0, rate=100))  # two: the neighbour is real
    assert c.threads == 1 and "2 -> 1" in c.take_note()
    c._decide(reading(others=1.0, rate=300))  # the probe: 1 thread is faster, kept
    assert c.threads == 1 and c.take_note() is None
    c._decide(reading(others=0.0, rate=300))
    c._decide(reading(others=0.0, rate=300))  # the neighbour left: back to 2
    assert c.threads == 2 and "1 -> 2" in c.take_note()
    c._decide(reading(others=0.0, rate=200))  # ...but 2 runs slower than 1 did: taken back, and held
    assert c.threads == 1 and "2 -> 1" in c.take_note()
    for _ in range(th.HOLD_READINGS - 1):
        c._decide(reading(others=0.0, rate=300))
        assert c.threads == 1
    c._decide(reading(others=0.0, rate=300))
    c._decide(reading(others=0.0, rate=300))  # the hold is over: tried again
    assert c.threads == 2


def test_readings_gather_half_a_second_of_steps(monkeypatch, restore_threads):
    c = auto_chooser(monkeypatch, cores=2)
    seen = []
    monkeypatch.setattr(c, "_decide", seen.append)
    for _ in range(3):
        c.begin()
        time.sleep(th.WINDOW_S / 4)
        c.end(10)
    assert not seen  # 3/4 of a window
    c.begin()
    time.sleep(th.WINDOW_S / 4)
    c.end(10)
    assert len(seen) == 1 and seen[0].tokens == 40 and seen[0].wall >= th.WINDOW_S


@pytest.mark.skipif(th.busy_seconds() is None, reason="no /proc/stat")
def test_a_busy_neighbour_is_seen_and_leaves_one_core_fewer(monkeypatch, restore_threads):
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        r = Reading()
        r.begin()
        time.sleep(1.0)
        r.end(0)
        assert r.cores_used >= 0.8  # (the spinning process's one core; others may add to it)
        c = auto_chooser(monkeypatch, cores=th.usable_cores())
        said = c.start()
        assert c.threads <= max(1, c.cores - 1) and "train.threads=auto" in said
    finally:
        busy.kill()
        busy.wait()


def test_where_the_environment_or_the_config_says_so_the_count_is_fixed(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    c = ThreadChooser("auto", "cpu")
    assert not c.auto and "OMP_NUM_THREADS" in c.start()
    monkeypatch.delenv("OMP_NUM_THREADS")
    c = ThreadChooser(1, "cpu")
    assert not c.auto and c.start() == "threads: 1 (train.threads)" and torch.get_num_threads() == 1
    c.begin()
    c.end(5)  # nothing read, nothing changed
    assert c.threads == 1 and c.take_note() is None


def test_config_takes_auto_or_a_count(tiny_config):
    assert tiny_config().train.threads == "auto"
    assert tiny_config(["train.threads=3"]).train.threads == 3
    for bad in ("0", "-1", "+-3", "many"):
        with pytest.raises(ConfigError, match="train.threads"):
            tiny_config([f"train.threads={bad}"])


def test_a_run_says_its_count_and_logs_it(tmp_path, monkeypatch, restore_threads, capsys, tiny_config):
    from llama4dpo.train.recipes import run
    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    monkeypatch.delenv("OMP_NUM_THREADS")
    cfg = tiny_config(["train.max_steps=3", "train.log_every=1", "train.eval_every=3", "train.save_every=3",
                       "train.device=cpu"])
    run("pretrain", cfg, str(data), tmp_path / "run", show=True)
    said = capsys.readouterr().out
    assert "train.threads=auto; other processes use" in said
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(1 <= r["threads"] <= th.usable_cores() for r in rows)
    cfg = tiny_config(["train.max_steps=2", "train.log_every=1", "train.eval_every=2", "train.save_every=2",
                       "train.device=cpu", "train.threads=1"])
    run("pretrain", cfg, str(data), tmp_path / "run1", show=True)
    assert "threads: 1 (train.threads)" in capsys.readouterr().out
    assert [r["threads"] for r in read_metrics(tmp_path / "run1" / "metrics.jsonl") if "loss" in r] == [1, 1]
