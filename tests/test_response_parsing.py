"""Reply parsing: reasoning / content / XML tool calls, whole text and streaming (response_parsing.py)."""

from __future__ import annotations

import json
import random

import pytest

from transformers_qwen35.chat.parsing import (
    StreamingResponseParser,
    _convert_value,
    _index_tools,
    _parse_tool_block,
    _parse_unguarded,
    parse_response,
)

# E6's tool, wrapped OpenAI-style (chat-tokenizer-processor.md §5 E6)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city"],
        },
    },
}

# one parameter per JSON type, in the flat {"name", "parameters"} form
TYPED_TOOL = {
    "name": "typed",
    "parameters": {
        "type": "object",
        "properties": {
            "s": {"type": "string"},
            "i": {"type": "integer"},
            "n": {"type": "number"},
            "b": {"type": "boolean"},
            "o": {"type": "object"},
            "a": {"type": "array"},
            "opt_i": {"type": ["integer", "null"]},
            "any_n": {"anyOf": [{"type": "number"}, {"type": "string"}]},
            "enum_s": {"enum": ["1", "2"]},
            "untyped": {"description": "no type"},
            "odd": {"type": "decimal"},
        },
    },
}

# what E7's assistant turn generates after the thinking prompt `<think>\n`
E7_REPLY = (
    "Need two calls.\n</think>\n\nI will look both up.\n\n"
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=unit>\ncelsius\n"
    "</parameter>\n</function>\n</tool_call>\n"
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nTokyo\n</parameter>\n<parameter=unit>\ncelsius\n"
    "</parameter>\n</function>\n</tool_call><|im_end|>\n"
)
# what E8's assistant turn generates after the non-thinking prompt `<think>\n\n</think>\n\n`
E8_REPLY = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=opts>\n"
    '{"detail": true}\n</parameter>\n<parameter=days>\n[1, 2]\n</parameter>\n</function>\n</tool_call><|im_end|>\n'
)


def call(name: str, **params: str) -> str:
    """A tool call rendered the way the chat template renders one (values inserted raw)."""
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def typed(**params: str) -> dict:
    """Arguments of one `typed` call parsed with TYPED_TOOL."""
    result = parse_response("</think>\n\n" + call("typed", **params), thinking=True, tools=[TYPED_TOOL])
    assert len(result["tool_calls"]) == 1
    return result["tool_calls"][0]["arguments"]


# ---------------------------------------------------------------------------------------------------------------------
# Whole text: reasoning and content
# ---------------------------------------------------------------------------------------------------------------------


