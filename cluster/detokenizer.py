"""Streaming text for generated tokens, with stop strings (control plane, pure Python).

``IncrementalDetokenizer`` turns a request's generated token ids, pushed as they are committed
(one token, or a whole speculative step), into text deltas a client can be shown at once, the way
OpenAI-compatible servers (vLLM) stream:

* **Windowed decoding.** Decoding token by token is wrong for most tokenizers: SentencePiece
  drops the leading space of the first token it decodes, byte-level BPE and byte-fallback tokens
  split one character over several tokens. So text is decoded over a small window of ids:
  ``prefix`` (a few tokens of context, already shown) followed by the new ones; the new text is
  ``decode(window)[len(decode(prefix)):]``. The window starts with the last prompt tokens and is
  cut back to ``_CONTEXT`` tokens whenever it grows past ``_MAX_WINDOW``, so each token costs
  O(1) decoding, never a re-decode of the whole output.
* **No partial characters.** While the window's text ends with U+FFFD (an incomplete UTF-8
  sequence) the trailing U+FFFD run is held; the text before it is final and is released. More
  than ``_MAX_PENDING`` tokens ending in U+FFFD can only be invalid bytes (a character spans at
  most 4 byte tokens): the window then moves on over all but the last 3 tokens.
* **Stop strings** are matched on the visible text (special tokens produce no text and are never
  decoded). The stop string that appears first when the text is read character by character wins
  (of two ending at the same character, the longer); the text ends before it, or after it with
  ``include_stop_str``. The result does not depend on how tokens are chunked into ``push`` calls,
  only ``num_tokens_kept`` does: the token that completed the stop string is the last one kept.
* **Hold-back.** The longest suffix of the text that is a proper prefix of a stop string is not
  shown until the next tokens decide it (it is cut, or released when the text diverges).
  ``finish()`` releases whatever is held when a generation ends for another reason.

Invariants:

* shown text is never retracted: the concatenated deltas (plus ``finish()``) are, at every
  moment, a prefix of the final text;
* no delta ends in a U+FFFD that a later token would turn into a character, and no delta shows
  a prefix of a stop string that a later token turns into a match;
* without stop strings the final text equals ``decode(prompt + output)`` minus the prompt's text
  (for byte-level BPE this is ``tokenizer.decode(output, skip_special_tokens=True)``), decoded
  with ``skip_special_tokens=True`` and without transformers' ``clean_up_tokenization_spaces``
  (it rewrites text across token boundaries, e.g. ``" n" + "'t"`` → ``"n't"``, which a stream
  cannot retract; vLLM does not apply it either);
* the shown text never contains a stop string, except the final one with ``include_stop_str``;
* after a stop (or ``finish()``) nothing more is shown.

Known limitation (shared with every windowed detokenizer): tokenizers' ``ByteFallback`` decoder
turns a *run* of byte tokens holding invalid UTF-8 into one U+FFFD per byte, valid characters of
the run included; a stream that already showed such a character shows it, not the U+FFFDs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

MAX_STOP_STRINGS = 16

_REPLACEMENT = "\ufffd"
_CONTEXT = 5  # prompt/output tokens decoded as context before the new ones (vLLM uses 5)
_MAX_WINDOW = 16  # once the shown part of the window is longer, it is cut back to _CONTEXT tokens
_MAX_PENDING = 6  # tokens held while the text ends in U+FFFD before the window is forced on
_TAIL = 3  # tokens kept pending when forced: an invalid byte's rendering depends on 3 bytes after it


@dataclass(frozen=True)
class TextDelta:
    """What one ``push`` produced: ``text`` to show now; ``stopped`` when a stop string ended the
    output; ``num_tokens_kept`` of the pushed tokens belong to the output (all of them unless
    ``stopped``; then the one that completed the stop string is the last)."""

    text: str
    stopped: bool
    num_tokens_kept: int


def validate_stop_strings(stop: Any) -> tuple[str, ...]:
    """Check an OpenAI-style ``stop`` value and return it as a tuple (duplicates removed).

    Accepts ``None``, a non-empty string, or a list (or tuple) of at most ``MAX_STOP_STRINGS``
    non-empty strings; raises ``ValueError`` saying what is wrong otherwise.
    """
    if stop is None:
        return ()
    if isinstance(stop, str):
        if not stop:
            raise ValueError("stop must not be an empty string")
        return (stop,)
    if not isinstance(stop, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")  # noqa: TRY004 (request validation: one error type)
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    for i, s in enumerate(stop):
        if not isinstance(s, str):
            raise ValueError(f"stop[{i}] must be a string, got {type(s).__name__}")  # noqa: TRY004
        if not s:
            raise ValueError(f"stop[{i}] must not be an empty string")
    return tuple(dict.fromkeys(stop))


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that ``skip_special_tokens=True`` drops: the special-tokens map and added tokens marked special."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or ()) if i is not None}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, token in added.items() if getattr(token, "special", False))
    return frozenset(ids)


class IncrementalDetokenizer:
    """Text deltas for one request's generated tokens; see the module docstring."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Iterable[int] = (),
        stop_strings: Any = (),
        include_stop_str: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._special = special_token_ids(tokenizer)
        self._stops = validate_stop_strings(stop_strings)
        self._include_stop = bool(include_stop_str)

        # Decode window: ids (never special) from the prefix offset; window[:read] is shown text
        # whose decoding is prefix_text; `confirmed` chars of the text after it are already out.
        context: list[int] = []
        for token in reversed(list(prompt_ids)):
            if len(context) == _CONTEXT:
                break
            if int(token) not in self._special:
                context.append(int(token))
        context.reverse()
        start, self._prefix_text = self._clean_start(context, 0)
        del context[:start]
        self._window = context
        self._read = len(context)
        # A prompt that ends inside a character: the tokens holding it stay pending, so the
        # generated token that completes the character outputs it whole.
        while self._read > 0 and len(context) - self._read < _TAIL and self._prefix_text.endswith(_REPLACEMENT):
            self._read -= 1
            self._prefix_text = self._decode(context[: self._read])
        self._confirmed = 0

        self._held = ""  # decoded text not shown yet (a possible stop-string prefix)
        self._out: list[str] = []  # this push's text to show
        self._shown: list[str] = []  # everything shown so far, in chunks
        self._num_tokens = 0
        self._stop_string: str | None = None
        self._finished = False

    # ------------------------------------------------------------------ public API
    @property
    def text(self) -> str:
        """The output text shown so far (held-back text excluded)."""
        if len(self._shown) > 1:
            self._shown = ["".join(self._shown)]
        return self._shown[0] if self._shown else ""

    @property
    def stopped(self) -> bool:
        """Whether a stop string ended the output."""
        return self._stop_string is not None

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the output (vLLM's ``stop_reason``), if any."""
        return self._stop_string

    @property
    def num_tokens(self) -> int:
        """Generated tokens kept so far (special tokens included)."""
        return self._num_tokens

    def push(self, token_ids: Sequence[int] | int) -> TextDelta:
        """Append generated tokens; return the text that is now safe to show.

        After a stop, tokens are ignored (``TextDelta("", True, 0)``); after ``finish()`` pushing
        is an error.
        """
        if self._finished:
            raise RuntimeError("push() after finish()")
        if isinstance(token_ids, int):
            token_ids = (token_ids,)
        if self.stopped:
            return TextDelta("", True, 0)
        kept = 0
        for token in token_ids:
            kept += 1
            self._num_tokens += 1
            new = self._append(int(token))
            if new and self._add_text(new):
                break
        return TextDelta(self._take_out(), self.stopped, kept)

    def finish(self) -> str:
        """End of the generation (for a reason other than a stop string): flush held-back text.

        A character left incomplete is shown as U+FFFD, as ``decode`` shows it. Idempotent.
        """
        if self._finished:
            return ""
        self._finished = True
        if self.stopped:
            return ""
        full = self._decode(self._window)
        new = full[len(self._prefix_text) + self._confirmed :]
        if not (new and self._add_text(new)):
            self._out.append(self._held)
            self._held = ""
        return self._take_out()

    # ------------------------------------------------------------------ decoding
    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _append(self, token: int) -> str:
        """Add one token to the window; return the text it made final."""
        if token in self._special:
            return ""
        window = self._window
        window.append(token)
        full = self._decode(window)
        start = len(self._prefix_text)
        delta = full[start:]
        if not delta.endswith(_REPLACEMENT):
            new = delta[self._confirmed :]
            self._confirmed = 0
            self._advance(len(window), full)
            return new
        # Ends inside a character (or in invalid bytes): the text before the U+FFFD run is final.
        stable = delta.rstrip(_REPLACEMENT)
        new = stable[self._confirmed :]
        self._confirmed = max(self._confirmed, len(stable))
        if len(window) - self._read > _MAX_PENDING:
            new += self._force(full)
        return new

    def _force(self, full: str) -> str:
        """Too many tokens end in U+FFFD: make all but the last ``_TAIL`` of them shown text."""
        start = len(self._prefix_text)
        for j in range(len(self._window) - _TAIL, self._read, -1):
            text_j = self._decode(self._window[:j])
            if len(text_j) >= start and full.startswith(text_j):
                # With _TAIL tokens after j present, the rendering of everything before j is final.
                final = len(text_j) - start
                new = text_j[start + self._confirmed :]
                self._confirmed = max(0, self._confirmed - final)
                self._advance(j, text_j)
                return new
        return ""  # no boundary renders consistently yet: keep holding (the next token retries)

    def _advance(self, read: int, prefix_text: str) -> None:
        """``window[:read]`` is now shown text decoding to ``prefix_text``; keep the window small."""
        self._read, self._prefix_text = read, prefix_text
        if read > _MAX_WINDOW:
            cut, text = self._clean_start(self._window[:read], read - _CONTEXT)
            del self._window[:cut]
            self._read, self._prefix_text = read - cut, text

    def _clean_start(self, ids: list[int], start: int) -> tuple[int, str]:
        """The first of ``ids[start:]`` at which decoding does not begin inside a character, and
        the text from there (byte-fallback decoders garble a whole byte run cut in the middle)."""
        text = self._decode(ids[start:])
        for _ in range(_TAIL):
            if not text.startswith(_REPLACEMENT) or start + 1 >= len(ids):
                break
            start += 1
            text = self._decode(ids[start:])
        return start, text

    # ------------------------------------------------------------------ stop strings
    def _add_text(self, new: str) -> bool:
        """Add final text: look for a stop string, move what cannot start one to the output.

        Returns whether a stop string was found (the output is then complete).
        """
        buf = self._held + new
        if not self._stops:
            self._held = ""
            self._out.append(buf)
            return False
        old = len(self._held)  # every match ends in `new`: earlier ones were found before
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for stop in self._stops:
            i = buf.find(stop, max(0, old - len(stop) + 1))
            if i >= 0:
                key = (i + len(stop), -len(stop), stop)
                if best is None or key < best:
                    best = key
        if best is not None:
            end, neg_len, stop = best
            self._out.append(buf[: end if self._include_stop else end + neg_len])
            self._held = ""
            self._stop_string = stop
            return True
        hold = self._stop_prefix_len(buf)
        self._out.append(buf[: len(buf) - hold])
        self._held = buf[len(buf) - hold :]
        return False

    def _stop_prefix_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            i = buf.find(stop[0], max(0, len(buf) - len(stop) + 1))
            while i != -1 and len(buf) - i > best:
                if stop.startswith(buf[i:]):
                    best = len(buf) - i
                    break
                i = buf.find(stop[0], i + 1)
        return best

    def _take_out(self) -> str:
        text = "".join(self._out)
        self._out.clear()
        if text:
            self._shown.append(text)
        return text
