"""The chat template marks what the assistant says: ``return_assistant_tokens_mask`` equals our training labels.

Two independent routes to the same tokens: transformers' ``apply_chat_template(..., return_assistant_tokens_mask=True)``
reads the template's ``{% generation %}`` blocks; ``training_data.tokenize_chat`` finds the assistant spans in the
rendered text. Every fixture conversation with an assistant turn (both template variants), and the example training
data, must give identical masks with the real Qwen3.5 tokenizer. TRL's check that a template is fit for
``assistant_only_loss`` must accept the template as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from real_tokenizer import build_qwen35_tokenizer
from test_chat_template import CASES, FIXTURES, MISSING, template_for
from transformers import AutoTokenizer

from transformers_qwen35.chat.template import get_chat_template
from transformers_qwen35.training.data import IGNORE_INDEX, tokenize_chat

EXAMPLE_DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "chat.jsonl"


def has_media(messages) -> bool:
    return any(isinstance(message.get("content"), list) and any(
        isinstance(part, dict) and part.get("type") in ("image", "video", "image_url") for part in message["content"]
    ) for message in messages)  # fmt: skip


def training_cases() -> list:
    if not FIXTURES.is_file():
        return [pytest.param(None, id="fixtures-missing", marks=pytest.mark.skip(reason=MISSING))]
    chosen = [
        case
        for case in CASES
        if case["expected_error"] is None
        and any(message["role"] == "assistant" for message in case["messages"])
        and not has_media(case["messages"])
    ]
    return [pytest.param(case, id=case["id"]) for case in chosen]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(str(build_qwen35_tokenizer(tmp_path_factory.mktemp("tokenizer"))))


def assert_masks_agree(tokenizer, messages, tools=None, **kwargs):
    encoded = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
    )
    sample = tokenize_chat(tokenizer, messages, tools=tools, chat_template_kwargs=kwargs)
    assert encoded["input_ids"] == sample["input_ids"]
    labelled = [int(label != IGNORE_INDEX) for label in sample["labels"]]
    assert encoded["assistant_masks"] == labelled
    assert sum(labelled) > 0
    return encoded


@pytest.mark.parametrize("case", training_cases())
def test_assistant_mask_equals_training_labels_on_every_fixture(tokenizer, case):
    kwargs = {key: value for key, value in case["kwargs"].items() if key != "add_generation_prompt"}
    tokenizer.chat_template = template_for(case)
    encoded = assert_masks_agree(tokenizer, case["messages"], tools=case["tools"], **kwargs)
    # the markers leave the text alone: without a generation prompt it is the fixture's render up to that prompt
    text = tokenizer.decode(encoded["input_ids"])
    expected = case["expected"]
    if case["kwargs"]["add_generation_prompt"]:
        expected = expected[: expected.rindex("<|im_start|>assistant\n")]
    assert text == expected


@pytest.mark.parametrize("thinking_default", [False, True])
def test_assistant_mask_on_the_example_training_data(tokenizer, thinking_default):
    tokenizer.chat_template = get_chat_template(thinking_default)
    rows = [json.loads(line) for line in EXAMPLE_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    checked = 0
    for row in rows:
        if any(message["role"] == "assistant" for message in row["messages"]) and not has_media(row["messages"]):
            assert_masks_agree(tokenizer, row["messages"], tools=row.get("tools"))
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize("thinking_default", [False, True])
def test_trl_accepts_the_template_for_assistant_only_loss(tokenizer, thinking_default):
    chat_template_utils = pytest.importorskip("trl.chat_template_utils")
    tokenizer.chat_template = get_chat_template(thinking_default)
    assert chat_template_utils.has_generation_markers(tokenizer.chat_template)
    assert chat_template_utils.is_chat_template_prefix_preserving(tokenizer)
    assert chat_template_utils.get_training_chat_template(tokenizer) is None  # nothing to patch
