"""Tool calls out of generated text, as it comes: a splitter per choice turns text deltas into
content pieces and call pieces (OpenAI's streamed `tool_calls`: each call has an index; its id
and name come in its first piece, its arguments in pieces after). The whole reply is parsed by
the same splitter (`parse_reply`), so a stream reassembles to exactly the non-streamed answer.

Formats: `generic` (the JSON object the server's prompt and grammar ask for:
`{"tool_call": {"name", "arguments"}}`, `{"tool_calls": [...]}` or `{"response": ...}`),
`hermes` (`<tool_call>{"name", "arguments"}</tool_call>`, Hermes and Qwen2.5 templates) and
`llama3_json` (`{"name", "parameters"}`, optionally after `<|python_tag|>`, Llama 3.1-3.3)."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field

from server.json_scanner import Event, JsonScanner, Path

ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(ID_ALPHABET) for _ in range(24))


@dataclass
class CallDelta:
    """A piece of call `index`: the first has `id` and `name` (arguments may start in it)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


Piece = str | CallDelta  # content text, or a piece of a call


@dataclass
class Call:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class Reply:
    content: str | None
    calls: list[Call] = field(default_factory=list)


class _Region:
    """The text of one JSON value, sent as it grows: raw, or decoded if it is a string."""

    def __init__(self, text_start: int, is_string: bool) -> None:
        self.is_string = is_string
        self.sent = text_start + 1 if is_string else text_start
        self.end: int | None = None

    def close(self, offset: int) -> None:
        self.end = offset - 1 if self.is_string else offset

    def take(self, text: str) -> str:
        """What is new since the last call (only whole escapes of a string)."""
        upto = len(text) if self.end is None else self.end
        raw = text[self.sent : upto]
        if not self.is_string:
            self.sent = upto
            return raw
        whole = _whole_escapes(raw)
        self.sent += whole
        try:
            return json.loads(f'"{raw[:whole]}"')
        except ValueError:
            return raw[:whole]


def _whole_escapes(raw: str) -> int:
    """The length of the longest prefix of a JSON string's inside that does not end within an
    escape (nor between the halves of a surrogate pair)."""
    i = 0
    while i < len(raw):
        if raw[i] != "\\":
            i += 1
        elif i + 1 >= len(raw):
            return i
        elif raw[i + 1] != "u":
            i += 2
        elif i + 6 > len(raw):
            return i
        elif 0xD800 <= _hex(raw[i + 2 : i + 6]) < 0xDC00:
            if i + 12 > len(raw):
                return i
            i += 12
        else:
            i += 6
    return i


def _hex(digits: str) -> int:
    try:
        return int(digits, 16)
    except ValueError:
        return 0


class _CallState:
    def __init__(self, index: int) -> None:
        self.index = index
        self.id = new_call_id()
        self.name: str | None = None
        self.name_start: int | None = None
        self.arguments: _Region | None = None
        self.announced = False

    def pieces(self, text: str) -> list[Piece]:
        if self.name is None:
            return []
        arguments = self.arguments.take(text) if self.arguments is not None else ""
        if not self.announced:
            self.announced = True
            return [CallDelta(self.index, self.id, self.name, arguments)]
        return [CallDelta(self.index, arguments=arguments)] if arguments else []


class _CallReader:
    """Reads calls (`{"name": ..., "arguments": {...}}` objects) out of scanner events, given
    where in the document each call object is."""

    def __init__(self, argument_keys: tuple[str, ...] = ("arguments",)) -> None:
        self.argument_keys = argument_keys
        self.calls: dict[int, _CallState] = {}

    def event(self, index: int, rest: Path, event: Event, text: str) -> None:
        call = self.calls.setdefault(index, _CallState(index))
        if rest == ("name",) and event.kind == "start" and text[event.offset] == '"':
            call.name_start = event.offset
        elif rest == ("name",) and event.kind == "end" and call.name_start is not None:
            call.name = json.loads(text[call.name_start : event.offset])
        elif len(rest) == 1 and rest[0] in self.argument_keys and event.kind == "start":
            call.arguments = _Region(event.offset, text[event.offset] == '"')
        elif len(rest) == 1 and rest[0] in self.argument_keys and call.arguments is not None:
            call.arguments.close(event.offset)

    def pieces(self, text: str) -> list[Piece]:
        return [piece for call in self.calls.values() for piece in call.pieces(text)]


