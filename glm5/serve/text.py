"""The text side of a generation: incremental detokenization, stop strings, and the GLM-5 output parser.

`TextStream` turns the token ids of one choice into text pieces that are safe to send: a piece never ends in
a broken UTF-8 character, never contains a stop string, and text that could still become one is held back.
`ChoiceText` adds the chat parser (reasoning / content / tool calls) on top.
"""

from __future__ import annotations

from glm5.chat import StreamingParser


class IncrementalDetokenizer:
    """Decode ids as they come (vLLM's prefix-offset method): O(new tokens) per step, correct across
    multi-byte characters split over tokens."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read])
        after = decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        decode = self.tokenizer.decode
        rest = decode(self.ids[self.prefix :])[len(decode(self.ids[self.prefix : self.read])) :]
        self.prefix = self.read = len(self.ids)
        return rest


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None, hidden_ids: set[int] | None = None,
                 prefix: str = "") -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = list(stop or [])
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.hidden_ids = hidden_ids or set()  # end-of-turn ids: end the text, never part of it
        self.text = prefix  # everything so far (a forced prefix included)
        self.prefix_len = len(prefix)
        self.sent = 0
        self.stopped = False  # a stop string ended the text
        self.stop_string: str | None = None  # the one that did
        self.used = 0  # of the last push's ids, how many the text used (all, or up to the one completing a stop)

    def push(self, ids: list[int], finished: bool) -> str:
        """New token ids -> the next piece of text that is safe to send ('' if none yet)."""
        self.used = len(ids)
        if not self.stopped:
            visible = [i for i in ids if i not in self.hidden_ids]
            self.text += self.detokenizer.push(visible)
            if finished:
                self.text += self.detokenizer.flush()
            if self.stop:
                search_from = max(0, self.sent - self.holdback)
                hits = [(i, i + len(s)) for i, s in ((self.text.find(s, search_from), s) for s in self.stop) if i >= 0]
                if hits:
                    cut, end = min(hits)
                    self.stop_string = self.text[cut:end]
                    if len(ids) > 1:  # several tokens at once (MTP speculation): those after the stop's last
                        self.used = self._ids_until(ids, end)  # one were never part of the text
                    self.text = self.text[:cut]
                    self.stopped = True
        end = len(self.text) if (finished or self.stopped) else max(self.sent, len(self.text) - self.holdback)
        piece = self.text[self.sent : end]
        self.sent = end
        return piece

    def _ids_until(self, ids: list[int], end: int) -> int:
        """How many of `ids` (just pushed) it takes for the text to reach `end` characters."""
        decode, all_ids = self.detokenizer.tokenizer.decode, self.detokenizer.ids
        target = end - self.prefix_len
        visible_before = len(all_ids) - sum(1 for i in ids if i not in self.hidden_ids)
        seen = 0
        for n, token in enumerate(ids, start=1):
            if token in self.hidden_ids:
                continue
            seen += 1
            # (a token that ends inside a character decodes to U+FFFD there: not yet text)
            if len(decode(all_ids[: visible_before + seen]).rstrip("\ufffd")) >= target:
                return n
        return len(ids)


class ChoiceText:
    """One chat choice: text stream + GLM-5 parser. `push` returns parser events."""

    def __init__(self, tokenizer, tools, thinking: bool, stop, hidden_ids, forced: str = "") -> None:
        self.stream = TextStream(tokenizer, stop, hidden_ids)
        self.parser = StreamingParser(tools, thinking=thinking, tool_calls=tools is not None)
        self.forced = forced

    @property
    def stopped(self) -> bool:
        """A stop string ended the text (as TextStream.stopped)."""
        return self.stream.stopped

    def push(self, ids: list[int], finished: bool) -> list:
        piece = self.stream.push(ids, finished)
        if self.forced:
            piece, self.forced = self.forced + piece, ""
        events = self.parser.feed(piece) if piece else []
        if finished or self.stream.stopped:
            events += self.parser.close()
        return events

    def finish(self):
        return self.parser.finish()
