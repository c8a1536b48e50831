"""ThinkingBudgetProcessor: forced closing after N reasoning tokens, untouched rows, batches, sampling, beams."""

from __future__ import annotations

import pytest
import torch

from transformers_qwen35 import Qwen3_5ForCausalLM, Qwen3_5TextConfig
from transformers_qwen35.cli.demo import make_demo_tokenizer
from transformers_qwen35.generation.thinking_budget import ThinkingBudgetProcessor

OPEN, NL, CLOSE, NLNL = 90, 10, 91, 11  # made-up ids for the unit tests
WORDS = [40, 41, 42, 43, 44, 45, 46, 47]


def forced(processor, rows):
    """The token each row is forced to (None when untouched), from a call on uniform scores."""
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    scores = torch.zeros(len(rows), 100)
    out = processor(ids, scores)
    result = []
    for index in range(len(rows)):
        if torch.equal(out[index], scores[index]):
            result.append(None)
        else:
            assert int((out[index] == 0).sum()) == 1  # exactly one token left possible
            result.append(int(out[index].argmax()))
    return result


@pytest.fixture
def budget3():
    return ThinkingBudgetProcessor(3, think_open_id=OPEN, closing_ids=[NL, CLOSE, NLNL])


def test_each_row_state_is_read_from_its_tokens(budget3):
    prompt = [1, 2, OPEN, NL]
    rows = [
        [1, 2, 3],  # no reasoning at all
        prompt + WORDS[:2],  # reasoning, under budget
        prompt + WORDS[:3],  # budget spent: write the newline first
        prompt + WORDS[:3] + [NL],  # newline written: now </think>
        prompt + WORDS[:3] + [NL, CLOSE],  # closed by us: finish with the blank line
        prompt + WORDS[:3] + [NL, CLOSE, NLNL],  # closing complete: answer freely
        prompt + WORDS[:1] + [NL, CLOSE, NLNL, 5, 6, 7, 8],  # closed on its own within budget
        prompt + WORDS[:2] + [NL],  # budget spent on its own newline: </think> next
        [1, OPEN, NL, 99, 98, 97, CLOSE, NLNL, 5, OPEN, NL] + WORDS[:4],  # a second reasoning block counts anew
    ]
    assert forced(budget3, rows) == [None, None, NL, CLOSE, NLNL, None, None, CLOSE, NL]


def test_budget_zero_closes_at_once_and_bad_budgets_are_refused():
    processor = ThinkingBudgetProcessor(0, think_open_id=OPEN, closing_ids=[NL, CLOSE, NLNL])
    assert forced(processor, [[1, OPEN, NL]]) == [NL]
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="budget"):
            ThinkingBudgetProcessor(bad, think_open_id=OPEN, closing_ids=[NL, CLOSE, NLNL])
    with pytest.raises(ValueError, match="tokenizer"):
        ThinkingBudgetProcessor(4)


def tiny_model():
    tokenizer = make_demo_tokenizer()
    config = Qwen3_5TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"], num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "mrope_section": [2, 1, 1]},
        pad_token_id=tokenizer.pad_token_id, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen3_5ForCausalLM(config).eval(), tokenizer


@pytest.mark.parametrize(
    "settings",
    [dict(do_sample=False), dict(do_sample=True, top_k=20), dict(num_beams=3, num_return_sequences=2, do_sample=False)],
    ids=["greedy", "sampling", "beams"],
)
def test_generation_closes_every_row_after_the_budget(settings):
    model, tokenizer = tiny_model()
    tokenizer.padding_side = "left"
    prompts = ["<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n",
               "<|im_start|>user\nTell me a story about the sea<|im_end|>\n<|im_start|>assistant\n<think>\n"]  # fmt: skip
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    budget = ThinkingBudgetProcessor(5, tokenizer)
    close = tokenizer.convert_tokens_to_ids("</think>")
    # suppress_tokens makes a model that never closes its reasoning by itself; the budget overrides it
    settings = dict(settings, max_new_tokens=12, pad_token_id=0, suppress_tokens=[close])
    torch.manual_seed(1)
    with torch.no_grad():
        out = model.generate(**inputs, logits_processor=[budget], **settings)
    closing = tokenizer.encode("\n</think>\n\n", add_special_tokens=False)
    for row in out[:, inputs["input_ids"].shape[1] :].tolist():
        assert close in row
        at = row.index(close)
        assert at in (5, 6)  # five reasoning tokens, then the closing (its newline forced unless the model wrote it)
        assert row[at - 1] == closing[0] and row[at + 1 : at + 1 + len(closing) - 2] == closing[2:]
    with torch.no_grad():
        free = model.generate(**inputs, **settings)
    assert close not in free[:, inputs["input_ids"].shape[1] :].flatten().tolist()  # without the budget: never
