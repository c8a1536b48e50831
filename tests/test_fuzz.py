"""Property-based tests (hypothesis) of the parser, the chat template's tool calls, the config and the processor.

Each property states the exact outcome for every input hypothesis draws: the streaming parser equals the whole-text
parser for any text cut anywhere; a tool call renders and parses back to the same arguments, or is refused because a
value holds a tool-call tag; a config is built or refused with a ValueError, and a built one runs to finite logits;
any image size and pixel type gives as many placeholder tokens as features. Runs are derandomised (the same examples
on every machine) so that CI is repeatable.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.exceptions import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

from transformers_qwen35 import Qwen3_5ForCausalLM, Qwen3_5Processor, Qwen3_5TextConfig, parse_response
from transformers_qwen35.chat.parsing import StreamingResponseParser
from transformers_qwen35.chat.template import get_chat_template
from transformers_qwen35.cli.demo import make_demo_tokenizer

FAST = settings(max_examples=150, deadline=None, derandomize=True)
SLOW = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# Text built from the pieces that steer the parser, plus arbitrary characters (surrogates excluded: not text).
MARKERS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<function=f>", "</function>", "<parameter=x>",
           "</parameter>", "<|im_end|>", "<|endoftext|>", "\n", " ", "<", ">", "</thi", "<tool_"]  # fmt: skip
TEXT = st.lists(st.one_of(st.sampled_from(MARKERS), st.text(st.characters(exclude_categories=["Cs"]), max_size=8)))
TAGS = ("</parameter>", "<parameter=", "</function>", "<tool_call>", "</tool_call>")


@FAST
@given(pieces=TEXT, cuts=st.lists(st.integers(min_value=0, max_value=200)), thinking=st.booleans())
def test_streaming_equals_parsing_the_whole_text_wherever_it_is_cut(pieces, cuts, thinking):
    text = "".join(pieces)
    expected = parse_response(text, thinking=thinking)
    assert set(expected) == {"reasoning", "content", "tool_calls"}
    assert (expected["reasoning"] is None) == (not thinking)
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    parser = StreamingResponseParser(thinking=thinking)
    events = []
    for start, end in zip(bounds, bounds[1:]):
        events += parser.feed(text[start:end])
    events += parser.finish()
    assert parser.error is None
    assert "".join(v for k, v in events if k == "content") == expected["content"]
    assert [v for k, v in events if k == "tool_call"] == expected["tool_calls"]
    if thinking:
        assert "".join(v for k, v in events if k == "reasoning") == expected["reasoning"]


NAMES = st.text(st.characters(categories=["Ll", "Lu", "Nd"], include_characters="_"), min_size=1, max_size=10)
VALUES = st.one_of(st.sampled_from(TAGS), st.text(st.characters(exclude_categories=["Cs"]), max_size=30))


@FAST
@given(arguments=st.dictionaries(NAMES, st.lists(VALUES, max_size=3).map("".join), max_size=4))
def test_a_tool_call_reads_back_as_written_or_is_refused(arguments):
    """String-typed parameters: what the template writes, parse_response returns, exactly; a value holding a
    tool-call tag is refused when rendering instead."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {name: {"type": "string"} for name in arguments}}}}  # fmt: skip
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": arguments}]},
    ]
    forging = any(tag in value for value in arguments.values() for tag in TAGS)
    try:
        rendered, _ = render_jinja_template(
            conversations=[messages], tools=[tool], chat_template=get_chat_template(False)
        )
    except TemplateError as error:
        assert forging and "tool-call tag" in str(error)
        return
    assert not forging
    reply = rendered[0].split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>")[0]
    assert parse_response(reply, thinking=False, tools=[tool])["tool_calls"] == [{"name": "f", "arguments": arguments}]


@SLOW
@given(
    hidden=st.sampled_from([0, -8, 16, 32]),
    heads=st.sampled_from([0, 2, 3, 4]),
    kv_heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([-4, 8, 16]),
    layers=st.integers(min_value=-1, max_value=3),
    vocab=st.sampled_from([0, 1, 64]),
    eps=st.sampled_from([-1e-6, 0.0, 1e-6, float("nan")]),
    theta=st.sampled_from([-1.0, 0.0, 10000.0]),
)
def test_a_config_is_refused_with_a_value_error_or_runs_to_finite_logits(
    hidden, heads, kv_heads, head_dim, layers, vocab, eps, theta
):
    kwargs = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=24, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, linear_conv_kernel_dim=2,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2,
        rms_norm_eps=eps, rope_parameters={"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.5},
        pad_token_id=None,
    )  # fmt: skip
    valid = (
        hidden > 0 and heads > 0 and head_dim > 0 and layers > 0 and vocab > 0 and heads % kv_heads == 0
        and eps >= 0 and theta > 0
    )  # fmt: skip
    try:
        config = Qwen3_5TextConfig(**kwargs)
    except ValueError:
        assert not valid
        return
    assert valid
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(config).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, vocab, (2, 5))).logits
    assert logits.shape == (2, 5, vocab) and bool(torch.isfinite(logits).all())


@pytest.fixture(scope="module")
def processor():
    return Qwen3_5Processor(tokenizer=make_demo_tokenizer())


@SLOW
@given(
    height=st.integers(min_value=1, max_value=120),
    width=st.integers(min_value=1, max_value=120),
    kind=st.sampled_from(["uint8", "uint16", "float01", "float255", "grey"]),
)
def test_any_image_size_and_pixel_type_gives_one_placeholder_per_feature(processor, height, width, kind):
    rng = np.random.default_rng(height * 1000 + width)
    shape = (height, width) if kind == "grey" else (height, width, 3)
    image = {
        "uint8": lambda: rng.integers(0, 256, shape, dtype=np.uint8),
        "grey": lambda: rng.integers(0, 256, shape, dtype=np.uint8),
        "uint16": lambda: rng.integers(0, 65536, shape, dtype=np.uint16),
        "float01": lambda: rng.random(shape, dtype=np.float32),
        "float255": lambda: rng.random(shape, dtype=np.float32) * 255,
    }[kind]()
    out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image], return_tensors="pt")
    grid = out["image_grid_thw"]
    assert grid.shape == (1, 3) and int(grid[0, 0]) == 1
    patches = int(grid.prod())
    assert out["pixel_values"].shape[0] == patches and bool(torch.isfinite(out["pixel_values"]).all())
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((out["input_ids"] == image_pad).sum()) == patches // 4
    assert int((out["mm_token_type_ids"] == 1).sum()) == patches // 4
