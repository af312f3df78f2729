"""Token ids -> text as they arrive: incremental detokenization, stop strings, log-prob records.

Why not decode each token alone: byte-level BPE splits multi-byte characters across tokens and
sentencepiece drops leading spaces at the start of a decode, so only a decode of the whole sequence
is right. Each step decodes everything generated so far (cheap next to a model step) and emits the
part not yet emitted, holding back (a) a trailing U+FFFD, which is half a character, and (b) any
tail that could still become a stop string. The concatenated stream is therefore always exactly the
non-streamed text.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class TokenRecord:
    """One generated token: its id, where its text starts in the completion, and log-prob data."""

    token_id: int
    offset: int
    logprob: float | None  # None: the first token of an echoed prompt (nothing to condition on)
    top: tuple[tuple[int, float], ...]


class TextAssembler:
    """Accumulates one choice's tokens; `add` returns the new text that is safe to show."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.records: list[TokenRecord] = []
        self.emitted = ""
        self.stopped = False  # a stop string was found; generation should end
        self._decoded = ""

    def add(self, token_id: int, logprob: float = 0.0,
            top: Sequence[tuple[int, float]] = ()) -> str:
        """Append a token; return the text delta that can be emitted now ("" when held back)."""
        if self.stopped:
            return ""
        offset = len(self._decoded)
        self.ids.append(token_id)
        self._decoded = self.tokenizer.decode(self.ids)
        self.records.append(TokenRecord(token_id, offset, logprob, tuple(top)))
        text = self._decoded
        cut = self._find_stop(text)
        if cut is not None:
            self.stopped = True
            return self._emit_upto(cut)
        safe = len(text.rstrip("\ufffd"))
        limit = safe
        for s in self.stop:  # hold back a tail that may still grow into a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text.endswith(s[:k], 0, safe):
                    limit = min(limit, safe - k)
                    break
        return self._emit_upto(max(limit, len(self.emitted)))

    def finish(self) -> str:
        """The rest of the text once generation has ended (nothing is held back any more)."""
        if self.stopped:
            return ""
        return self._emit_upto(len(self._decoded))

    @property
    def text(self) -> str:
        return self.emitted

    def _find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s, len(self.emitted)) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _emit_upto(self, end: int) -> str:
        delta = self._decoded[len(self.emitted):end]
        self.emitted += delta
        return delta
