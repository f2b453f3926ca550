"""Incremental detokenisation with stop strings: turns a growing list of token ids into text deltas.

Each step decodes only a short window of recent tokens (the prefix/read-offset scheme of TGI and vLLM), so the
cost per token is constant, not proportional to the text so far. A tail that could still become a stop string is
held back; the text is cut at the first stop string found.
"""

from __future__ import annotations


class IncrementalText:
    """`push(token)` returns the new text safe to emit; `stopped` turns True when a stop string appeared."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self._sent = 0
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _next_piece(self) -> str:
        """Text added by the newest token(s); empty while they form an incomplete character."""
        before = self._decode(self.ids[self._prefix_offset : self._read_offset])
        after = self._decode(self.ids[self._prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return after[len(before) :]

    def push(self, token_id: int) -> str:
        """Add a generated token; returns the text delta to emit now."""
        self.ids.append(token_id)
        piece = self._next_piece()
        if not piece or self.stopped:
            return ""
        search_from = max(0, len(self.text) - self._holdback)
        self.text += piece
        cuts = [c for c in (self.text.find(s, search_from) for s in self._stop) if c != -1]
        if cuts:
            self.text = self.text[: min(cuts)]
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
