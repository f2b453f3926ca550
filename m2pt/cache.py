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

    def replace(self, keys: Tensor, values: Tensor, headroom: int = MIN_HEADROOM) -> tuple[Tensor, Tensor]:
        """Hold exactly `keys`/`values` ([B, H, S, hd]) with room for `headroom` more positions.

        Returns the new buffers [B, H, S + headroom, hd]."""
        batch, heads, length, head_dim = keys.shape
        key_buf = keys.new_empty(batch, heads, length + headroom, head_dim)
        value_buf = values.new_empty(batch, values.shape[1], length + headroom, values.shape[-1])
        key_buf[:, :, :length] = keys
        value_buf[:, :, :length] = values
        self._key_buf, self._value_buf = key_buf, value_buf
        self._live(key_buf, value_buf, length)
        self.device, self.is_initialized = keys.device, True
        return key_buf, value_buf

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append [B, H, n, hd] new states; returns the whole live keys and values."""
        keys, values, key_buf, value_buf = self.keys, self.values, self._key_buf, self._value_buf
        new = key_states.shape[-2]
        if keys is None or values is None or key_buf is None or value_buf is None:
            return self._live(*self.replace(key_states, value_states), new)
        length = keys.shape[-2]
        if length + new > key_buf.shape[-2]:
            key_buf, value_buf = self.replace(keys, values, headroom=max(MIN_HEADROOM, length + new))
        key_buf[:, :, length : length + new] = key_states
        value_buf[:, :, length : length + new] = value_states
        return self._live(key_buf, value_buf, length + new)

    def _live(self, key_buf: Tensor, value_buf: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """Point `keys`/`values` at the first `length` positions of the buffers; returns them."""
        keys, values = key_buf[:, :, :length], value_buf[:, :, :length]
        self.keys, self.values = keys, values
        return keys, values

    def reset(self) -> None:
        self._key_buf = self._value_buf = None
        super().reset()


def layer_states(layer: object) -> tuple[Tensor, Tensor]:
    """A filled attention-cache layer's keys and values, each [B, H, S, hd]."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, Tensor) or not isinstance(values, Tensor):
        raise TypeError(f"{type(layer).__name__} holds no key/value tensors")
    return keys, values


def set_layer_states(layer: object, keys: Tensor, values: Tensor, headroom: int = MIN_HEADROOM) -> None:
    """Replace a cache layer's contents (after selecting or merging rows), keeping growable layers growable."""
    if isinstance(layer, GrowableLayer):
        layer.replace(keys, values, headroom)
    elif isinstance(layer, DynamicLayer):
        layer.keys, layer.values = keys, values
    else:
        raise TypeError(f"cannot set the states of a {type(layer).__name__}")
