"""A key/value cache layer that grows in place, in length and in rows.

transformers' `DynamicLayer` appends with `torch.cat`, which re-allocates and copies the whole cache at every decode
step: for a 16-row batch of a 190 M model that is hundreds of MB per token. `GrowableLayer` keeps spare capacity and
writes new keys/values into it, doubling when full, so a decode step copies only the new token. Rows join and leave
in place too (`append_rows`, `remove_rows`): a joining row is copied into a spare row slot, a leaving row's slot is
filled by the last row (swap-remove), so continuous batching copies one row, not the whole batch. `keys`/`values`
stay views of the live part, so everything that reads a `DynamicLayer` reads this one unchanged.

Used for inference only (in-place writes into a buffer do not belong in an autograd graph); training keeps the
stock layer.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from transformers.cache_utils import DynamicLayer

MIN_HEADROOM = 64


class GrowableLayer(DynamicLayer):
    """`DynamicLayer` with amortised O(new tokens) appends. Buffers are [row capacity, H, capacity, hd]."""

    def __init__(
        self, keys: Tensor | None = None, values: Tensor | None = None, headroom: int = MIN_HEADROOM
    ):
        super().__init__()
        self._key_buf: Tensor | None = None
        self._value_buf: Tensor | None = None
        self._rows = 0
        self._length = 0
        if keys is not None and values is not None:
            self.replace(keys, values, headroom)

    def replace(
        self, keys: Tensor, values: Tensor, headroom: int = MIN_HEADROOM, spare_rows: int = 0
    ) -> None:
        """Hold exactly `keys`/`values` ([B, H, S, hd]) with room for `headroom` more positions and `spare_rows`
        more rows."""
        batch, heads, length, head_dim = keys.shape
        self._key_buf = keys.new_empty(batch + spare_rows, heads, length + headroom, head_dim)
        self._value_buf = values.new_empty(
            batch + spare_rows, values.shape[1], length + headroom, values.shape[-1]
        )
        self._key_buf[:batch, :, :length] = keys
        self._value_buf[:batch, :, :length] = values
        self._rows, self._length = batch, length
        self._publish()
        self.device, self.is_initialized = keys.device, True

    def _publish(self) -> None:
        assert self._key_buf is not None and self._value_buf is not None
        self.keys = self._key_buf[: self._rows, :, : self._length]
        self.values = self._value_buf[: self._rows, :, : self._length]

    def _live(self) -> tuple[Tensor, Tensor]:
        """The live keys and values, each [rows, H, length, hd] (views of the buffers)."""
        assert self.keys is not None and self.values is not None, "an empty GrowableLayer"
        return self.keys, self.values

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append [B, H, n, hd] new states; returns the whole live keys and values."""
        if self._key_buf is None or self._value_buf is None:
            self.replace(key_states, value_states)
            return self._live()
        new = key_states.shape[-2]
        if self._length + new > self._key_buf.shape[-2]:
            self.replace(*self._live(), headroom=max(MIN_HEADROOM, self._length + new))
        assert self._key_buf is not None and self._value_buf is not None
        self._key_buf[: self._rows, :, self._length : self._length + new] = key_states
        self._value_buf[: self._rows, :, self._length : self._length + new] = value_states
        self._length += new
        self._publish()
        return self._live()

    def remove_rows(self, rows: Sequence[int]) -> None:
        """Drop `rows` in place: each is overwritten by the current last row (see `swap_remove_order`)."""
        assert self._key_buf is not None and self._value_buf is not None
        for row in sorted(set(rows), reverse=True):
            last = self._rows - 1
            if row != last:
                self._key_buf[row, :, : self._length] = self._key_buf[last, :, : self._length]
                self._value_buf[row, :, : self._length] = self._value_buf[last, :, : self._length]
            self._rows -= 1
        self._publish()

    def drop_leading(self, count: int) -> None:
        """Forget the first `count` positions (no row attends to them any more)."""
        if count > 0:
            keys, values = self._live()
            self.replace(keys[:, :, count:], values[:, :, count:], spare_rows=self.spare_rows)

    @property
    def spare_rows(self) -> int:
        return 0 if self._key_buf is None else int(self._key_buf.shape[0]) - self._rows

    def append_rows(self, keys: Tensor, values: Tensor) -> None:
        """Add rows [b, H, L, hd] with L ≤ the current length, right-aligned; the positions before them are
        zero (the caller masks them)."""
        assert self._key_buf is not None and self._value_buf is not None
        count, length = keys.shape[0], keys.shape[2]
        if length > self._length:
            raise ValueError(f"a joining row of {length} positions is longer than the batch's {self._length}")
        if self.spare_rows < count:
            self.replace(*self._live(), spare_rows=max(count, self._rows))
        assert self._key_buf is not None and self._value_buf is not None
        rows = slice(self._rows, self._rows + count)
        pad = self._length - length
        for buf, src in ((self._key_buf, keys), (self._value_buf, values)):
            buf[rows, :, :pad] = 0
            buf[rows, :, pad : self._length] = src
        self._rows += count
        self._publish()

    @property
    def length(self) -> int:
        return self._length

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (undo a failed step's writes)."""
        self._length = min(self._length, length)
        self._publish()

    def reset(self) -> None:
        self._key_buf = self._value_buf = None
        self._rows = self._length = 0
        super().reset()


def layer_states(layer: object) -> tuple[Tensor, Tensor]:
    """A filled attention-cache layer's keys and values, each [B, H, S, hd]."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, Tensor) or not isinstance(values, Tensor):
        raise TypeError(f"{type(layer).__name__} holds no key/value tensors")
    return keys, values


def swap_remove_order(batch: int, rows: Sequence[int]) -> list[int]:
    """The old row index at each position after `GrowableLayer.remove_rows(rows)` on a batch of `batch` rows."""
    order = list(range(batch))
    for row in sorted(set(rows), reverse=True):
        last = len(order) - 1
        if row != last:
            order[row] = order[last]
        order.pop()
    return order


def set_layer_states(layer, keys: Tensor, values: Tensor, headroom: int = MIN_HEADROOM) -> None:
    """Replace a cache layer's contents (after selecting or merging rows), keeping growable layers growable."""
    if isinstance(layer, GrowableLayer):
        layer.replace(keys, values, headroom)
    elif isinstance(layer, DynamicLayer):
        layer.keys, layer.values = keys, values
    else:
        raise TypeError(f"cannot set the states of a {type(layer).__name__}")