def test_reference_e7_thinking_reply_with_two_calls():
    result = parse_response(E7_REPLY, thinking=True, tools=[WEATHER_TOOL])
    assert result == {
        "reasoning": "Need two calls.",
        "content": "I will look both up.",
        "tool_calls": [
            {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
            {"name": "get_weather", "arguments": {"city": "Tokyo", "unit": "celsius"}},
        ],
    }


def test_reference_e8_non_thinking_call_with_non_scalar_arguments_without_tools():
    result = parse_response(E8_REPLY, thinking=False)
    assert result == {
        "reasoning": None,
        "content": "",
        "tool_calls": [
            {"name": "get_weather", "arguments": {"city": "Paris", "opts": {"detail": True}, "days": [1, 2]}}
        ],
    }


def test_thinking_plain_answer():
    result = parse_response("Let me think.\nIt is 4.\n</think>\n\n2+2 = 4.", thinking=True)
    assert result == {"reasoning": "Let me think.\nIt is 4.", "content": "2+2 = 4.", "tool_calls": []}


def test_thinking_without_closing_tag_is_all_reasoning():
    text = "\nStill thinking... <tool_call>\n<function=f>\n</function>\n</tool_call> more\n"
    result = parse_response(text, thinking=True)
    assert result == {"reasoning": text.strip(), "content": "", "tool_calls": []}
    assert parse_response("", thinking=True) == {"reasoning": "", "content": "", "tool_calls": []}


def test_thinking_empty_reasoning_is_an_empty_string():
    assert parse_response("</think>\n\nHi.", thinking=True) == {"reasoning": "", "content": "Hi.", "tool_calls": []}
    assert parse_response("\n\n</think>\n\nHi.", thinking=True)["reasoning"] == ""


def test_thinking_repeated_leading_think_tag_is_dropped():
    assert parse_response("<think>\nx\n</think>\n\ny", thinking=True)["reasoning"] == "x"
    assert parse_response("  \n<think>x</think>y", thinking=True) == {
        "reasoning": "x",
        "content": "y",
        "tool_calls": [],
    }
    # only a leading one: a later <think> is reasoning text
    assert parse_response("a <think> b</think>c", thinking=True)["reasoning"] == "a <think> b"


def test_thinking_only_first_closing_tag_splits():
    result = parse_response("r1</think>c1</think>c2", thinking=True)
    assert result["reasoning"] == "r1" and result["content"] == "c1</think>c2"


def test_thinking_tool_calls_inside_reasoning_are_ignored():
    text = "I could " + call("f", a="1") + " or not.\n</think>\n\nAnswer." + call("g", b="2")
    result = parse_response(text, thinking=True)
    assert result["reasoning"] == "I could " + call("f", a="1") + " or not."
    assert result["content"] == "Answer."
    assert result["tool_calls"] == [{"name": "g", "arguments": {"b": 2}}]


def test_non_thinking_plain_answer():
    assert parse_response("\nHello!\n", thinking=False) == {"reasoning": None, "content": "Hello!", "tool_calls": []}


def test_non_thinking_drops_a_repeated_empty_think_block():
    for text in ("<think>\n\n</think>\n\nHello", "  <think></think>Hello", "<think>\n \t\n</think>Hello"):
        assert parse_response(text, thinking=False) == {"reasoning": None, "content": "Hello", "tool_calls": []}
    result = parse_response("<think>\n\n</think>\n\n" + call("f", a="x"), thinking=False)
    assert result == {"reasoning": None, "content": "", "tool_calls": [{"name": "f", "arguments": {"a": "x"}}]}


def test_non_thinking_keeps_other_think_tags_verbatim():
    # a non-empty block, a stray closing tag, an unclosed opening tag: all kept as content, reasoning stays None
    for text in ("<think>\nreal thoughts\n</think>\n\nHi", "stray</think>\n\nHi", "<think>\nHi", "Hi <think></think>"):
        assert parse_response(text, thinking=False) == {"reasoning": None, "content": text.strip(), "tool_calls": []}
    # only one empty block is dropped
    assert parse_response("<think></think><think></think>x", thinking=False)["content"] == "<think></think>x"


def test_content_is_text_before_first_call_and_text_after_calls_is_dropped():
    text = "Sure.\n\n" + call("f", a="1") + "\nbetween\n" + call("g", b="2") + "\nDone, anything else?"
    result = parse_response(text, thinking=False)
    assert result["content"] == "Sure."
    assert result["tool_calls"] == [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": 2}}]


def test_several_calls_keep_order_and_repeated_names():
    calls = [call("get_weather", city=c, days=str(d)) for c, d in (("Paris", 1), ("Tokyo", 2), ("Lima", 3))]
    result = parse_response("</think>\n\n" + "\n".join(calls), thinking=True, tools=[WEATHER_TOOL])
    assert result["tool_calls"] == [
        {"name": "get_weather", "arguments": {"city": "Paris", "days": 1}},
        {"name": "get_weather", "arguments": {"city": "Tokyo", "days": 2}},
        {"name": "get_weather", "arguments": {"city": "Lima", "days": 3}},
    ]
    assert result["content"] == ""


def test_call_without_parameters():
    result = parse_response("<tool_call>\n<function=now>\n</function>\n</tool_call>", thinking=False)
    assert result["tool_calls"] == [{"name": "now", "arguments": {}}]


def test_incomplete_calls_are_ignored():
    unclosed = "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n"
    assert parse_response("Hi " + unclosed, thinking=False) == {"reasoning": None, "content": "Hi", "tool_calls": []}
    result = parse_response(call("f", a="1") + "\n" + unclosed, thinking=False)
    assert result["tool_calls"] == [{"name": "f", "arguments": {"a": 1}}]
    # a closed block without a valid function name is skipped, the next one is kept
    for bad in (
        "<tool_call>\nno function\n</tool_call>",
        "<tool_call><function=>x</tool_call>",
        "<tool_call><function=f\n<parameter=a>\n1\n</parameter></tool_call>",
        "<tool_call><function=f",  # unclosed, then restarted by the next <tool_call>
        "<tool_call>\n",  # a repeated opening tag
    ):
        result = parse_response(bad + call("g", b="2"), thinking=False)
        assert result["tool_calls"] == [{"name": "g", "arguments": {"b": 2}}], bad


def test_lenient_inside_a_closed_block():
    # </parameter> or </function> missing: a value ends at the next <parameter=, the body at </tool_call>
    block = "<tool_call>\n<function=f>\n<parameter=a>\n1\n<parameter=b>\nx y\n</tool_call>"
    assert parse_response(block, thinking=False)["tool_calls"] == [{"name": "f", "arguments": {"a": 1, "b": "x y"}}]
    # name and keys are stripped, a repeated key keeps its last value
    block = "<tool_call><function= f >\n<parameter= a >\n1\n</parameter><parameter=a>\n2\n</parameter></function></tool_call>"
    assert parse_response(block, thinking=False)["tool_calls"] == [{"name": "f", "arguments": {"a": 2}}]


def test_value_loses_exactly_one_newline_each_side():
    assert typed(s="\nx\n") == {"s": "\nx\n"}  # rendered as "\n\nx\n\n" between the tags
    assert typed(s="  x  ") == {"s": "  x  "}
    assert typed(s="") == {"s": ""}
    assert typed(s="\n") == {"s": "\n"}
    assert typed(s="line 1\nline 2") == {"s": "line 1\nline 2"}
    # without the template's framing newlines, nothing is removed
    raw = "<tool_call><function=typed><parameter=s>x\n</parameter></function></tool_call>"
    assert parse_response(raw, thinking=False, tools=[TYPED_TOOL])["tool_calls"][0]["arguments"] == {"s": "x"}
    raw = "<tool_call><function=typed><parameter=s> x </parameter></function></tool_call>"
    assert parse_response(raw, thinking=False, tools=[TYPED_TOOL])["tool_calls"][0]["arguments"] == {"s": " x "}
    # the rule acts on the raw value, before typing
    assert _parse_tool_block("<function=f><parameter=a>\n\nx\n\n</parameter></function>", {}) == {
        "name": "f",
        "arguments": {"a": "\nx\n"},
    }


@pytest.mark.parametrize("stop", ["<|im_end|>", "<|endoftext|>"])
def test_cut_at_first_stop_marker(stop):
    assert parse_response(f"Hello{stop}\n<tool_call>x</tool_call> junk", thinking=False)["content"] == "Hello"
    # a stop marker inside a call leaves it incomplete
    result = parse_response("Hi\n" + call("f", a="1")[:-5] + stop + "call>", thinking=False)
    assert result == {"reasoning": None, "content": "Hi", "tool_calls": []}
    # a stop marker before </think> ends the reasoning
    assert parse_response(f"r{stop}</think>c", thinking=True) == {"reasoning": "r", "content": "", "tool_calls": []}
    # the first of the two markers wins
    assert parse_response("a<|endoftext|>b<|im_end|>c", thinking=False)["content"] == "a"


# ---------------------------------------------------------------------------------------------------------------------
# Typing of values
# ---------------------------------------------------------------------------------------------------------------------


def test_schema_string():
    assert typed(s="00123") == {"s": "00123"}
    assert typed(s="true") == {"s": "true"}
    assert typed(s='{"a": 1}') == {"s": '{"a": 1}'}


def test_schema_integer():
    assert typed(i="42") == {"i": 42}
    assert typed(i=" -7 ") == {"i": -7}
    assert typed(i="4.0") == {"i": 4}
    assert typed(i="1e3") == {"i": 1000}
    for bad in ("4.5", "abc", "1_000", "", "inf", "0x10"):
        assert typed(i=bad) == {"i": bad}, bad


def test_schema_number():
    assert typed(n="3") == {"n": 3} and isinstance(typed(n="3")["n"], int)
    assert typed(n="-2.5") == {"n": -2.5}
    assert typed(n="1e3") == {"n": 1000.0} and isinstance(typed(n="1e3")["n"], float)
    assert typed(n=".5") == {"n": 0.5}
    for bad in ("nan", "Infinity", "1e999", "three", "1,5"):
        assert typed(n=bad) == {"n": bad}, bad


def test_schema_boolean():
    assert typed(b="true") == {"b": True}
    assert typed(b="FALSE") == {"b": False}
    assert typed(b="True") == {"b": True}  # the template renders a Python bool as True/False
    for bad in ("yes", "1", "t"):
        assert typed(b=bad) == {"b": bad}, bad


def test_schema_object_and_array():
    assert typed(o='{"detail": true, "n": [1, 2]}') == {"o": {"detail": True, "n": [1, 2]}}
    assert typed(o="{'detail': True, 'x': None}") == {"o": {"detail": True, "x": None}}  # Python literal fallback
    assert typed(a="[1, 2]") == {"a": [1, 2]}
    assert typed(a="(1, 'x')") == {"a": [1, "x"]}
    assert typed(a="[]") == {"a": []}
    for bad in ("[1, 2]", "not json", '{"a": 1', "{1: 2}", "{'a': {1, 2}}", "{'a': float('nan')}"):
        assert typed(o=bad) == {"o": bad}, bad
    for bad in ('{"a": 1}', "[1,", "3", '"x"'):
        assert typed(a=bad) == {"a": bad}, bad


def test_schema_null_for_every_type():
    for key in ("s", "i", "n", "b", "o", "a", "opt_i", "any_n", "enum_s", "untyped", "odd"):
        for null in ("null", "NULL", " Null "):
            assert typed(**{key: null}) == {key: None}, (key, null)
    assert typed(s="nullable") == {"s": "nullable"}


def test_schema_type_lists_anyof_enum_and_unknown_types():
    assert typed(opt_i="5") == {"opt_i": 5}
    assert typed(opt_i="x") == {"opt_i": "x"}
    assert typed(any_n="2.5") == {"any_n": 2.5}
    assert typed(any_n="abc") == {"any_n": "abc"}
    assert typed(enum_s="1") == {"enum_s": "1"}  # a string enum types the value as a string
    assert typed(untyped="1") == {"untyped": 1}  # no type: JSON guess
    assert typed(odd="[1]") == {"odd": [1]}  # unknown type: JSON guess


def test_with_tools_what_they_do_not_declare_is_reported_not_passed_on():
    """A parameter the tool does not declare leaves `arguments` for `undeclared_arguments` (JSON-guessed); a function
    not among the tools is marked. Without tools nothing is judged."""
    text = "</think>\n\n" + call("typed", s="x", undeclared="2")
    (typed_call,) = parse_response(text, thinking=True, tools=[TYPED_TOOL])["tool_calls"]
    assert typed_call == {"name": "typed", "arguments": {"s": "x"}, "undeclared_arguments": {"undeclared": 2}}
    (other,) = parse_response("</think>\n\n" + call("rm_rf", path="/"), thinking=True, tools=[TYPED_TOOL])["tool_calls"]
    assert other == {"name": "rm_rf", "arguments": {"path": "/"}, "undeclared_function": True}
    no_params = {"type": "function", "function": {"name": "now", "description": "the time"}}
    (now,) = parse_response(call("now", tz="UTC"), thinking=False, tools=[no_params])["tool_calls"]
    assert now == {"name": "now", "arguments": {}, "undeclared_arguments": {"tz": "UTC"}}
    (free,) = parse_response(call("rm_rf", path="/"), thinking=False)["tool_calls"]
    assert free == {"name": "rm_rf", "arguments": {"path": "/"}}
    # the streaming parser reports the same
    parser = StreamingResponseParser(True, [TYPED_TOOL])
    events = parser.feed(text) + parser.finish()
    assert [payload for kind, payload in events if kind == "tool_call"] == [typed_call]


def test_no_schema_json_guessing():
    cases = {
        "3": 3,
        "3.5": 3.5,
        "true": True,
        "null": None,
        "Null": None,
        "Paris": "Paris",
        '"quoted"': "quoted",
        "[1, 2]": [1, 2],
        '{"a": {"b": null}}': {"a": {"b": None}},
        "True": "True",  # not JSON, and no Python literals without a schema
        "NaN": "NaN",
        "{'a': 1}": "{'a': 1}",
        "1 2": "1 2",
        "007": "007",  # leading zeros are not JSON
    }
    for raw, expected in cases.items():
        result = parse_response(call("unknown_tool", v=raw), thinking=False, tools=[WEATHER_TOOL])
        assert result["tool_calls"][0]["arguments"] == {"v": expected}, raw


def test_tool_forms_and_callables():
    flat = {"name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
    text = call("get_weather", city="42", days="3")
    expected = [{"name": "get_weather", "arguments": {"city": "42", "days": 3}}]
    assert parse_response(text, thinking=False, tools=[WEATHER_TOOL])["tool_calls"] == expected
    assert parse_response(text, thinking=False, tools=[flat])["tool_calls"] == expected
    assert parse_response(text, thinking=False, tools=WEATHER_TOOL)["tool_calls"] == expected  # a single mapping
    assert parse_response(text, thinking=False)["tool_calls"] == [
        {"name": "get_weather", "arguments": {"city": 42, "days": 3}}
    ]

    def get_weather(city: str, days: int):
        """Get the weather.

        Args:
            city: The city.
            days: How many days.
        """

    assert parse_response(text, thinking=False, tools=[get_weather])["tool_calls"] == expected


def test_round_trip_of_template_rendering():
    """Arguments rendered as the template renders them (§4.4: mappings and lists as JSON, the rest through `string`)
    come back equal when the schema types them."""
    tool = {
        "name": "t",
        "parameters": {
            "properties": {
                "s": {"type": "string"},
                "i": {"type": "integer"},
                "n": {"type": "number"},
                "b": {"type": "boolean"},
                "o": {"type": "object"},
                "a": {"type": "array"},
            }
        },
    }
    arguments = {
        "s": "multi\nline <b>text</b> = 1",
        "i": -12,
        "n": 0.25,
        "b": False,
        "o": {"k": [1, {"z": None}], "ü": "é"},
        "a": ["x", 2, True],
    }
    rendered = {
        k: json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v) for k, v in arguments.items()
    }
    result = parse_response("</think>\n\n" + call("t", **rendered) + "<|im_end|>", thinking=True, tools=[tool])
    assert result["tool_calls"] == [{"name": "t", "arguments": arguments}]


def test_convert_value_never_raises_and_keeps_strings():
    weird_schemas = [None, 3, "string", {"type": 3}, {"type": [None, "integer"]}, {"anyOf": "x"}, {"enum": [1, "a"]}]
    for schema in weird_schemas:
        for value in ("1", "x", "[", "null", "\x00", "9" * 5000):
            _convert_value(value, schema)
    deep = "[" * 100000 + "]" * 100000
    assert _convert_value(deep, {"type": "array"}) == deep
    assert _convert_value(deep, None) == deep
    big = "9" * 5000
    try:
        expected = int(big)
    except ValueError:  # Python's limit on int/str conversion: the value stays a string
        expected = big
    assert _convert_value(big, {"type": "integer"}) == expected


@pytest.mark.parametrize(
    "text",
    [None, b"</think>\n\nbytes \xff", 12345, bytearray(b"x"), ["a"], object(), "\ud800</think>\x00<tool_call>"],
)
@pytest.mark.parametrize("thinking", [True, False, None, "yes"])
def test_odd_inputs_do_not_raise(text, thinking):
    result = parse_response(text, thinking)
    assert set(result) == {"reasoning", "content", "tool_calls"}
    assert isinstance(result["content"], str) and isinstance(result["tool_calls"], list)
    parser = StreamingResponseParser(thinking)
    parser.feed(text)
    parser.finish()
    assert parser.error is None


def test_odd_tools_do_not_raise():
    class BadStr:
        def __str__(self):
            raise RuntimeError("no")

    class BadMapping(dict):
        def get(self, *args):
            raise RuntimeError("no")

    def undocumented(x):
        return x

    odd_tools = [
        5,
        "abc",
        [None, 1, "x"],
        [{"function": None}],
        [{"function": {"name": "f", "parameters": None}}],
        [{"name": "f", "parameters": {"properties": 3}}],
        [{"name": 1, "parameters": {"properties": {}}}],
        (t for t in [WEATHER_TOOL]),
        [BadMapping(name="f")],
        [undocumented],
        {"name": "f", "parameters": {"properties": {"a": "notaschema"}}},
    ]
    text = "r</think>c" + call("f", a="1") + call("get_weather", city="x")
    for tools in odd_tools:
        result = parse_response(text, True, tools)
        assert [c["name"] for c in result["tool_calls"]] == ["f", "get_weather"]
        parser = StreamingResponseParser(True, tools)
        parser.feed(text)
        parser.finish()
        assert parser.error is None
    assert parse_response(BadStr(), False) == {"reasoning": None, "content": "", "tool_calls": []}


# ---------------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------------


def run_stream(chunks, thinking, tools=None) -> tuple[dict, list]:
    """Feed the chunks, finish, check the events' shapes; return the joined result (as parse_response's) and events."""
    parser = StreamingResponseParser(thinking, tools)
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.finish()
    assert parser.error is None
    for kind, payload in events:
        assert kind in ("reasoning", "content", "tool_call")
        if kind == "tool_call":
            assert set(payload) - {"undeclared_function", "undeclared_arguments"} == {"name", "arguments"}
        else:
            assert isinstance(payload, str) and payload
    if not thinking:
        assert all(kind != "reasoning" for kind, _ in events)
    joined = {
        "reasoning": "".join(p for k, p in events if k == "reasoning") if thinking else None,
        "content": "".join(p for k, p in events if k == "content"),
        "tool_calls": [p for k, p in events if k == "tool_call"],
    }
    return joined, events


def random_chunks(text: str, rng: random.Random, max_len: int = 8) -> list[str]:
    chunks, pos = [], 0
    while pos < len(text):
        size = rng.randint(0, max_len)  # empty deltas too
        chunks.append(text[pos : pos + size])
        pos += size
    return chunks


STREAM_TEXTS = [
    E7_REPLY,
    E8_REPLY,
    "",
    "   ",
    "Let me think.\nIt is 4.\n</think>\n\n2+2 = 4.",
    "\n\n</think>\n\nHi.",
    "<think>\nx\n</think>\n\ny",
    "  \n<think>x</think>y",
    "<thinkx</think>y",
    "<think",
    "</think",
    "still thinking <tool_call>\n<function=f>\n</function>\n</tool_call>",
    "r1</think>c1</think>c2",
    "<think>\n\n</think>\n\nHello",
    "<think>\n \t\n</think>Hello",
    "<think>\nreal thoughts\n</think>\n\nHi",
    "stray</think>\n\nHi",
    "<think>\n\n</thin",
    "<think>\n\n</think>\n\n" + call("f", a="x"),
    "Sure.\n\n" + call("f", a="1") + "\nbetween\n" + call("g", b="2") + "\nDone.",
    "Hi <tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n",
    "Hi <tool_",
    "Hi <tool_call",
    "Hi </tool_call> x <tool_call><function=f></tool_call>",
    "<tool_call>\n<function=f>\n<parameter=a>\n1\n<parameter=b>\nx y\n</tool_call>",
    "Hello<|im_end|>\n<tool_call>x</tool_call> junk",
    "Hello<|im_en",
    "Hello<|im_end",
    "Hello <|endoftext|> tail",
    "a<|endoftext|>b<|im_end|>c",
    "r<|im_end|></think>c",
    "Hi\n" + call("f", a="1")[:-5] + "<|im_end|>call>",
    "<<<</</thi</think><</tool_call<tool_call><tool_call><function=f><parameter=a>\n<|im\n</parameter></tool_call>",
    "  spaced   reasoning \t </think>  \n spaced  content \n\n " + call("f", s="\n\nx\n\n") + "  ",
    "</think>" + call("get_weather", city="007", days="3", unit="null"),
    "\u00e9t\u00e9 \U0001f600 </think> r\u00e9ponse \u2003",
]


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("index", range(len(STREAM_TEXTS)))
def test_stream_equals_whole_text_at_every_split(index, thinking):
    text = STREAM_TEXTS[index]
    tools = [WEATHER_TOOL, TYPED_TOOL]
    expected = parse_response(text, thinking, tools)
    assert run_stream([text], thinking, tools)[0] == expected
    assert run_stream(list(text), thinking, tools)[0] == expected  # one character at a time
    for cut in range(len(text) + 1):  # two deltas, split at every boundary
        assert run_stream([text[:cut], text[cut:]], thinking, tools)[0] == expected, cut
    rng = random.Random(index)
    for _ in range(20):
        assert run_stream(random_chunks(text, rng), thinking, tools)[0] == expected


def test_stream_holds_back_partial_markers_only():
    parser = StreamingResponseParser(thinking=True)
    assert parser.feed("abc</thi") == [("reasoning", "abc")]
    assert parser.feed("nk>\n\nHello <tool_") == [("content", "Hello")]  # "</thi" and "<tool_" never emitted
    assert parser.feed("x") == [("content", " <tool_x")]  # not a marker after all: released with its space
    assert parser.feed(" <|im_") == []
    assert parser.feed("end|>ignored") == []
    assert parser.feed("more") == [] and parser.finish() == []

    parser = StreamingResponseParser(thinking=True)
    assert parser.feed("<thi") == []  # may be a repeated <think>
    assert parser.feed("nk>\nplan") == [("reasoning", "plan")]

    parser = StreamingResponseParser(thinking=False)
    assert parser.feed("<think>\n\n</th") == []  # may be an empty block to drop
    assert parser.feed("ink>\n\nOK") == [("content", "OK")]

    parser = StreamingResponseParser(thinking=False)
    assert parser.feed("<think>\nx") == [("content", "<think>\nx")]  # not empty: kept verbatim


def test_stream_emits_each_call_when_it_closes():
    parser = StreamingResponseParser(thinking=True, tools=[WEATHER_TOOL])
    first = call("get_weather", city="Paris", days="2")
    assert parser.feed("Plan.</think>\n\nOn it.\n\n" + first[:-1]) == [("reasoning", "Plan."), ("content", "On it.")]
    assert parser.feed(first[-1]) == [("tool_call", {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}})]
    second = call("get_weather", city="Tokyo")
    assert parser.feed("\n" + second[:20]) == []
    assert parser.feed(second[20:] + "<|im_end|>") == [
        ("tool_call", {"name": "get_weather", "arguments": {"city": "Tokyo"}})
    ]
    assert parser.finish() == []


def test_stream_stop_marker_flushes_in_the_same_feed():
    parser = StreamingResponseParser(thinking=True)
    assert parser.feed("r</think>answer  ") == [("reasoning", "r"), ("content", "answer")]
    assert parser.feed("<|endoftext|>") == []
    assert parser.done

    parser = StreamingResponseParser(thinking=True)
    assert parser.feed("reasoning<|im_") == [("reasoning", "reasoning")]
    assert parser.finish() == [("reasoning", "<|im_")]  # the stream ended: not a marker


# ---------------------------------------------------------------------------------------------------------------------
# Property-style: arbitrary text never raises, and streaming always equals the whole-text parse
# (hypothesis is not installed in this environment: a seeded generator over a marker-rich alphabet)
# ---------------------------------------------------------------------------------------------------------------------

ALPHABET = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<function=",
    "</function>",
    "<parameter=",
    "</parameter>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_",
    "</thi",
    "<tool_",
    "</",
    ">",
    "<",
    "=",
    "\n",
    "\n\n",
    " ",
    "\t",
    "f",
    "typed",
    "get_weather",
    "s",
    "i",
    "n",
    "b",
    "o",
    "a",
    "city",
    "x",
    "Z",
    "0",
    "7",
    "-",
    ".",
    "e",
    "1.5",
    "null",
    "true",
    "False",
    "None",
    '"',
    "'",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\\",
    "\u00e9",
    "\U0001f600",
    "\x00",
]


