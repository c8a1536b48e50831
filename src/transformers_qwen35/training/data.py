"""Chat data for fine-tuning: conversations rendered with the chat template, loss only on what the assistant says.

:func:`tokenize_chat` renders one conversation with the tokenizer's (or processor's) chat template, exactly as it
will be rendered at inference, tokenizes it and builds ``labels``:

- ``-100`` everywhere except the assistant turns. An assistant turn is labelled from the first token after
  ``<|im_start|>assistant\\n`` through its closing ``<|im_end|>`` **inclusive**: the model learns to end its turn
  (``<|im_end|>`` is the eos that stops generation). The ``\\n`` the template writes after ``<|im_end|>`` is **not**
  labelled: generation has stopped before it, it is glue between turns, as the role header is.
- The reasoning block of an assistant turn (``<think>\\n…\\n</think>\\n\\n``, empty or not) is part of the turn and is
  labelled. The template itself drops the reasoning of assistant turns that precede the last user query, so those
  turns are labelled without it, exactly as the model sees them in a later request. (Every assistant turn of a
  multi-turn conversation is a target; to train on final answers only, split conversations into one row per turn.)
- Tool calls (the XML ``<tool_call>`` blocks) are assistant text and are labelled; tool results are rendered by the
  template as a *user* turn of ``<tool_response>`` blocks and are not.
- The assistant spans are found in the rendered text and mapped to tokens through the fast tokenizer's offsets, so
  a token is labelled when its characters overlap an assistant span. Nothing is assumed about how the text
  tokenizes (merges across a span edge would stay labelled rather than be lost).
- Conversations with images go through the processor: placeholders are expanded to the image's token count, and
  ``pixel_values`` / ``image_grid_thw`` / ``mm_token_type_ids`` are returned with the ids. Vision tokens (the
  expanded placeholders and ``<|vision_start|>``/``<|vision_end|>``) are never labelled.

Nothing is truncated: a conversation longer than ``max_length`` raises :class:`SequenceTooLongError`, because a cut
conversation would silently lose its ``<|im_end|>`` (and often its whole answer).

:func:`load_chat_dataset` reads JSONL rows ``{"messages": [...], "tools": [...]?}``, skips rows with no assistant turn
or longer than ``max_length`` *and says so* (a warning, and the counts in ``dataset.skipped``), and raises
``ValueError`` when no labelled token is left, instead of letting a trainer report a loss of zero. The result is a
plain list of dicts, which ``transformers.Trainer`` takes as is (``datasets`` is not needed), and which both
``DataCollatorWithFlattening`` (padding-free packing; the model keeps packed samples apart) and
:class:`PaddingCollator` (one row per sample, for image batches) collate.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "IGNORE_INDEX",
    "ChatDataset",
    "NoAssistantTurnError",
    "PaddingCollator",
    "SequenceTooLongError",
    "load_chat_dataset",
    "tokenize_chat",
]

IGNORE_INDEX = -100
ASSISTANT_HEADER = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>"
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")


class SequenceTooLongError(ValueError):
    """The rendered conversation has more tokens than ``max_length`` (it is never truncated)."""

    def __init__(self, length: int, max_length: int):
        super().__init__(
            f"the conversation is {length} tokens long, more than max_length={max_length}; it is not truncated "
            "(that would cut the answer and its <|im_end|>): raise max_length or shorten the conversation."
        )
        self.length = length
        self.max_length = max_length


class NoAssistantTurnError(ValueError):
    """The conversation has no assistant message, so there is nothing to learn from it."""


# ------------------------------------------------------------------------------------------------------ one sample


def tokenize_chat(
    tokenizer_or_processor,
    messages: list[dict],
    tools: list[dict] | None = None,
    max_length: int | None = None,
    images: list | None = None,
    *,
    videos: list | None = None,
    base_dir: str | os.PathLike | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Render, tokenize and label one conversation (see the module docstring for the labelling rules).

    Args:
        tokenizer_or_processor: a fast tokenizer with a chat template, or a processor (``AutoProcessor``); a
            processor is required when a message holds an image or a video.
        messages: the conversation, in the chat template's format (``reasoning_content`` and ``tool_calls`` on
            assistant messages, ``role: tool`` results). Tool-call ``arguments`` given as a JSON string (OpenAI
            style) are parsed to a mapping first, as the template requires.
        tools: the tool schemas announced in the system turn, or None.
        max_length: raise :class:`SequenceTooLongError` when the sample has more tokens; None for no limit.
        images: the images of the conversation, in order. By default they are taken from the image parts of the
            messages (``{"type": "image", "image": PIL.Image | path | url}``; ``path``, ``url`` and ``image_url``
            keys are read too). Relative paths are resolved against ``base_dir``.
        videos: the same for video parts (needs torchvision; passed to the processor as given).
        chat_template_kwargs: extra template variables (for example ``enable_thinking``, which only changes the
            generation prompt, so it does not matter for training renders).

    Returns:
        ``{"input_ids": list[int], "labels": list[int]}``, plus for conversations with images or videos
        ``mm_token_type_ids`` (list[int]) and the processor's pixel tensors (``pixel_values`` and ``image_grid_thw``,
        ``pixel_values_videos`` and ``video_grid_thw``) as torch tensors.
    """
    messages = _normalise_messages(messages)
    wanted = sum(1 for message in messages if message.get("role") == "assistant")
    if wanted == 0:
        raise NoAssistantTurnError("the conversation has no assistant message: there is nothing to learn from it.")
    template_kwargs = dict(chat_template_kwargs or {})
    text = tokenizer_or_processor.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=False, **template_kwargs
    )
    spans = _assistant_spans(text, wanted)

    media_parts = _media_parts(messages)
    images, videos = images or None, videos or None
    if images is None:
        images = [_load_image(part, base_dir) for kind, part in media_parts if kind == "image"] or None
    if videos is None:
        videos = [
            _media_source(part, ("video", "path", "url"), base_dir) for kind, part in media_parts if kind == "video"
        ]
        videos = videos or None

    if images is None and videos is None:
        tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
        _require_fast(tokenizer)
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        sample = {"input_ids": list(encoding["input_ids"])}
        offsets = encoding["offset_mapping"]
        vision_ids: set[int] = set()
        media_spans: list[tuple[int, int]] = []
    else:
        processor = tokenizer_or_processor
        if not hasattr(processor, "image_processor"):
            raise TypeError(
                "this conversation holds images or videos: pass the processor (AutoProcessor.from_pretrained(...)), "
                "not the tokenizer, so the placeholders are expanded and the pixels computed."
            )
        _require_fast(processor.tokenizer)
        encoding = processor(
            text=[text],
            images=images,
            videos=videos,
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            return_mm_token_type_ids=True,
        )
        if "text_replacement_offsets" not in encoding:  # pragma: no cover - depends on the transformers release
            raise RuntimeError(
                "this transformers release does not report where the processor expanded the media placeholders "
                "(return_text_replacement_offsets); the labels of multimodal samples cannot be placed safely."
            )
        replacements = encoding["text_replacement_offsets"][0]
        spans = [(_shift(start, replacements), _shift(end, replacements)) for start, end in spans]
        # Vision content is never a target, wherever it sits (even inside an assistant turn).
        media_spans = [tuple(item["new_span"]) for item in replacements]
        sample = {"input_ids": list(encoding["input_ids"][0])}
        offsets = encoding["offset_mapping"][0]
        vision_ids = {i for i in processor.tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)) if i is not None}
        vision_ids.discard(processor.tokenizer.unk_token_id)
        sample["mm_token_type_ids"] = list(encoding["mm_token_type_ids"][0])
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            if encoding.get(key) is not None:
                sample[key] = torch.as_tensor(encoding[key])

    labels = []
    for token_id, (start, end) in zip(sample["input_ids"], offsets):
        labelled = (
            _overlaps(start, end, spans) and token_id not in vision_ids and not _overlaps(start, end, media_spans)
        )
        labels.append(token_id if labelled else IGNORE_INDEX)
    sample["labels"] = labels

    if max_length is not None and len(labels) > max_length:
        raise SequenceTooLongError(len(labels), max_length)
    if all(label == IGNORE_INDEX for label in labels):  # pragma: no cover - an assistant turn always has <|im_end|>
        raise ValueError("no token of the assistant turns could be located in the tokenized conversation.")
    return sample


def _normalise_messages(messages: list[dict]) -> list[dict]:
    """A copy with OpenAI-style JSON-string tool-call arguments parsed (the template needs a mapping).

    Only what changes is copied: contents (which may hold large images) are shared with the caller's messages.
    """
    if not isinstance(messages, list) or not all(isinstance(message, Mapping) for message in messages):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} mappings.")
    normalised = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                call = dict(call)
                nested = isinstance(call.get("function"), Mapping)
                function = dict(call["function"]) if nested else call
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except json.JSONDecodeError as error:
                        raise ValueError(
                            f"tool call arguments are not valid JSON: {function['arguments']!r}"
                        ) from error
                if nested:
                    call["function"] = function
                calls.append(call)
            message["tool_calls"] = calls
        normalised.append(message)
    return normalised


def _assistant_spans(text: str, wanted: int) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of every assistant turn: after its header, through its ``<|im_end|>``."""
    spans = []
    cursor = text.find(ASSISTANT_HEADER)
    while cursor != -1:
        start = cursor + len(ASSISTANT_HEADER)
        close = text.find(TURN_END, start)
        if close == -1:
            raise ValueError("an assistant turn of the rendered conversation has no closing <|im_end|>.")
        spans.append((start, close + len(TURN_END)))
        cursor = text.find(ASSISTANT_HEADER, close)
    if len(spans) != wanted:
        raise ValueError(
            f"the rendered conversation has {len(spans)} assistant turns but {wanted} assistant messages: a message "
            f"probably contains the literal chat markers {ASSISTANT_HEADER!r} or {TURN_END!r}."
        )
    return spans


def _shift(position: int, replacements: list[dict]) -> int:
    """Map a position of the rendered text to the text after the processor expanded the media placeholders."""
    shift = 0
    for item in replacements:
        start, end = item["span"]
        new_start, new_end = item["new_span"]
        if end <= position:
            shift += (new_end - new_start) - (end - start)
    return position + shift


def _overlaps(start: int, end: int, spans) -> bool:
    return any(start < span_end and end > span_start for span_start, span_end in spans)


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: labels are placed through the token offsets "
            "(return_offsets_mapping), which only fast tokenizers give. Load it with AutoTokenizer (use_fast=True)."
        )


def _media_parts(messages: list[dict]) -> list[tuple[str, Mapping]]:
    """``("image" | "video", part)`` for every media part, in order, with the chat template's own tests."""
    parts = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, Mapping):
                continue
            if "image" in part or "image_url" in part or part.get("type") == "image":
                parts.append(("image", part))
            elif "video" in part or part.get("type") == "video":
                parts.append(("video", part))
    return parts


def _media_source(part: Mapping, keys: tuple[str, ...], base_dir):
    for key in keys:
        value = part.get(key)
        if isinstance(value, Mapping):  # {"image_url": {"url": ...}}
            value = value.get("url")
        if value is None:
            continue
        if isinstance(value, (str, os.PathLike)) and not str(value).startswith(("http://", "https://", "data:")):
            path = Path(value)
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            return str(path)
        return value
    raise ValueError(f"media part {dict(part)!r} names no source (one of {', '.join(keys)}).")


def _load_image(part: Mapping, base_dir):
    source = _media_source(part, ("image", "path", "url", "image_url"), base_dir)
    if isinstance(source, str) and not source.startswith(("http://", "https://", "data:")):
        from PIL import Image

        with Image.open(source) as image:
            return image.convert("RGB")
    return source  # a PIL image, an array, or a URL the image processor fetches


# ---------------------------------------------------------------------------------------------------------- dataset


class ChatDataset(list):
    """A list of tokenized samples (dicts), with what was skipped while loading.

    Attributes:
        skipped: ``{"no_assistant_turn": n, "too_long": m}``.
        num_tokens / num_label_tokens: totals over the kept samples.
    """

    skipped: dict[str, int]
    num_tokens: int
    num_label_tokens: int

    def summary(self) -> str:
        skipped = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in self.skipped.items() if count)
        return (
            f"{len(self)} samples, {self.num_tokens} tokens, {self.num_label_tokens} labelled "
            f"(skipped: {skipped or 'none'})"
        )


