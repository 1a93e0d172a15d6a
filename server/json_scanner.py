"""An incremental JSON reader: fed text as it is generated, it says where each value starts
and ends (by its path of keys and indices), without waiting for the whole document. The tool
call splitter (`server/tool_stream.py`) uses it to stream a call's name and arguments out of
the JSON around them."""

from __future__ import annotations

import json
from dataclasses import dataclass

Path = tuple[str | int, ...]
SCALAR_CHARS = frozenset("0123456789+-.eEtruefalsn")
WHITESPACE = frozenset(" \t\n\r")


@dataclass
class Event:
    kind: str  # "start" or "end"
    path: Path
    offset: int  # start: the value's first character; end: just past its last


@dataclass
class _Frame:
    is_object: bool
    path: Path
    key: str | int | None = None  # the current member's key, or the current index
    expect: str = "first"  # first (a key or value, or the closing bracket), key, colon, value, next


class JsonScanner:
    """Reads one JSON value. `feed` returns the events of the new text; it stops at the end of
    the value (what follows is in `leftover`). Malformed input sets `error` and stops."""

    def __init__(self) -> None:
        self.text = ""
        self.stack: list[_Frame] = []
        self.done = False
        self.error = False
        self.leftover = ""
        self._string_start: int | None = None
        self._is_key = False
        self._escape = False
        self._scalar_start: int | None = None

    def feed(self, chunk: str) -> list[Event]:
        events: list[Event] = []
        base = len(self.text)
        self.text += chunk
        for i, c in enumerate(chunk):
            if self.done or self.error:
                self.text = self.text[: base + i]
                self.leftover = chunk[i:]
                return events
            self._char(base + i, c, events)
        self.leftover = ""
        return events

    def _char(self, i: int, c: str, events: list[Event]) -> None:
        if self._string_start is not None:
            self._string_char(i, c, events)
            return
        if self._scalar_start is not None:
            if c in SCALAR_CHARS:
                return
            self._end_scalar(i, events)
            if self.error:
                return
        if c in WHITESPACE:
            return
        frame = self.stack[-1] if self.stack else None
        expect = "value" if frame is None else frame.expect
        if c == ":" and expect == "colon":
            frame.expect = "value"
        elif c == "," and expect == "next":
            frame.expect = "key" if frame.is_object else "value"
            if not frame.is_object:
                frame.key += 1
        elif c in "}]" and expect in ("first", "next") and frame.is_object == (c == "}"):
            self.stack.pop()
            self._ended(frame.path, i + 1, events)
        elif c == '"' and frame is not None and frame.is_object and expect in ("first", "key"):
            self._string_start, self._is_key = i, True
        elif expect == "value" or (expect == "first" and not frame.is_object):
            self._start_value(i, c, events)
        else:
            self.error = True

    def _start_value(self, i: int, c: str, events: list[Event]) -> None:
        path = self._path()
        if c in "{[":
            events.append(Event("start", path, i))
            self.stack.append(_Frame(c == "{", path, None if c == "{" else 0))
        elif c == '"':
            events.append(Event("start", path, i))
            self._string_start, self._is_key = i, False
        elif c in "-0123456789tfn":
            events.append(Event("start", path, i))
            self._scalar_start = i
        else:
            self.error = True

    def _string_char(self, i: int, c: str, events: list[Event]) -> None:
        if self._escape:
            self._escape = False
        elif c == "\\":
            self._escape = True
        elif c == '"':
            start, self._string_start = self._string_start, None
            if self._is_key:
                try:
                    self.stack[-1].key = json.loads(self.text[start : i + 1])
                except ValueError:
                    self.error = True
                    return
                self.stack[-1].expect = "colon"
            else:
                self._ended(self._path(), i + 1, events)
        elif c < " ":
            self.error = True

    def _end_scalar(self, i: int, events: list[Event]) -> None:
        start, self._scalar_start = self._scalar_start, None
        try:
            json.loads(self.text[start:i])
        except ValueError:
            self.error = True
            return
        self._ended(self._path(), i, events)

    def _ended(self, path: Path, offset: int, events: list[Event]) -> None:
        events.append(Event("end", path, offset))
        if self.stack:
            self.stack[-1].expect = "next"
        else:
            self.done = True

    def _path(self) -> Path:
        """The path of a value starting now (in the innermost container, at its key)."""
        if not self.stack:
            return ()
        frame = self.stack[-1]
        return (*frame.path, frame.key)

    @property
    def is_open(self) -> bool:
        return bool(self.stack) or self._string_start is not None or self._scalar_start is not None