def random_text(rng: random.Random) -> str:
    if rng.random() < 0.3:  # mostly well-formed replies with noise inserted
        parts = []
        if rng.random() < 0.7:
            parts.append(rng.choice(["", "<think>\n", "  "]) + "reason " + rng.choice(["", "</think>", "</think>\n\n"]))
        parts.append(rng.choice(["", "answer", " text \n"]))
        for _ in range(rng.randint(0, 3)):
            keys = rng.sample(["s", "i", "n", "b", "o", "a", "city", "days"], rng.randint(0, 3))
            values = [rng.choice(["1", "2.5", "null", "[1]", '{"k": 1}', "True", "x", "\n\nx\n\n", ""]) for _ in keys]
            parts.append(call(rng.choice(["typed", "get_weather", "f"]), **dict(zip(keys, values))))
        text = "\n".join(parts)
        for _ in range(rng.randint(0, 3)):
            pos = rng.randint(0, len(text))
            text = text[:pos] + rng.choice(ALPHABET) + text[pos:]
        return text
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))


@pytest.mark.parametrize("seed", range(4))
def test_random_text_never_raises_and_streams_equal(seed):
    rng = random.Random(1000 + seed)
    tools = [WEATHER_TOOL, TYPED_TOOL]
    for n in range(1000):
        text = random_text(rng)
        thinking = rng.random() < 0.5
        use_tools = tools if rng.random() < 0.7 else None
        unguarded = _parse_unguarded(text, thinking, _index_tools(use_tools))
        expected = parse_response(text, thinking, use_tools)
        assert unguarded == expected
        assert isinstance(expected["content"], str)
        assert (expected["reasoning"] is None) != thinking
        for c in expected["tool_calls"]:
            assert isinstance(c["name"], str) and c["name"] and isinstance(c["arguments"], dict)
        chunks = list(text) if n % 4 == 0 else random_chunks(text, rng, max_len=rng.choice([1, 3, 12]))
        assert run_stream(chunks, thinking, use_tools)[0] == expected, (text, chunks)


