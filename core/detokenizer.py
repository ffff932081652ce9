"""Token ids to text, one token at a time: UTF-8 safe, and stop strings never shown."""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing list of ids, giving out only text that later tokens cannot change.

    Each new token is decoded together with a few tokens before it, so that tokenizers
    whose pieces depend on their neighbours (SentencePiece spaces, byte-level BPE) give
    the same text as decoding everything at once; text ending in an incomplete UTF-8
    character is held back until the character is complete.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back (at the end of the sequence)."""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before) :]


class TextStream:
    """The text a client sees: detokenized, cut before the first stop string.

    Text that could be the start of a stop string is held back until it is clear either
    way, so no part of a stop string is ever given out.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = stop
        self.pending = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """Add a token; return the text that is now safe to show."""
        self.pending += self.detokenizer.add(token)
        return self._release()

    def finish(self) -> str:
        """The rest of the text, when the sequence ends for another reason than a stop string."""
        if self.stopped:
            return ""
        self.pending += self.detokenizer.flush()
        return self._release(final=True)

    def _release(self, final: bool = False) -> str:
        if not self.stop:
            text, self.pending = self.pending, ""
            return text
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            text, self.pending = self.pending[: min(hits)], ""
            return text
        keep = 0 if final else self._longest_stop_prefix_suffix()
        cut = len(self.pending) - keep
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text

    def _longest_stop_prefix_suffix(self) -> int:
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest
