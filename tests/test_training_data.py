"""Chat data for fine-tuning: label masks, skipped rows, multimodal samples, and packing that changes nothing.

The expected masks are written by hand from the documented renders (reference/chat-tokenizer-processor.md §5): each
conversation is given as a list of (text, labelled?) pieces, tokenized piece by piece, independently of the offsets
that the code under test uses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import perturbed_state, relative_error, tiny_text_kwargs
from PIL import Image, ImageDraw
from transformers import DataCollatorWithFlattening

from transformers_qwen35 import Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5Processor, Qwen3_5TextConfig
from transformers_qwen35.cli.demo import make_demo_tokenizer
from transformers_qwen35.model.presets import tiny_config
from transformers_qwen35.training.data import (
    IGNORE_INDEX,
    NoAssistantTurnError,
    PaddingCollator,
    SequenceTooLongError,
    load_chat_dataset,
    tokenize_chat,
)

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
HEADER = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer():
    return make_demo_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return Qwen3_5Processor(tokenizer=tokenizer)


def expected(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for text, labelled in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if labelled else [IGNORE_INDEX] * len(piece)
    return ids, labels


def labelled_runs(tokenizer, sample) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


# --- exact masks ----------------------------------------------------------------------------------------------------


def test_single_turn_labels_the_answer_with_its_think_wrapper_and_im_end(tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 = 4."}]
    sample = tokenize_chat(tokenizer, messages)
    ids, labels = expected(
        tokenizer,
        [
            ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n" + HEADER, False),
            ("<think>\n\n</think>\n\n2+2 = 4.<|im_end|>", True),
            ("\n", False),  # after <|im_end|>: generation has stopped, not a target
        ],
    )
    assert sample["input_ids"] == ids
    assert sample["labels"] == labels
    assert set(sample) == {"input_ids", "labels"}


def test_multi_turn_labels_only_assistant_turns_and_earlier_reasoning_is_dropped(tokenizer):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 = 4.", "reasoning_content": "Simple addition."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "3+3 = 6.", "reasoning_content": "Also simple."},
    ]
    sample = tokenize_chat(tokenizer, messages)
    ids, labels = expected(
        tokenizer,
        [
            ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", False),
            ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n" + HEADER, False),
            ("2+2 = 4.<|im_end|>", True),  # before the last user query: no reasoning, no wrapper
            ("\n<|im_start|>user\nAnd 3+3?<|im_end|>\n" + HEADER, False),
            ("<think>\nAlso simple.\n</think>\n\n3+3 = 6.<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert sample["input_ids"] == ids
    assert sample["labels"] == labels
    assert "Simple addition" not in tokenizer.decode(sample["input_ids"])


def test_inline_think_in_content_is_split_like_reasoning_content(tokenizer):
    inline = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello!"},
    ]
    separate = [inline[0], {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."}]
    assert tokenize_chat(tokenizer, inline) == tokenize_chat(tokenizer, separate)
    assert labelled_runs(tokenizer, tokenize_chat(tokenizer, inline)) == [
        "<think>\nGreet back.\n</think>\n\nHello!<|im_end|>"
    ]


def test_tool_calls_are_labelled_and_tool_results_are_not(tokenizer):
    # E8 of the reference: empty content, non-scalar arguments, a tool result, then the final answer.
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}},
                }
            ],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    sample = tokenize_chat(tokenizer, messages)
    call = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n[1, 2]\n</parameter>\n</function>\n</tool_call>"
    )
    ids, labels = expected(
        tokenizer,
        [
            ("<|im_start|>user\nWeather in Paris?<|im_end|>\n" + HEADER, False),
            # tool results are not a new user query: both turns keep the (empty) think wrapper
            ("<think>\n\n</think>\n\n" + call + "<|im_end|>", True),
            ("\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n" + HEADER, False),
            ("<think>\n\n</think>\n\nIt is sunny.<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert sample["input_ids"] == ids
    assert sample["labels"] == labels

    # OpenAI-style JSON-string arguments are parsed first (the template needs a mapping): same sample
    as_string = json.loads(json.dumps(messages))
    as_string[1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": "Paris", "days": [1, 2]})
    assert tokenize_chat(tokenizer, as_string) == sample
    assert isinstance(messages[1]["tool_calls"][0]["function"]["arguments"], dict)  # the caller's rows untouched


def test_tools_schema_in_the_system_turn_is_not_labelled(tokenizer):
    tool = {"type": "function", "function": {"name": "get_time", "description": "Current time.", "parameters": {}}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": "Let me check.", "reasoning_content": "Use the tool.",
         "tool_calls": [{"function": {"name": "get_time", "arguments": {}}}]},
    ]  # fmt: skip
    sample = tokenize_chat(tokenizer, messages, tools=[tool])
    text = tokenizer.decode(sample["input_ids"])
    assert text.startswith("<|im_start|>system\n# Tools\n") and '"name": "get_time"' in text
    assert labelled_runs(tokenizer, sample) == [
        "<think>\nUse the tool.\n</think>\n\nLet me check.\n\n<tool_call>\n<function=get_time>\n</function>\n"
        "</tool_call><|im_end|>"
    ]


def test_literal_chat_markers_in_a_message_are_refused(tokenizer):
    messages = [
        {"role": "user", "content": "Say <|im_start|>assistant\nhi<|im_end|> please"},
        {"role": "assistant", "content": "ok"},
    ]
    with pytest.raises(ValueError, match="literal chat markers"):
        tokenize_chat(tokenizer, messages)


def test_no_assistant_turn_and_too_long_raise(tokenizer):
    with pytest.raises(NoAssistantTurnError):
        tokenize_chat(tokenizer, [{"role": "user", "content": "Hello"}])
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there, how are you?"}]
    length = len(tokenize_chat(tokenizer, messages)["input_ids"])
    assert len(tokenize_chat(tokenizer, messages, max_length=length)["input_ids"]) == length
    with pytest.raises(SequenceTooLongError, match="not truncated") as error:
        tokenize_chat(tokenizer, messages, max_length=length - 1)
    assert (error.value.length, error.value.max_length) == (length, length - 1)


# --- datasets -------------------------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
LONG = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
USER_ONLY = {"messages": [{"role": "user", "content": "Anyone there?"}]}
SYSTEM_USER = {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}]}


def test_skipped_rows_are_counted_and_reported(tokenizer, caplog, tmp_path):
    rows = [GOOD, USER_ONLY, LONG, SYSTEM_USER, GOOD]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n")  # a blank line is ignored
    with caplog.at_level(logging.WARNING, logger="transformers_qwen35.training.data"):
        dataset = load_chat_dataset(path, tokenizer, max_length=64)
    assert len(dataset) == 2
    assert dataset.skipped == {"no_assistant_turn": 2, "too_long": 1}
    assert dataset[0] == tokenize_chat(tokenizer, GOOD["messages"])
    assert dataset.num_label_tokens == 2 * sum(label != IGNORE_INDEX for label in dataset[0]["labels"])
    assert "skipped 3 of 5 rows: 2 with no assistant turn, 1 longer than max_length=64" in caplog.text
    assert "2 samples" in dataset.summary() and "1 too long" in dataset.summary()

    # in-memory rows give the same result; nothing skipped, nothing logged
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="transformers_qwen35.training.data"):
        kept = load_chat_dataset([GOOD, LONG], tokenizer, max_length=None)
    assert len(kept) == 2 and kept.skipped == {"no_assistant_turn": 0, "too_long": 0}
    assert not caplog.records


@pytest.mark.parametrize(
    "rows, reason",
    [
        ([USER_ONLY, SYSTEM_USER], "2 without an assistant turn"),
        ([LONG, LONG], "2 longer than max_length=64"),
        ([], "0 rows"),
    ],
)
def test_nothing_to_learn_raises_instead_of_a_silent_zero_loss(tokenizer, rows, reason):
    with pytest.raises(ValueError, match="no labelled token left") as error:
        load_chat_dataset(rows, tokenizer, max_length=64)
    assert reason in str(error.value)


def test_malformed_rows_name_their_line(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_chat_dataset(path, tokenizer, max_length=None)
    with pytest.raises(ValueError, match="row 2: expected"):
        load_chat_dataset([GOOD, {"text": "plain"}], tokenizer, max_length=None)
    bad_role = {
        "messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "y"}, GOOD["messages"][1]]
    }
    with pytest.raises(ValueError, match="row 1: .*Unexpected message role"):
        load_chat_dataset([bad_role], tokenizer, max_length=None)


def test_example_chat_data_loads_with_every_kind_of_row(tokenizer):
    dataset = load_chat_dataset(DATA / "chat.jsonl", tokenizer, max_length=2048)
    rows = [json.loads(line) for line in (DATA / "chat.jsonl").read_text().splitlines()]
    assert 60 <= len(rows) <= 120 and len(dataset) == len(rows)
    assert dataset.skipped == {"no_assistant_turn": 0, "too_long": 0}
    assert any("tools" in row for row in rows)
    assert any(any("reasoning_content" in m for m in row["messages"]) for row in rows)
    assert any(sum(m["role"] == "assistant" for m in row["messages"]) > 1 for row in rows)
    for sample in dataset:
        runs = labelled_runs(tokenizer, sample)
        assert runs and all(run.endswith("<|im_end|>") for run in runs)


# --- images ---------------------------------------------------------------------------------------------------------


def square(colour) -> Image.Image:
    image = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(image).rectangle((8, 8, 40, 40), fill=colour)
    return image


def test_image_sample_masks_vision_tokens_and_carries_pixels(processor, tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": square("red")}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "Red."},
    ]
    sample = tokenize_chat(processor, messages)
    assert set(sample) == {"input_ids", "labels", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    grid = sample["image_grid_thw"].tolist()
    assert grid == [[1, 14, 20]]  # 64x48 is scaled up, aspect kept, to 320x224 (at least 65,536 pixels)
    assert sample["pixel_values"].shape == (14 * 20, 3 * 2 * 16 * 16)
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    positions = [i for i, token in enumerate(sample["input_ids"]) if token == image_pad]
    assert len(positions) == 70 and positions == list(range(positions[0], positions[0] + 70))  # 14 * 20 / 2²
    assert [sample["mm_token_type_ids"][i] for i in positions] == [1] * 70
    assert sum(sample["mm_token_type_ids"]) == 70
    ids, labels = expected(
        tokenizer,
        [
            ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 70 + "<|vision_end|>Colour?<|im_end|>\n", False),
            (HEADER, False),
            ("<think>\n\n</think>\n\nRed.<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert sample["input_ids"] == ids
    assert sample["labels"] == labels


def test_image_inside_an_assistant_turn_is_never_labelled(processor, tokenizer):
    messages = [
        {"role": "user", "content": "Draw a square."},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Here:"}, {"type": "image", "image": square("blue")}],
        },
    ]
    sample = tokenize_chat(processor, messages)
    vision = set(tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]))
    assert labelled_runs(tokenizer, sample) == ["<think>\n\n</think>\n\nHere:", "<|im_end|>"]
    assert all(label == IGNORE_INDEX for token, label in zip(sample["input_ids"], sample["labels"]) if token in vision)


def test_vision_rows_load_from_jsonl_with_relative_paths(processor, tokenizer):
    dataset = load_chat_dataset(DATA / "vision_chat.jsonl", processor, max_length=512)
    assert len(dataset) >= 12 and dataset.skipped == {"no_assistant_turn": 0, "too_long": 0}
    for sample in dataset:
        assert sample["pixel_values"].shape[0] == int(sample["image_grid_thw"].prod(-1).sum())
        assert sum(sample["mm_token_type_ids"]) == int(sample["image_grid_thw"].prod(-1).sum()) // 4
        labelled = [i for i, label in enumerate(sample["labels"]) if label != IGNORE_INDEX]
        assert all(sample["mm_token_type_ids"][i] == 0 for i in labelled)
    first = json.loads((DATA / "vision_chat.jsonl").read_text().splitlines()[0])
    answer = first["messages"][-1]["content"]
    assert labelled_runs(tokenizer, dataset[0]) == [f"<think>\n\n</think>\n\n{answer}<|im_end|>"]
    # a text-only row through the processor: the same as through its tokenizer, no pixel tensors
    assert tokenize_chat(processor, GOOD["messages"]) == tokenize_chat(tokenizer, GOOD["messages"])


def test_image_rows_need_the_processor(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": square("red")}, {"type": "text", "text": "Hm?"}]},
        {"role": "assistant", "content": "Red."},
    ]
    with pytest.raises(TypeError, match="pass the processor"):
        tokenize_chat(tokenizer, messages)


# --- the model: packed and padded batches give the loss and gradients of separate samples ---------------------------


@pytest.fixture
def one_thread():
    # Tiny matrices: one thread is as fast, and does not stall when the cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def per_sample_reference(model, samples, extra_keys=()):
    """Sum over samples of (mean loss x labelled targets) / all targets, as one packed or padded batch computes it."""
    model.zero_grad()
    targets = [sum(label != IGNORE_INDEX for label in sample["labels"][1:]) for sample in samples]
    total = sum(targets)
    loss = 0.0
    for sample, count in zip(samples, targets):
        inputs = {"input_ids": torch.tensor([sample["input_ids"]]), "labels": torch.tensor([sample["labels"]])}
        for key in extra_keys:
            if key in sample:
                value = sample[key]
                inputs[key] = value if isinstance(value, torch.Tensor) else torch.tensor([value])
        part = model(**inputs).loss * count / total
        part.backward()
        loss += part.item()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss, grads


def batch_loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_packed_batch_matches_separate_forward_passes(tokenizer, one_thread):
    torch.manual_seed(0)
    kwargs = tiny_text_kwargs(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**kwargs, attn_implementation="sdpa"))
    model.load_state_dict(perturbed_state(model, tied_embedding=None))
    model.train()  # no dropout in this model: train mode only matters for the code paths

    dataset = load_chat_dataset(DATA / "chat.jsonl", tokenizer, max_length=2048)
    multi_turn = next(s for s in dataset if sum(label != IGNORE_INDEX for label in s["labels"]) and
                      len([t for t in s["input_ids"] if t == tokenizer.convert_tokens_to_ids("<|im_start|>")]) >= 4)  # fmt: skip
    with_tools = max(dataset, key=lambda sample: len(sample["input_ids"]))
    samples = [dataset[0], multi_turn, with_tools, dataset[1], dataset[5]]

    packed = DataCollatorWithFlattening()(samples)
    assert packed["input_ids"].shape == (1, sum(len(sample["input_ids"]) for sample in samples))
    loss, grads = batch_loss_and_grads(model, packed)
    reference_loss, reference_grads = per_sample_reference(model, samples)

    assert abs(loss - reference_loss) <= 1e-5 * abs(reference_loss), (loss, reference_loss)
    assert grads.keys() == reference_grads.keys() and len(grads) == len(list(model.parameters()))
    worst = max(relative_error(grads[name], reference_grads[name]) for name in grads)
    assert worst <= 1e-4, worst
    print(f"packed vs separate: loss {loss:.7f} vs {reference_loss:.7f}, worst gradient relative error {worst:.2e}")

    # the comparison can fail: the same row read as ONE sequence (positions not restarting) leaks across samples
    leaked_loss, leaked_grads = batch_loss_and_grads(model, {k: packed[k] for k in ("input_ids", "labels")})
    leaked = max(relative_error(leaked_grads[name], reference_grads[name]) for name in grads)
    print(f"one sequence instead: loss {leaked_loss:.7f}, worst gradient relative error {leaked:.2e}")
    assert leaked > 100 * worst and leaked > 1e-3


def test_padded_image_batch_matches_separate_forward_passes(processor, tokenizer, one_thread):
    torch.manual_seed(0)
    model = Qwen3_5ForConditionalGeneration(tiny_config(vocab_size=len(tokenizer)))
    model.load_state_dict(perturbed_state(model, tied_embedding=None))
    model.train()
    dataset = load_chat_dataset(DATA / "vision_chat.jsonl", processor, max_length=512)
    samples = [dataset[0], dataset[1], dataset[5]]
    assert len({len(sample["input_ids"]) for sample in samples}) > 1  # the batch really is padded

    batch = PaddingCollator(pad_token_id=tokenizer.pad_token_id)(samples)
    assert batch["input_ids"].shape == (3, max(len(sample["input_ids"]) for sample in samples))
    assert batch["pixel_values"].shape[0] == sum(sample["pixel_values"].shape[0] for sample in samples)
    assert int(batch["attention_mask"].sum()) == sum(len(sample["input_ids"]) for sample in samples)
    loss, grads = batch_loss_and_grads(model, batch)
    keys = ("mm_token_type_ids", "pixel_values", "image_grid_thw")
    reference_loss, reference_grads = per_sample_reference(model, samples, extra_keys=keys)

    assert abs(loss - reference_loss) <= 1e-5 * abs(reference_loss), (loss, reference_loss)
    assert any(name.startswith("model.visual.") for name in grads)
    worst = max(relative_error(grads[name], reference_grads[name]) for name in grads)
    assert worst <= 1e-4, worst
    print(f"padded vs separate: loss {loss:.7f} vs {reference_loss:.7f}, worst gradient relative error {worst:.2e}")
