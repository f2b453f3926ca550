"""Incremental detokenisation with stop strings: turns a growing list of token ids into text deltas, holding back
any tail that could still become a stop string, and cutting the text at the first stop string found."""

from __future__ import annotations


class IncrementalText:
    """Decode `ids` as they grow; `push(token)` returns the new text safe to emit and whether a stop string hit."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self._sent = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a generated token (not EOS); returns the text delta to emit now."""
        self.ids.append(token_id)
        self.text = self._tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self._stop:
            cut = self.text.find(stop)
            if cut != -1:
                self.text = self.text[:cut]
                self.stopped = True
        safe = len(self.text) if self.stopped else max(self._sent, len(self.text) - self._holdback)
        delta = self.text[self._sent : safe]
        self._sent = safe
        return delta

    def flush(self) -> str:
        """The held-back tail, at the end of generation."""
        delta = self.text[self._sent :]
        self._sent = len(self.text)
        return delta
