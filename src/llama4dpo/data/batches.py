"""Batch sources whose output is a pure function of (step, micro-batch): resuming at step s needs no
saved data-loader state, and a run killed anywhere replays exactly the same batches.

Under torchrun each rank takes a contiguous slice `rows` of every global micro-batch, so the examples of a
step, and their order, do not depend on the number of processes."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class StreamBatches:
    """Random windows of a token stream (pretraining); the generator is seeded from (seed, step, micro)."""

    def __init__(self, stream, micro_batch_size: int, seed: int, rows: slice = slice(None)):
        self.stream, self.bs, self.seed, self.rows = stream, micro_batch_size, seed, rows

    def __call__(self, step: int, micro: int) -> dict:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1009 + micro)
        return {k: v[self.rows] for k, v in self.stream.get_batch(self.bs, g).items()}

    def fixed(self, n_batches: int) -> list[dict]:
        """Evaluation batches: the same windows every time (a generator with a fixed seed)."""
        g = torch.Generator().manual_seed(self.seed + 17)
        return [self.stream.get_batch(self.bs, g) for _ in range(n_batches)]


class ExampleBatches:
    """Shuffled passes over prepared examples (SFT, preference). Epoch e uses permutation(seed, e); the
    k-th micro-batch overall takes the next `micro_batch_size` examples of that order."""

    def __init__(self, examples: Sequence, collate: Callable[[list], dict], micro_batch_size: int,
                 accum: int, seed: int, rows: slice = slice(None)):
        if len(examples) == 0:
            raise ValueError("no examples to train on")
        self.examples, self.collate, self.bs, self.accum, self.seed = examples, collate, micro_batch_size, accum, seed
        self.rows = rows
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.examples), generator=g).tolist(), epoch
        return self._perm

    def indices(self, step: int, micro: int) -> list[int]:
        n = len(self.examples)
        first = (step * self.accum + micro) * self.bs
        return [self._order((first + i) // n)[(first + i) % n] for i in range(self.bs)]

    def __call__(self, step: int, micro: int) -> dict:
        idx = self.indices(step, micro)[self.rows]
        batch = self.collate([self.examples[i] for i in idx])
        batch["index"] = torch.tensor(idx)
        return batch

    def fixed(self, n_batches: int | None = None) -> list[dict]:
        """The examples in order (all of them when n_batches is None), for evaluation."""
        stop = len(self.examples) if n_batches is None else min(len(self.examples), n_batches * self.bs)
        out = []
        for lo in range(0, stop, self.bs):
            idx = list(range(lo, min(lo + self.bs, stop)))
            batch = self.collate([self.examples[i] for i in idx])
            batch["index"] = torch.tensor(idx)
            out.append(batch)
        return out