class GenericSplitter:
    """The server's own JSON answer format (constrained by its grammar, so well formed)."""

    def __init__(self) -> None:
        self.scanner = JsonScanner()
        self.reader = _CallReader()
        self.response: _Region | None = None
        self.branch: str | None = None

    def feed(self, text: str) -> list[Piece]:
        for event in self.scanner.feed(text):
            self._event(event)
        pieces = self.reader.pieces(self.scanner.text)
        if self.response is not None:
            pieces = [self.response.take(self.scanner.text), *pieces]
        return [p for p in pieces if p]

    def _event(self, event: Event) -> None:
        path = event.path
        if len(path) == 1 and event.kind == "start":
            self.branch = path[0]
        if path == ("response",) and event.kind == "start":
            self.response = _Region(event.offset, self.scanner.text[event.offset] == '"')
        elif path == ("response",):
            self.response.close(event.offset)
        elif path[:1] == ("tool_call",) and len(path) > 1:
            self.reader.event(0, path[1:], event, self.scanner.text)
        elif path[:1] == ("tool_calls",) and len(path) > 2 and isinstance(path[1], int):
            self.reader.event(path[1], path[2:], event, self.scanner.text)

    def finish(self) -> list[Piece]:
        """Text that never became a call or a response (cut short before its branch)."""
        if self.branch is None and self.scanner.text.strip():
            return [self.scanner.text]
        return []

    @property
    def complete(self) -> bool:
        return self.scanner.done


class _FramedSplitter:
    """Calls as JSON objects between markers in free text (hermes, llama3_json): the text
    around them is content, whitespace next to a call or at the end is dropped."""

    argument_keys: tuple[str, ...] = ("arguments",)

    def __init__(self) -> None:
        self.pending = ""  # text not yet placed
        self.held = ""  # content whitespace, sent only if more content follows
        self.mode = "start"
        self.scanner: JsonScanner | None = None
        self.reader = _CallReader(self.argument_keys)
        self.num_calls = 0
        self.broken = False

    def feed(self, text: str) -> list[Piece]:
        self.pending += text
        pieces: list[Piece] = []
        while self.pending and self._step(pieces):
            pass
        return pieces

    def finish(self) -> list[Piece]:
        if self.mode in ("start", "text") and self.pending.strip():
            return self._content(self.pending, final=True)
        return []

    def _content(self, text: str, final: bool = False) -> list[Piece]:
        """Content, less whitespace at its end (kept until more content shows it is inside)."""
        text = self.held + text
        body = text.rstrip()
        self.held = "" if final else text[len(body) :]
        return [body] if body else []

    def _call_text(self, pieces: list[Piece]) -> bool:
        """Feed pending text to the current call's scanner; True when the call ended."""
        chunk, self.pending = self.pending, ""
        for event in self.scanner.feed(chunk):
            self.reader.event(self.num_calls, event.path, event, self.scanner.text)
        call = self.reader.calls.get(self.num_calls)
        if call is not None:
            pieces += call.pieces(self.scanner.text)
        self.pending = self.scanner.leftover
        if self.scanner.error:  # not a call after all: the rest is content
            self.broken = True
            self.mode, self.pending = "text", self.scanner.text + self.pending
            return True
        if not self.scanner.done:
            return False
        if call is not None and call.announced and call.arguments is None:
            pieces.append(CallDelta(call.index, arguments="{}"))  # a call without arguments
        self.num_calls += 1
        self.held = ""
        return True

    def _step(self, pieces: list[Piece]) -> bool:
        raise NotImplementedError


