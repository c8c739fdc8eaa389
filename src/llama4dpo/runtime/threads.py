"""How many CPU threads torch computes with (`train.threads`): a fixed count, or "auto", the cores that no other
process is using, read again as training runs.

Machines are shared, and torch's default of one thread per core stalls when they are: every parallel region waits
for its slowest thread, and a thread whose core another process holds runs only in that process's gaps. On 2
cores with one busy neighbour, 40 pretraining steps of the demo preset took 68.5 s with two threads and 20.3 s
with one. "auto" reads, over the last ~half second of training steps, how much CPU time the other processes
took (/proc/stat's busy time less this process's own) and computes with the cores left: cores - others, rounded,
at least 1. A change needs two readings in a row that agree. After a change the chooser compares the step rate
with the one before it (the probe): if it got worse by more than 10% it goes back, and leaves that count alone
for a while. Where /proc/stat is missing (not Linux), or OMP_NUM_THREADS is set (torchrun sets it to 1 per
process), "auto" keeps torch's count.

The thread count changes how some sums are split, so results can differ in the last bits between counts: a run
that must resume bit for bit sets a fixed count (train.threads=N).
"""

from __future__ import annotations

import os
import time

import torch

WINDOW_S = 0.5        # seconds of training steps per reading
WORSE = 0.9           # a change whose rate falls below this share of the old rate is taken back
HOLD_READINGS = 40    # readings a count taken back is left alone (~20 s of steps)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat's first line), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # (guest time is already inside user time)


def own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class Reading:
    """The others' CPU use (in cores) and this process's rate over an interval of training steps."""

    def __init__(self):
        self.wall = self.others = self.tokens = 0.0
        self._start: tuple[float, float, float] | None = None

    def begin(self) -> None:
        self._start = (time.perf_counter(), busy_seconds(), own_seconds())

    def end(self, tokens: int) -> None:
        """Add the interval since `begin` (others: 0 where /proc/stat is missing)."""
        wall0, busy0, own0 = self._start
        wall, busy = time.perf_counter() - wall0, busy_seconds()
        others = 0.0 if busy is None or busy0 is None else max(0.0, (busy - busy0) - (own_seconds() - own0))
        self.wall, self.others, self.tokens = self.wall + wall, self.others + others, self.tokens + tokens

    @property
    def cores_used(self) -> float:
        return self.others / self.wall if self.wall else 0.0

    @property
    def rate(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


class ThreadChooser:
    """`train.threads`: `start()` sets the count before any work; `begin()` / `end(tokens)` around each training
    step let "auto" follow the machine's load. `note` holds a line to print when the count changed."""

    def __init__(self, setting: int | str = "auto", device: torch.device | str = "cpu", cores: int | None = None):
        self.cores = cores or usable_cores()
        self.fixed = setting if isinstance(setting, int) else None
        self.auto = (self.fixed is None and torch.device(device).type == "cpu"
                     and "OMP_NUM_THREADS" not in os.environ and busy_seconds() is not None)
        self.reading, self.last_want = Reading(), None
        self.before: tuple[int, float] | None = None  # (count, rate) before the last change, while it is probed
        self.held: dict[int, int] = {}                # count -> readings it is left alone
        self.note: str | None = None

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def start(self, sample_s: float = 0.2) -> str:
        """Set the starting count; returns the line that says what was chosen and why."""
        if self.fixed is not None:
            torch.set_num_threads(self.fixed)
            return f"threads: {self.fixed} (train.threads)"
        if not self.auto:
            why = "OMP_NUM_THREADS" if "OMP_NUM_THREADS" in os.environ else "torch's default"
            return f"threads: {self.threads} ({why})"
        r = Reading()
        r.begin()
        time.sleep(sample_s)
        r.end(0)
        n = self.want(r.cores_used)
        torch.set_num_threads(n)
        return f"threads: {n} of {self.cores} cores (train.threads=auto; other processes use {r.cores_used:.1f})"

    def want(self, others: float) -> int:
        return max(1, min(self.cores, int(self.cores - others + 0.5)))

    def begin(self) -> None:
        if self.auto:
            self.reading.begin()

    def end(self, tokens: int) -> None:
        if not self.auto:
            return
        self.reading.end(tokens)
        if self.reading.wall >= WINDOW_S:
            r, self.reading = self.reading, Reading()
            self._decide(r)

    def _decide(self, r: Reading) -> None:
        now = self.threads
        self.held = {k: v - 1 for k, v in self.held.items() if v > 1}
        if self.before is not None:  # the first reading after a change: keep it only if it did not slow down
            old, old_rate = self.before
            self.before = None
            if r.rate < WORSE * old_rate:
                torch.set_num_threads(old)
                self.held[now] = HOLD_READINGS
                self.last_want = None
                self.note = (f"threads: {now} -> {old} ({now} ran at {r.rate:,.0f} tokens/s against {old_rate:,.0f}"
                             f" with {old})")
                return
        want = self.want(r.cores_used)
        agreed, self.last_want = want == self.last_want, want
        if want != now and agreed and want not in self.held:
            torch.set_num_threads(want)
            self.before = (now, r.rate)
            self.note = f"threads: {now} -> {want} (other processes use {r.cores_used:.1f} of {self.cores} cores)"

    def take_note(self) -> str | None:
        note, self.note = self.note, None
        return note
