"""Parse Qwen3.5 chat output into reasoning, answer text and tool calls, on a whole text or as it streams.

What the model generates (reference/chat-tokenizer-processor.md §1.6, §4.3, §4.4):

- Thinking mode: the generation prompt ends with ``<think>\\n``, so the generated text starts *inside* the reasoning,
  closes it with ``</think>``, then (usually ``\\n\\n``) the answer.
- Non-thinking mode: the generation prompt already holds the empty block ``<think>\\n\\n</think>\\n\\n``; the generated
  text is the answer.
- Tool calls follow the answer text as XML blocks (Qwen3-Coder style)::

      <tool_call>
      <function=get_weather>
      <parameter=city>
      Paris
      </parameter>
      </function>
      </tool_call>

Rules of :func:`parse_response` (the streaming parser gives the same result, see :class:`StreamingResponseParser`):

1. The text is cut at the first ``<|im_end|>`` or ``<|endoftext|>``.
2. Thinking mode: a leading ``<think>`` (after leading whitespace) is dropped, in case the model repeats the one of
   the prompt. ``reasoning`` is the text before the first ``</think>``, stripped (``""`` when empty). Without
   ``</think>`` the whole text is reasoning, ``content`` is ``""`` and there are no tool calls. Only the text after
   ``</think>`` is searched for tool calls.
3. Non-thinking mode: ``reasoning`` is ``None``. If the text starts (after whitespace) with an *empty* think block
   (``<think>``, whitespace only, ``</think>``: the model repeating the block the prompt already holds), that block is
   dropped. Any other ``<think>``/``</think>`` is left verbatim in ``content``: the caller said there is no reasoning,
   so nothing is reclassified as reasoning and no text is lost (parse with ``thinking=True`` to split it).
4. ``content`` is the text before the first ``<tool_call>``, stripped. Text after the first ``<tool_call>`` is never
   content (text between or after the calls is dropped).
5. Tool calls come from each complete ``<tool_call>…</tool_call>`` block, in order (a block runs from a
   ``<tool_call>`` to the next ``</tool_call>``; the next block is searched after it). An unclosed block is ignored.
   A ``<tool_call>`` repeated inside a block restarts it (only the text after the last one counts). Inside a block:
   the function name is the text between the first ``<function=`` and the next ``>``, stripped (a block whose name is
   empty or holds ``<`` or a line break is ignored); its body runs to ``</function>`` (or the end of the block). Each
   ``<parameter=KEY>`` starts a value that ends at the first ``</parameter>`` or at the next ``<parameter=``,
   whichever comes first (or at the end of the body). Exactly one leading and one trailing ``\\n`` are removed from
   the value (no other whitespace). A repeated key keeps its last value.
6. Values are typed by the tool's JSON schema when ``tools`` declares the parameter (OpenAI-style
   ``{"type": "function", "function": {"name", "parameters"}}``, the flat ``{"name", "parameters"}`` form, or a Python
   function, which transformers' ``get_json_schema`` describes): ``null`` (any case, surrounding whitespace ignored)
   is ``None`` for every type; ``string`` keeps the text; ``integer`` gives an int (integral float text such as
   ``4.0`` or ``1e3`` included); ``number`` gives an int for integer text, else a finite float; ``boolean`` accepts
   ``true``/``false`` in any case; ``object``/``array`` parse as JSON, else as a Python literal (the chat template
   renders Python values such as ``True``/``None`` as is), and must give a dict/list. A value that does not convert
   stays a string. A list of types (``["integer", "null"]``) or ``anyOf``/``oneOf`` tries the types in order; a
   schema with no type but a string-only ``enum`` is a string. Without a schema for the parameter (undeclared tool,
   undeclared parameter, unknown type) the value is parsed as JSON when it parses (``NaN``/``Infinity`` excluded),
   and kept as a string otherwise.
7. Nothing raises, whatever the input: the parser returns what it can.
"""

from __future__ import annotations

import ast
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["StreamingResponseParser", "parse_response"]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER_OPEN = "<parameter="
PARAMETER_CLOSE = "</parameter>"
STOP_MARKERS = ("<|im_end|>", "<|endoftext|>")

