"""A key/value cache layer that grows in place.

transformers' `DynamicLayer` appends with `torch.cat`, which re-allocates and copies the whole cache at every decode
step: for a 16-row batch of a 190 M model that is hundreds of MB per token. `GrowableLayer` keeps spare capacity and
writes new keys/values into it, doubling when full, so a decode step copies only the new token. `keys`/`values` stay
views of the live part, so everything that reads a `DynamicLayer` reads this one unchanged.

Used for inference only (in-place writes into a buffer do not belong in an autograd graph); training keeps the
stock layer.
"""

from __future__ import annotations

from torch import Tensor
from transformers.cache_utils import DynamicLayer

MIN_HEADROOM = 64


class GrowableLayer(DynamicLayer):
    """`DynamicLayer` with amortised O(new tokens) appends. Buffers are [B, H, capacity, hd]."""

    def __init__(
        self, keys: Tensor | None = None, values: Tensor | None = None, headroom: int = MIN_HEADROOM
    ):
        super().__init__()
        self._key_buf: Tensor | None = None
        self._value_buf: Tensor | None = None
        if keys is not None and values is not None:
            self.replace(keys, values, headroom)

    def replace(self, keys: Tensor, values: Tensor, headroom: int = MIN_HEADROOM) -> None:
        """Hold exactly `keys`/`values` ([B, H, S, hd]) with room for `headroom` more positions."""
        batch, heads, length, head_dim = keys.shape
        self._key_buf = keys.new_empty(batch, heads, length + headroom, head_dim)
        self._value_buf = values.new_empty(batch, values.shape[1], length + headroom, values.shape[-1])
        self._key_buf[:, :, :length] = keys
        self._value_buf[:, :, :length] = values
        self.keys, self.values = self._key_buf[:, :, :length], self._value_buf[:, :, :length]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append [B, H, n, hd] new states; returns the whole live keys and values."""
        if self._key_buf is None:
            self.replace(key_states, value_states)
            return self.keys, self.values
        length, new = self.keys.shape[-2], key_states.shape[-2]
        if length + new > self._key_buf.shape[-2]:
            self.replace(self.keys, self.values, headroom=max(MIN_HEADROOM, length + new))
        self._key_buf[:, :, length : length + new] = key_states
        self._value_buf[:, :, length : length + new] = value_states
        self.keys = self._key_buf[:, :, : length + new]
        self.values = self._value_buf[:, :, : length + new]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buf = self._value_buf = None
        super().reset()


def set_layer_states(layer, keys: Tensor, values: Tensor, headroom: int = MIN_HEADROOM) -> None:
    """Replace a cache layer's contents (after selecting or merging rows), keeping growable layers growable."""
    if isinstance(layer, GrowableLayer):
        layer.replace(keys, values, headroom)
    else:
        layer.keys, layer.values = keys, values