def test_random_blocks_and_values_never_raise():
    rng = random.Random(7)
    types = ("string", "integer", "number", "boolean", "object", "array", ["integer", "null"], "x")
    schemas = [None] + [{"type": t} for t in types]
    for _ in range(3000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 25)))
        block = _parse_tool_block(text, {"f": {"a": {"type": "integer"}}})
        assert block is None or (isinstance(block["name"], str) and isinstance(block["arguments"], dict))
        for schema in schemas:
            _convert_value(text, schema)


@pytest.mark.parametrize(
    "thinking, text",
    [
        (False, "answer" + "\n" * 20000 + "end"),
        (True, "r" + "\n \n" * 7000 + "</think>" + " " * 9000 + "done\n\n"),
        (False, "a" + " " * 20000),
        (False, "<" * 20000),
    ],
    ids=["blank-lines", "reasoning-blank-lines", "trailing-spaces", "angles"],
)
def test_long_held_back_runs_stream_to_the_whole_texts_result(thinking, text):
    """The runs of whitespace the channels hold back (the inputs that once streamed in quadratic time; timings are in
    benchmarks/parser_time.py): the joined events equal parse_response of the whole text, exactly."""
    parser = StreamingResponseParser(thinking=thinking)
    events = []
    for start in range(0, len(text), 3):
        events += parser.feed(text[start : start + 3])
    events += parser.finish()
    expected = parse_response(text, thinking=thinking)
    assert "".join(value for kind, value in events if kind == "content") == expected["content"]
    if thinking:
        assert "".join(value for kind, value in events if kind == "reasoning") == expected["reasoning"]