_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_TYPE_ALIASES = {
    "str": "string",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "dict": "object",
    "list": "array",
}


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------------


def _coerce_text(text: Any) -> str:
    """Any input as a str: None is empty, bytes are decoded (invalid bytes replaced), anything else goes through str."""
    if isinstance(text, str):
        return text
    if text is None:
        return ""
    try:
        if isinstance(text, (bytes, bytearray, memoryview)):
            return bytes(text).decode("utf-8", errors="replace")
        out = str(text)
        return out if isinstance(out, str) else ""
    except Exception:
        return ""


def _as_flag(value: Any) -> bool:
    """``bool(value)``, False when even that fails (e.g. an array with several elements)."""
    try:
        return bool(value)
    except Exception:
        return False


def _first_stop(text: str) -> int:
    """Index of the first stop marker in ``text``, or -1."""
    found = [i for i in (text.find(m) for m in STOP_MARKERS) if i >= 0]
    return min(found) if found else -1


def _partial_marker_len(text: str, markers: Iterable[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``markers`` (text to hold back)."""
    best = 0
    for marker in markers:
        for k in range(min(len(text), len(marker) - 1), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best


def _strip_one_newline(value: str) -> str:
    """Remove exactly one leading and one trailing ``\\n`` (the template's framing of a parameter value)."""
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def _empty_think_prefix(text: str, final: bool) -> tuple[str, str]:
    """Non-thinking mode: does ``text`` start with an empty think block (whitespace, ``<think>``, whitespace,
    ``</think>``)? Returns ``("drop", rest_after_block)``, ``("keep", text)``, or ``("wait", text)`` when more text
    could still decide (only when ``final`` is false)."""
    head = text.lstrip()
    if head.startswith(THINK_OPEN):
        inner = head[len(THINK_OPEN) :].lstrip()
        if inner.startswith(THINK_CLOSE):
            return "drop", inner[len(THINK_CLOSE) :]
        if not final and THINK_CLOSE.startswith(inner):
            return "wait", text
        return "keep", text
    if not final and THINK_OPEN.startswith(head):
        return "wait", text
    return "keep", text


# ---------------------------------------------------------------------------------------------------------------------
# Tool schemas and value typing
# ---------------------------------------------------------------------------------------------------------------------


def _callable_schema(tool: Callable) -> Any:
    """The JSON schema transformers derives from a Python function (as ``apply_chat_template(tools=[fn])`` does)."""
    try:
        from transformers.utils import get_json_schema

        return get_json_schema(tool)
    except Exception:
        return None


class _ToolIndex(dict):
    """Declared function name -> its ``parameters.properties``; ``given``: whether tools were passed at all (then
    calls and parameters outside them are reported, not passed on as if declared)."""

    given = False


def _index_tools(tools: Any) -> _ToolIndex:
    """Map each declared function name to its ``parameters.properties`` mapping (empty for a tool without
    parameters). Malformed entries are skipped."""
    index = _ToolIndex()
    if tools is None:
        return index
    index.given = True
    if isinstance(tools, Mapping):
        tools = [tools]
    try:
        items = list(tools)
    except Exception:
        return index
    for tool in items:
        try:
            spec = tool
            if not isinstance(spec, Mapping) and callable(spec):
                spec = _callable_schema(spec)
            if not isinstance(spec, Mapping):
                continue
            function = spec.get("function")
            if isinstance(function, Mapping):
                spec = function
            name = spec.get("name")
            if not isinstance(name, str) or name in index:
                continue
            parameters = spec.get("parameters")
            properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
            index[name] = properties if isinstance(properties, Mapping) else {}
        except Exception:
            continue
    return index


def _schema_types(schema: Any) -> list[str] | None:
    """The JSON types a parameter schema allows, in order, lower-cased; None when the schema names no type."""
    if not isinstance(schema, Mapping):
        return None
    types: list[str] = []

    def add(spec: Any) -> None:
        if isinstance(spec, str):
            spec = [spec]
        if isinstance(spec, (list, tuple)):
            for item in spec:
                if isinstance(item, str):
                    name = item.strip().lower()
                    name = _TYPE_ALIASES.get(name, name)
                    if name not in types:
                        types.append(name)

    add(schema.get("type"))
    if not types:
        for key in ("anyOf", "oneOf"):
            subs = schema.get(key)
            if isinstance(subs, (list, tuple)):
                for sub in subs:
                    if isinstance(sub, Mapping):
                        add(sub.get("type"))
    if not types:
        enum = schema.get("enum")
        if isinstance(enum, (list, tuple)) and enum and all(isinstance(v, str) for v in enum):
            types.append("string")
    return types or None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"not JSON: {name}")


def _loads_json(text: str) -> Any:
    """Strict JSON (no NaN/Infinity); raises on failure."""
    return json.loads(text, parse_constant=_reject_constant)


def _jsonable(value: Any) -> Any:
    """A Python literal as JSON data (tuples become lists); raises ValueError for anything JSON cannot hold."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("non-finite float")
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError("non-string key")
            out[key] = _jsonable(item)
        return out
    raise ValueError(f"not JSON data: {type(value).__name__}")


def _to_integer(value: str) -> tuple[bool, Any]:
    text = value.strip()
    if _INT_RE.fullmatch(text):
        return True, int(text)
    if _FLOAT_RE.fullmatch(text):
        number = float(text)
        if math.isfinite(number) and number.is_integer():
            return True, int(number)
    return False, None


def _to_number(value: str) -> tuple[bool, Any]:
    text = value.strip()
    if _INT_RE.fullmatch(text):
        return True, int(text)
    if _FLOAT_RE.fullmatch(text):
        number = float(text)
        if math.isfinite(number):
            return True, number
    return False, None


def _to_boolean(value: str) -> tuple[bool, Any]:
    text = value.strip().lower()
    if text in ("true", "false"):
        return True, text == "true"
    return False, None


def _to_container(value: str, kind: type) -> tuple[bool, Any]:
    text = value.strip()
    try:
        parsed = _loads_json(text)
    except Exception:
        try:
            with warnings.catch_warnings():  # e.g. "invalid escape sequence" from the literal's parser
                warnings.simplefilter("ignore")
                parsed = _jsonable(ast.literal_eval(text))
        except Exception:
            return False, None
    if kind is list and isinstance(parsed, tuple):
        parsed = list(parsed)
    if isinstance(parsed, kind):
        return True, parsed
    return False, None


_CONVERTERS: dict[str, Callable[[str], tuple[bool, Any]]] = {
    "string": lambda value: (True, value),
    "integer": _to_integer,
    "number": _to_number,
    "boolean": _to_boolean,
    "object": lambda value: _to_container(value, dict),
    "array": lambda value: _to_container(value, list),
}


def _guess(value: str) -> Any:
    """No schema: the value as JSON when it is JSON, else the string."""
    try:
        return _loads_json(value)
    except Exception:
        return value


def _convert_value(value: str, schema: Any) -> Any:
    """Type one parameter value by its schema (see the module docstring, rule 6)."""
    try:
        if value.strip().lower() == "null":
            return None
        types = _schema_types(schema)
        if types is None:
            return _guess(value)
        known = False
        for name in types:
            converter = _CONVERTERS.get(name)
            if converter is None:
                continue
            known = True
            try:
                ok, out = converter(value)
            except Exception:
                continue
            if ok:
                return out
        return value if known else _guess(value)
    except Exception:
        return value


# ---------------------------------------------------------------------------------------------------------------------
# One <tool_call> block
# ---------------------------------------------------------------------------------------------------------------------


def _checked_against_tools(call: dict[str, Any], schemas: Mapping[str, Mapping]) -> dict[str, Any]:
    """With ``tools`` given, what they do not declare is reported, not passed on: a call to an undeclared function
    gets ``"undeclared_function": True``; parameters its tool does not declare move from ``arguments`` to
    ``undeclared_arguments``. (A model, or text injected into its context, can name anything.)"""
    if not getattr(schemas, "given", False):
        return call
    properties = schemas.get(call["name"])
    if properties is None:
        call["undeclared_function"] = True
        return call
    extra = {key: value for key, value in call["arguments"].items() if key not in properties}
    if extra:
        call["arguments"] = {key: value for key, value in call["arguments"].items() if key in properties}
        call["undeclared_arguments"] = extra
    return call


def _parse_tool_block(block: str, schemas: Mapping[str, Mapping]) -> dict[str, Any] | None:
    """Parse the text between ``<tool_call>`` and ``</tool_call>``; None when it holds no named function."""
    try:
        restart = block.rfind(TOOL_CALL_OPEN)  # an opening tag repeated inside the block restarts it
        if restart >= 0:
            block = block[restart + len(TOOL_CALL_OPEN) :]
        start = block.find(FUNCTION_OPEN)
        if start < 0:
            return None
        name_end = block.find(">", start + len(FUNCTION_OPEN))
        if name_end < 0:
            return None
        name = block[start + len(FUNCTION_OPEN) : name_end].strip()
        if not name or "<" in name or "\n" in name or "\r" in name:
            return None
        body_end = block.find(FUNCTION_CLOSE, name_end + 1)
        body = block[name_end + 1 : body_end if body_end >= 0 else len(block)]
        properties = schemas.get(name)
        if not isinstance(properties, Mapping):
            properties = {}

        arguments: dict[str, Any] = {}
        pos = 0
        while True:
            p = body.find(PARAMETER_OPEN, pos)
            if p < 0:
                break
            key_end = body.find(">", p + len(PARAMETER_OPEN))
            if key_end < 0:
                break
            key = body[p + len(PARAMETER_OPEN) : key_end].strip()
            value_start = key_end + 1
            close = body.find(PARAMETER_CLOSE, value_start)
            following = body.find(PARAMETER_OPEN, value_start)
            if close >= 0 and (following < 0 or close < following):
                value_end, pos = close, close + len(PARAMETER_CLOSE)
            elif following >= 0:
                value_end, pos = following, following
            else:
                value_end, pos = len(body), len(body)
            if key:
                value = _strip_one_newline(body[value_start:value_end])
                try:
                    schema = properties.get(key)
                except Exception:
                    schema = None
                arguments[key] = _convert_value(value, schema)
        return _checked_against_tools({"name": name, "arguments": arguments}, schemas)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Whole text
# ---------------------------------------------------------------------------------------------------------------------


def _parse_unguarded(text: Any, thinking: bool, schemas: Mapping[str, Mapping]) -> dict[str, Any]:
    text = _coerce_text(text)
    stop = _first_stop(text)
    if stop >= 0:
        text = text[:stop]

    reasoning: str | None = None
    if thinking:
        head = text.lstrip()
        if head.startswith(THINK_OPEN):
            text = head[len(THINK_OPEN) :]
        close = text.find(THINK_CLOSE)
        if close < 0:
            return {"reasoning": text.strip(), "content": "", "tool_calls": []}
        reasoning = text[:close].strip()
        rest = text[close + len(THINK_CLOSE) :]
    else:
        _, rest = _empty_think_prefix(text, final=True)

    open_at = rest.find(TOOL_CALL_OPEN)
    content = (rest if open_at < 0 else rest[:open_at]).strip()
    tool_calls: list[dict[str, Any]] = []
    while open_at >= 0:
        block_start = open_at + len(TOOL_CALL_OPEN)
        block_end = rest.find(TOOL_CALL_CLOSE, block_start)
        if block_end < 0:
            break
        call = _parse_tool_block(rest[block_start:block_end], schemas)
        if call is not None:
            tool_calls.append(call)
        open_at = rest.find(TOOL_CALL_OPEN, block_end + len(TOOL_CALL_CLOSE))
    return {"reasoning": reasoning, "content": content, "tool_calls": tool_calls}


def parse_response(text: str, thinking: bool, tools: list | None = None) -> dict[str, Any]:
    """Split a generated Qwen3.5 reply into ``{"reasoning", "content", "tool_calls"}``.

    Args:
        text: the generated text only (not the prompt), decoded with special tokens kept or skipped: ``<think>`` and
            ``</think>`` are ordinary tokens that survive ``skip_special_tokens=True``.
        thinking: whether the prompt was rendered in thinking mode (it then ends with ``<think>\\n``).
        tools: the tools given to the chat template, used to type argument values.

    Returns:
        ``reasoning``: str in thinking mode (``""`` if empty), None otherwise; ``content``: str; ``tool_calls``: list of
        ``{"name": str, "arguments": dict}``. See the module docstring for the exact rules. Never raises.
    """
    thinking = _as_flag(thinking)
    try:
        return _parse_unguarded(text, thinking, _index_tools(tools))
    except Exception:  # pragma: no cover - defensive: the parser above is written not to raise
        fallback = _coerce_text(text)
        if thinking:
            return {"reasoning": fallback.strip(), "content": "", "tool_calls": []}
        return {"reasoning": None, "content": fallback.strip(), "tool_calls": []}


# ---------------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------------


class _Trimmer:
    """Emit a text channel piece by piece so that the pieces join to the ``strip()`` of the whole: leading whitespace
    is dropped, and trailing whitespace is held until something other than whitespace follows it. Held whitespace is
    kept in pieces and joined once, when it is emitted: a long run of blank lines streams in linear time."""

    __slots__ = ("started", "pending")

    def __init__(self) -> None:
        self.started = False
        self.pending: list[str] = []

    def push(self, text: str) -> str:
        if not text:
            return ""
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        kept = text.rstrip()
        if not kept:  # whitespace only: hold it
            self.pending.append(text)
            return ""
        out = "".join(self.pending) + kept
        self.pending = [text[len(kept) :]] if len(kept) < len(text) else []
        return out


class _StopCutter:
    """Pass text on until the first stop marker; hold back a tail that may be the start of one."""

    __slots__ = ("held", "stopped")

    def __init__(self) -> None:
        self.held = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        text = self.held + delta
        stop = _first_stop(text)
        if stop >= 0:
            self.held = ""
            self.stopped = True
            return text[:stop]
        keep = _partial_marker_len(text, STOP_MARKERS)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class StreamingResponseParser:
    """Incremental :func:`parse_response`: feed decoded text as it is generated, get events back.

    ``feed(delta)`` and ``finish()`` return lists of events:

    - ``("reasoning", str)``: more reasoning text (thinking mode only);
    - ``("content", str)``: more answer text;
    - ``("tool_call", {"name": str, "arguments": dict})``: one complete call, emitted when its ``</tool_call>`` arrives.

    Equivalence with :func:`parse_response` on the concatenated deltas, exactly (not up to whitespace): joining the
    texts of all ``reasoning`` events gives ``result["reasoning"]`` (in thinking mode; in non-thinking mode there are
    no reasoning events and the result's reasoning is None), joining the ``content`` texts gives ``result["content"]``,
    and the ``tool_call`` payloads, in order, are ``result["tool_calls"]``. To make the joins equal the *stripped*
    texts, leading whitespace of each channel is never emitted and trailing whitespace is held until more
    non-whitespace text of that channel arrives (it is dropped if none does).

    Text that could still turn into a marker is held back (a delta ending in ``</thi`` is not emitted as reasoning, one
    ending in ``<tool_`` or ``<|im_`` is not emitted as content). A stop marker (``<|im_end|>``, ``<|endoftext|>``)
    ends the stream at once: the feed that completes it also returns what ``finish()`` would, and later feeds return
    nothing. ``finish()`` flushes the held text (an unfinished tool call is dropped); it may be called once, or not at
    all after a stop marker. Nothing raises: on an internal error the parser stops emitting and keeps it in
    ``error``.
    """

    def __init__(self, thinking: bool, tools: list | None = None) -> None:
        self.thinking = _as_flag(thinking)
        self._schemas = _index_tools(tools)
        self._cutter = _StopCutter()
        self._buffer = ""
        self._phase = "think_start" if self.thinking else "nothink_start"
        self._reasoning = _Trimmer()
        self._content = _Trimmer()
        self._block_parts: list[str] = []
        self.done = False
        self.error: Exception | None = None

    # public -----------------------------------------------------------------------------------------------------------

    def feed(self, delta: str) -> list[tuple[str, Any]]:
        """Consume the next piece of generated text; return the events it completes."""
        events: list[tuple[str, Any]] = []
        if self.done or self.error is not None:
            return events
        try:
            self._advance(self._cutter.push(_coerce_text(delta)), events, final=False)
            if self._cutter.stopped:
                self._advance("", events, final=True)
                self.done = True
        except Exception as exc:  # pragma: no cover - defensive
            self.error = exc
        return events

    def finish(self) -> list[tuple[str, Any]]:
        """End of the stream: return the events of the text still held back."""
        events: list[tuple[str, Any]] = []
        if self.done or self.error is not None:
            return events
        try:
            self._advance(self._cutter.flush(), events, final=True)
        except Exception as exc:  # pragma: no cover - defensive
            self.error = exc
        self.done = True
        return events

    # internals --------------------------------------------------------------------------------------------------------

    @staticmethod
    def _emit(events: list[tuple[str, Any]], kind: str, text: str) -> None:
        if not text:
            return
        if events and events[-1][0] == kind:
            events[-1] = (kind, events[-1][1] + text)
        else:
            events.append((kind, text))

    def _advance(self, text: str, events: list[tuple[str, Any]], final: bool) -> None:
        """Append ``text`` and move through the phases as far as the buffered text decides; ``final``: no more text."""
        self._buffer += text
        while True:
            buf = self._buffer
            phase = self._phase

            if phase == "think_start":  # a repeated leading <think> is dropped
                head = buf.lstrip()  # leading whitespace is never reasoning text: drop it here already
                if head.startswith(THINK_OPEN):
                    self._buffer = head[len(THINK_OPEN) :]
                elif not final and THINK_OPEN.startswith(head):
                    self._buffer = head
                    return
                self._phase = "reasoning"

            elif phase == "reasoning":
                close = buf.find(THINK_CLOSE)
                if close >= 0:
                    self._emit(events, "reasoning", self._reasoning.push(buf[:close]))
                    self._buffer = buf[close + len(THINK_CLOSE) :]
                    self._phase = "content"
                    continue
                keep = 0 if final else _partial_marker_len(buf, (THINK_CLOSE,))
                self._emit(events, "reasoning", self._reasoning.push(buf[: len(buf) - keep]))
                self._buffer = buf[len(buf) - keep :]
                return

            elif phase == "nothink_start":  # an empty <think></think> block is dropped
                verdict, rest = _empty_think_prefix(buf, final)
                if verdict == "wait":
                    if not buf.lstrip():  # leading whitespace is never content text
                        self._buffer = ""
                    return
                self._buffer = rest
                self._phase = "content"

            elif phase == "content":
                open_at = buf.find(TOOL_CALL_OPEN)
                if open_at >= 0:
                    self._emit(events, "content", self._content.push(buf[:open_at]))
                    self._buffer = buf[open_at + len(TOOL_CALL_OPEN) :]
                    self._phase = "tool_call"
                    continue
                keep = 0 if final else _partial_marker_len(buf, (TOOL_CALL_OPEN,))
                self._emit(events, "content", self._content.push(buf[: len(buf) - keep]))
                self._buffer = buf[len(buf) - keep :]
                return

            elif phase == "tool_call":  # inside a block: wait for </tool_call>
                # The searched part of the block is kept in a list (joined once, at the end) and only a tail that may
                # start the closing tag stays in the buffer: a long argument streams in linear time.
                close = buf.find(TOOL_CALL_CLOSE)
                if close >= 0:
                    block = "".join(self._block_parts) + buf[:close]
                    self._block_parts = []
                    call = _parse_tool_block(block, self._schemas)
                    if call is not None:
                        events.append(("tool_call", call))
                    self._buffer = buf[close + len(TOOL_CALL_CLOSE) :]
                    self._phase = "between_calls"
                    continue
                if final:
                    self._block_parts = []
                    self._buffer = ""
                    return
                keep = min(len(buf), len(TOOL_CALL_CLOSE) - 1)
                if len(buf) > keep:
                    self._block_parts.append(buf[: len(buf) - keep])
                    self._buffer = buf[len(buf) - keep :]
                return

            else:  # between_calls: text is dropped until the next <tool_call>
                open_at = buf.find(TOOL_CALL_OPEN)
                if open_at >= 0:
                    self._buffer = buf[open_at + len(TOOL_CALL_OPEN) :]
                    self._phase = "tool_call"
                    continue
                keep = 0 if final else _partial_marker_len(buf, (TOOL_CALL_OPEN,))
                self._buffer = buf[len(buf) - keep :]
                return
