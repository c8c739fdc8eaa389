"""The KV cache of incremental decoding."""

import torch

from ..config import ModelConfig


class KVCache:
    """Preallocated keys/values for every layer, plus each cached token's position and padding flag.

    k[layer], v[layer]: (B, K, max_len, d). `length` tokens are filled, held as the tensor `slot` (the next
    free slot); the model advances it after a forward. In a `static` step (`LlamaModel.decode`) `update` writes
    its one token at `slot` and returns the whole buffers, so every step has the same shapes and reads no
    Python number from a tensor: what torch.compile needs to compile the step once.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.d_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.static = False

    @property
    def length(self) -> int:
        return int(self.slot)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.k, *self.v, self.positions, self.valid, self.slot]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, S, d) at [length, length + S) and return everything cached so far."""
        if self.static:  # one token at `slot`; the caller's mask hides the slots not yet filled
            self.k[layer].index_copy_(2, self.slot, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, self.slot, v.to(self.v[layer].dtype))
            return self.k[layer], self.v[layer]
        start = self.length
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