class HermesSplitter(_FramedSplitter):
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def _step(self, pieces: list[Piece]) -> bool:
        if self.mode in ("start", "text"):
            at = self.pending.find(self.OPEN)
            if at < 0:
                keep = _partial_suffix(self.pending, self.OPEN)
                cut = len(self.pending) - keep
                pieces += self._content(self.pending[:cut])
                self.pending = self.pending[cut:]
                return False
            before = self.pending[:at]
            if before.strip():
                pieces += self._content(before)
            self.held = ""
            self.pending = self.pending[at + len(self.OPEN) :]
            self.mode, self.scanner = "call", JsonScanner()
            return True
        if self.mode == "call":
            if self._call_text(pieces) and self.mode == "call":
                self.mode = "close"
            return bool(self.pending) and self.mode != "call"
        stripped = self.pending.lstrip()
        if stripped.startswith(self.CLOSE):
            stripped = stripped[len(self.CLOSE) :]
        elif self.CLOSE.startswith(stripped):
            return False  # wait for the rest of the closing tag
        self.pending, self.mode = stripped, "text"
        return True


class Llama3JsonSplitter(_FramedSplitter):
    TAG = "<|python_tag|>"
    argument_keys = ("parameters", "arguments")

    def _step(self, pieces: list[Piece]) -> bool:
        if self.mode == "start":
            stripped = self.pending.lstrip()
            if not stripped or (self.TAG.startswith(stripped) and stripped != self.TAG):
                return False
            if stripped.startswith(self.TAG):
                stripped = stripped[len(self.TAG) :].lstrip()
                if not stripped:
                    self.pending = ""
                    return False
            self.mode = "call" if stripped.startswith("{") else "text"
            self.pending = stripped if self.mode == "call" else self.pending
            self.scanner = JsonScanner()
            return True
        if self.mode == "call":
            if self._call_text(pieces) and self.mode == "call":
                self.mode = "between"
            return bool(self.pending) and self.mode != "call"
        if self.mode == "between":  # calls are separated by `;`
            stripped = self.pending.lstrip().lstrip(";").lstrip()
            if not stripped:
                self.pending = ""
                return False
            self.pending = stripped
            self.mode = "call" if stripped.startswith("{") else "text"
            self.scanner = JsonScanner()
            return True
        pieces += self._content(self.pending)
        self.pending = ""
        return False


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (it may be cut there)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


SPLITTERS = {
    "generic": GenericSplitter,
    "hermes": HermesSplitter,
    "llama3_json": Llama3JsonSplitter,
}


def make_splitter(fmt: str) -> GenericSplitter | _FramedSplitter:
    return SPLITTERS[fmt]()


def parse_reply(fmt: str, text: str) -> Reply:
    """The whole reply: its content (None if none) and calls. A generic reply cut short (no
    whole JSON) is returned as content, as it is."""
    splitter = make_splitter(fmt)
    pieces = [*splitter.feed(text), *splitter.finish()]
    reply = assemble(pieces)
    if (fmt == "generic" and not splitter.complete) or not all(map(_is_object, reply.calls)):
        return Reply(content=text)
    return reply


def _is_object(call: Call) -> bool:
    try:
        return isinstance(json.loads(call.arguments), dict)
    except ValueError:
        return False


def assemble(pieces: list[Piece]) -> Reply:
    content = "".join(p for p in pieces if isinstance(p, str))
    calls: dict[int, Call] = {}
    for piece in pieces:
        if isinstance(piece, CallDelta):
            if piece.index not in calls:
                calls[piece.index] = Call(piece.id, piece.name, "")
            calls[piece.index].arguments += piece.arguments
    return Reply(content or None, [calls[i] for i in sorted(calls)])


def merge(pieces: list[Piece]) -> tuple[str | None, list[CallDelta]]:
    """One delta's content and calls (pieces of one call joined, the first keeping its id)."""
    content = "".join(p for p in pieces if isinstance(p, str)) or None
    calls: dict[int, CallDelta] = {}
    for piece in pieces:
        if isinstance(piece, str):
            continue
        if piece.index in calls:
            calls[piece.index].arguments += piece.arguments
        else:
            calls[piece.index] = CallDelta(piece.index, piece.id, piece.name, piece.arguments)
    return content, list(calls.values())