def load_chat_dataset(
    path_or_rows: str | os.PathLike | Iterable[Mapping],
    tokenizer_or_processor,
    max_length: int | None,
    *,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    base_dir: str | os.PathLike | None = None,
) -> ChatDataset:
    """Tokenize a chat dataset for causal-LM fine-tuning.

    Args:
        path_or_rows: a JSONL file of ``{"messages": [...], "tools": [...]?}`` rows (image paths relative to the
            file's folder), or the rows themselves (a list of dicts, a ``datasets.Dataset``...).
        tokenizer_or_processor: as for :func:`tokenize_chat` (a processor when rows hold images).
        max_length: longer samples are skipped (and counted), never truncated; None keeps every length.
        base_dir: where relative image paths start (default: the JSONL file's folder).

    Returns:
        A :class:`ChatDataset`: a list of :func:`tokenize_chat` dicts with ``.skipped`` (counts per reason).

    Raises:
        ValueError: a row is malformed (with its number), or no sample with a labelled token is left.
    """
    if isinstance(path_or_rows, (str, os.PathLike)):
        source = str(path_or_rows)
        rows = _read_jsonl(path_or_rows)
        base_dir = base_dir if base_dir is not None else Path(path_or_rows).parent
    else:
        source = "the given rows"
        rows = enumerate(path_or_rows, start=1)

    dataset = ChatDataset()
    dataset.skipped = {"no_assistant_turn": 0, "too_long": 0}
    longest_skipped = 0
    total = 0
    for number, row in rows:
        total += 1
        if not isinstance(row, Mapping) or not isinstance(row.get("messages"), list):
            raise ValueError(
                f"{source}, row {number}: expected {{'messages': [...], 'tools': [...]?}}, got {row!r:.200}"
            )
        try:
            sample = tokenize_chat(
                tokenizer_or_processor,
                row["messages"],
                tools=row.get("tools") or None,
                max_length=max_length,
                base_dir=base_dir,
                chat_template_kwargs=chat_template_kwargs,
            )
        except NoAssistantTurnError:
            dataset.skipped["no_assistant_turn"] += 1
            continue
        except SequenceTooLongError as error:
            dataset.skipped["too_long"] += 1
            longest_skipped = max(longest_skipped, error.length)
            continue
        except Exception as error:
            raise ValueError(f"{source}, row {number}: {type(error).__name__}: {error}") from error
        dataset.append(sample)

    dataset.num_tokens = sum(len(sample["input_ids"]) for sample in dataset)
    dataset.num_label_tokens = sum(sum(label != IGNORE_INDEX for label in sample["labels"]) for sample in dataset)
    if any(dataset.skipped.values()):
        longest = f" (the longest has {longest_skipped} tokens)" if dataset.skipped["too_long"] else ""
        logger.warning(
            "%s: skipped %d of %d rows: %d with no assistant turn, %d longer than max_length=%s%s.",
            source, sum(dataset.skipped.values()), total, dataset.skipped["no_assistant_turn"],
            dataset.skipped["too_long"], max_length, longest,
        )  # fmt: skip
    if not dataset or dataset.num_label_tokens == 0:
        raise ValueError(
            f"{source}: no labelled token left to train on ({total} rows: {dataset.skipped['no_assistant_turn']} "
            f"without an assistant turn, {dataset.skipped['too_long']} longer than max_length={max_length}). "
            "Every label would be -100 and the loss meaningless: add assistant turns or raise max_length."
        )
    return dataset


def _read_jsonl(path: str | os.PathLike):
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error}).") from error


# --------------------------------------------------------------------------------------------------------- collator


class PaddingCollator:
    """One row per sample, right-padded: for batches of image samples, which are not packed.

    Right padding is exact for training here: every layer is causal (attention, the short convolution and the
    DeltaNet recurrence only look back), so a real token never sees the pads that follow it, and pads carry
    ``labels = -100``. (Left padding is also exact for this model, which zeroes padded positions, and is what
    generation needs; for training nothing after the last real token matters, so the simpler side is used.)

    Returns ``input_ids``, ``attention_mask``, ``labels`` and, when present, ``mm_token_type_ids`` (padded with 0,
    text) and the pixel tensors concatenated over the batch in sample order (the model matches them to the
    placeholders in that order).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("PaddingCollator needs a pad_token_id (the tokenizer's pad token, <|endoftext|>).")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        def padded(key: str, value: int) -> torch.Tensor:
            rows = [list(feature[key]) + [value] * (length - len(feature[key])) for feature in features]
            return torch.tensor(rows, dtype=torch.long)

        batch = {
            "input_ids": padded("input_ids", self.pad_token_id),
            "attention_mask": torch.tensor(
                [[1] * len(f["input_ids"]) + [0] * (length - len(f["input_ids"])) for f in features], dtype=torch.long
            ),
            "labels": padded("labels", IGNORE_INDEX),
        }
        if any("mm_token_type_ids" in feature for feature in features):
            types = [feature.get("mm_token_type_ids") or [0] * len(feature["input_ids"]) for feature in features]
            batch["mm_token_type_ids"] = torch.tensor([row + [0] * (length - len(row)) for row in map(list, types)])
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            tensors = [torch.as_tensor(feature[key]) for feature in features if feature.get(key) is not None]
            if tensors:
                batch[key] = torch.cat(tensors, dim=0)
        return batch
