"""Token ids to text, one token at a time: UTF-8 safe, and stop strings never shown."""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"
# A UTF-8 character is at most 4 bytes, so at most 4 byte tokens; past this many held tokens
# the text is not waiting for a character to complete.
MAX_CHARACTER_TOKENS = 3
MAX_HELD_TOKENS = 8


class IncrementalDetokenizer:
    """Decodes a growing list of ids, giving out only text that later tokens cannot change.

    Special tokens are left out of the text, all of them (``hidden`` None) or the ids in
    ``hidden`` (so that others, such as a family's tool-call markers, stay in).

    Each new token is decoded together with a few tokens before it, so that tokenizers
    whose pieces depend on their neighbours (SentencePiece spaces, byte-level BPE) give
    the same text as decoding everything at once; text ending in an incomplete UTF-8
    character is held back until the character is complete.
    """

    def __init__(self, tokenizer: Any, hidden: frozenset[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.hidden = hidden
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        if self.hidden is None:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode([i for i in ids if i not in self.hidden])

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        if len(self.ids) - self.read_offset < MAX_HELD_TOKENS:
            return ""
        # So many tokens and still no whole character: the bytes are invalid, not unfinished.
        # Give them out as the decoder renders them, keeping back only the last few tokens
        # (which may still begin a character), so the window decoded per token stays short.
        cut = len(self.ids) - MAX_CHARACTER_TOKENS
        text = self._decode(self.ids[self.prefix_offset : cut])
        self.prefix_offset, self.read_offset = self.read_offset, cut
        return text[len(before) :]

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

    def __init__(
        self, tokenizer: Any, stop: tuple[str, ...] = (), hidden: frozenset[int] | None = None
    ) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, hidden)
        self.stop = stop
        self.pending = ""
        self.stopped = False
        self.stopped_by: str | None = None

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
        hits = [(at, stop) for stop in self.stop if (at := self.pending.find(stop)) >= 0]
        if hits:
            at, self.stopped_by = min(hits)
            self.stopped = True
            text, self.pending = self.pending[:at], ""
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
