"""Compiled decoding: `torch.compile(model.decode)` and the static KV caches it decodes into.

A `Decoder` belongs to one model and is made by whoever generates with compilation (`generate(...,
compile=True)` makes one per call, shared by its batches). It compiles the step once per batch size and cache
length: on CPU with inductor's C++ wrapper, which drops the per-kernel Python calls; on CUDA as CUDA graphs
(mode "reduce-overhead"), which drop the kernel launches.
"""

import contextlib
from typing import Iterator

import torch

from ..errors import UserError
from ..model.cache import KVCache


class Decoder:
    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self._compiled = None      # the compiled step, and the weights it was compiled with (CPU)
        self._weights = None
        self._seen = set()         # step signatures that have run: later calls skip guard evaluation (CPU)
        self._caches: dict[tuple, KVCache] = {}

    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`model.decode(tokens, cache)`, compiled (the first call of a shape compiles), into a cache from
        `Decoder.cache` (which also notices weights changed since the last generation)."""
        compiled = self._compiled or self._current()
        key = None if self.cuda else (tokens.shape, cache.k[0].shape, cache.k[0].dtype, self.model.training,
                                      torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                                      torch.is_autocast_enabled(self.device.type),
                                      torch.get_autocast_dtype(self.device.type))
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
        try:
            if key in self._seen:
                try:
                    return self._run(compiled, tokens, cache, skip_guards=True)
                except RuntimeError as e:  # its compiled code was dropped meanwhile (another model's reset)
                    if "skip_guard_eval_unsafe" not in str(e):
                        raise
            out = self._run(compiled, tokens, cache, skip_guards=False)
            if key is not None:
                self._seen.add(key)
            return out
        except (torch._dynamo.exc.TorchDynamoException, GuardOnDataDependentSymNode) as e:
            # e.g. no C++ compiler on this machine, or a shape torch.compile cannot trace on this device
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"torch.compile failed ({first[:200]}); generate without --compile") from None

    def _current(self):
        """The compiled step, compiled again when the weights changed since (CPU). On CPU the weights are compiled
        in as constants ("freezing": oneDNN gets them prepacked; batch 8 decoded ~1.2x faster in A/B runs), and
        products of one input are concatenated into one (e.g. q/k/v: each oneDNN call costs ~14 us however small;
        batch 1 decoded 1.16-1.20x faster). So the step must compile again when the weights change (updated in
        place, loaded): torch.compile keeps compiled code per function and would reuse it, so all of it is dropped."""
        import torch._dynamo

        m = self.model
        weights = None if self.cuda else [(t.data_ptr(), t._version) for t in (*m.parameters(), *m.buffers())]
        if self._compiled is not None and weights == self._weights:
            return self._compiled
        if self._compiled is not None:
            torch._dynamo.reset()
            self._seen.clear()
        if self.cuda:
            self._compiled = torch.compile(m.decode, dynamic=False, mode="reduce-overhead")
        else:
            self._compiled = torch.compile(m.decode, dynamic=False, options={"cpp_wrapper": True})
        self._weights = weights
        return self._compiled

    def _run(self, compiled, tokens, cache, skip_guards: bool):
        # On CPU, once a step has run with given shapes and modes, its later calls skip guard evaluation (dynamo
        # then only tells its compiled variants apart): profiled at batch 8, dynamo's cache lookup 228 -> 45 us a
        # step. The weights, which the guards would also check, are checked in `_current`. Not on CUDA (untested).
        if self.cuda:  # the last step's outputs (read already) may be overwritten by this replay
            torch.compiler.cudagraph_mark_step_begin()
        if skip_guards:  # nothing compiles on this path (code dropped meanwhile raises): no config patches,
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):  # ~33 us a step saved
                return compiled(tokens, cache)
        with (torch._dynamo.config.patch(capture_scalar_outputs=True),  # experts' row counts, in the graph
              torch._inductor.config.patch({"freezing": not self.cuda, "cpp.enable_concat_linear": not self.cuda}),
              torch.compiler.set_stance("default")):
            return compiled(tokens, cache)

    @contextlib.contextmanager
    def cache(self, batch_size: int, max_len: int) -> Iterator[KVCache]:
        """An empty KV cache for the compiled step, the same tensors at every use of a batch size, length and
        dtype, so that the step neither recompiles nor (on CUDA) records its graph again. On CUDA its tensors are
        marked as static addresses, which CUDA graphs need to update them in place. Taken while in use: a nested
        or concurrent generation of the same shape gets a cache of its own."""
        import torch._dynamo

        self._current()  # (once per generation: weights changed in place since the last one compile again)
        key = (batch_size, max_len, self.model.cache_dtype())
        cache = self._caches.pop(key, None)
        if cache is None:
            cache = self.model.new_cache(batch_size, max_len)
            if self.cuda:  # (not on CPU: the step compiled there freezes static inputs as constants)
                for t in cache.tensors():
                    torch._dynamo.mark_static_address(t)
        else:  # emptied as new: a masked slot still multiplies its value by 0 (a NaN left there would spread)
            for t in cache.tensors():
                t.zero_()
        try:
            yield cache
        finally:
            self._caches[key] = cache
