"""A self-contained demo checkpoint: a tiny random-weight Qwen3.5 plus a small tokenizer, built offline in seconds.

The real tokenizer and weights live on the Hugging Face Hub; this module makes a stand-in of the same *layout*
(composite ``config.json``, official tensor names, a fast tokenizer with the Qwen chat tokens and a ChatML template)
so that ``qwen35 demo``, the tests and the examples exercise the whole load-and-generate path with no network.
The weights are random, so the generated text is gibberish by design.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..chat.template import get_chat_template
from ..model.checkpoint import write_random_checkpoint
from ..model.presets import tiny_config

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
CHAT_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Qwen marks the thinking tags as ordinary added tokens, so decoding with skip_special_tokens keeps them.
THINKING_TOKENS = (THINK_OPEN, THINK_CLOSE)
# Last on purpose: tiny_config() puts the multimodal placeholder ids at the top of the vocabulary, in this order.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Bytes + merges; with the added tokens the whole vocabulary stays at 512, well below the 1024 we promise.
BPE_VOCAB_SIZE = 512 - len(CHAT_SPECIAL_TOKENS) - len(THINKING_TOKENS) - len(VISION_TOKENS)
MAX_VOCAB_SIZE = 1024

# The Qwen3.5 chat format of the 0.8B/2B checkpoints (thinking off unless enable_thinking=True), which the demo
# checkpoint's shape is derived from.
CHAT_TEMPLATE = get_chat_template(thinking_default=False)

# A short built-in text to learn merges from: plain English about chatting with a language model, so that common
# words in demo prompts become single tokens. Any text would do; it only has to ship with the package.
TRAINING_TEXT = """\
Hello! How are you today? I am a small language model, and I am here to help you with your questions.
You can ask me about the weather, about science, about history, or about the things you want to learn.
The quick brown fox jumps over the lazy dog. A model reads a prompt, one token at a time, and then it writes
an answer, one token at a time. Each token is a piece of a word: a letter, a syllable, or a whole word.
Tell me a story about a robot who wanted to paint the sea. Once upon a time there was a little robot that
lived by the shore. Every morning it watched the waves, and every evening it tried to paint them.
What is the capital of France? The capital of France is Paris. What is the largest planet in the solar system?
The largest planet is Jupiter. Why is the sky blue? Sunlight is scattered by the air, and blue light is
scattered the most. Please write a short poem about the moon. The moon is bright, the night is long, the stars
are quiet, and the wind sings its song.
Thank you for your help. You are welcome; it is a pleasure to talk with you. Let me think about it step by
step: first we read the question, then we find what we know, and then we write the answer in a few clear
sentences. Good morning, good afternoon, good evening and good night.
The user asks, the assistant answers, and the system sets the rules of the conversation.
"""


def _train_byte_level_bpe() -> Tokenizer:
    """A byte-level BPE (GPT-2 / Qwen style): every byte has a token, so any text round-trips."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    return tokenizer


def _add_qwen_tokens(backend: Tokenizer) -> None:
    """Append the chat, thinking and vision tokens, in that order, after the learned vocabulary."""
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in CHAT_SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in THINKING_TOKENS])
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in VISION_TOKENS])


def make_demo_tokenizer() -> PreTrainedTokenizerFast:
    """The demo tokenizer in memory (see :func:`build_demo_tokenizer` for what it holds)."""
    backend = _train_byte_level_bpe()
    _add_qwen_tokens(backend)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, *VISION_TOKENS],
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )
    if len(tokenizer) >= MAX_VOCAB_SIZE:  # pragma: no cover - guards future edits of the constants above
        raise AssertionError(f"demo vocabulary grew to {len(tokenizer)} tokens; keep it below {MAX_VOCAB_SIZE}.")
    return tokenizer


# Written into every directory the demo fills: a later run may rewrite a directory holding it, and no other.
DEMO_MARKER = ".qwen35-demo"


def claim_demo_directory(directory: str | os.PathLike) -> Path:
    """Make ``directory`` the demo's: create it, or take it when it is empty or an earlier demo wrote it. A directory
    holding anything else is refused (FileExistsError) before anything is written: the demo never overwrites files
    it did not create, such as a real checkpoint."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file; give a new or empty directory for the demo checkpoint.")
    if directory.is_dir() and not (directory / DEMO_MARKER).exists():
        present = sorted(entry.name for entry in directory.iterdir())
        if present:
            shown = ", ".join(present[:4]) + (f" and {len(present) - 4} more" if len(present) > 4 else "")
            raise FileExistsError(
                f"{directory} already holds files the demo did not write ({shown}). The demo never overwrites "
                "files it did not create: give a new or empty directory."
            )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / DEMO_MARKER).write_text(
        "Written by `qwen35 demo` (random weights); the demo may rewrite this directory.\n"
    )
    return directory


def build_demo_tokenizer(directory: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Build the demo tokenizer offline and save it (``tokenizer.json`` + ``tokenizer_config.json``) to ``directory``.

    Byte-level BPE with a 256-byte alphabet and merges learned from :data:`TRAINING_TEXT`, plus the Qwen chat tokens
    (``<|endoftext|>`` pad, ``<|im_end|>`` eos, ``<|im_start|>``, ``<think>``, ``</think>``), the four vision
    placeholders and a ChatML chat template. Returns the tokenizer.
    """
    tokenizer = make_demo_tokenizer()
    tokenizer.save_pretrained(str(claim_demo_directory(directory)))
    return tokenizer


def _demo_vocab_size(tokenizer: PreTrainedTokenizerFast) -> int:
    """The model's vocabulary is exactly the tokenizer's, so every id it can emit decodes to text."""
    size = len(tokenizer)
    vision_ids = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
    # tiny_config(size) places vision start/end/image/video at size-4 .. size-1: they must be our vision tokens.
    if vision_ids != list(range(size - len(VISION_TOKENS), size)):  # pragma: no cover - guards the token order
        raise AssertionError(f"vision tokens must take the last ids of the demo vocabulary, got {vision_ids}.")
    return size


def _write_generation_config(directory: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    # Greedy: random weights make sampling pointless, and greedy output is reproducible in tests.
    generation_config = {
        "do_sample": False,
        "eos_token_id": [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)],
        "pad_token_id": tokenizer.pad_token_id,
        "max_new_tokens": 32,
    }
    (directory / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")


def _write_processor_configs(directory: Path) -> None:
    """The official repos' image and video processor files, which name transformers' ``Qwen3VLProcessor``."""
    from ..chat.processing import (
        IMAGE_CONFIG_FILE,
        OFFICIAL_IMAGE_PROCESSOR,
        OFFICIAL_VIDEO_PROCESSOR,
        VIDEO_CONFIG_FILE,
    )

    image = {**OFFICIAL_IMAGE_PROCESSOR, "processor_class": "Qwen3VLProcessor"}
    image["image_processor_type"] = "Qwen2VLImageProcessorFast"
    video = {**OFFICIAL_VIDEO_PROCESSOR, "processor_class": "Qwen3VLProcessor"}
    video["video_processor_type"] = "Qwen3VLVideoProcessor"
    (directory / IMAGE_CONFIG_FILE).write_text(json.dumps(image, indent=2) + "\n")
    (directory / VIDEO_CONFIG_FILE).write_text(json.dumps(video, indent=2) + "\n")


def build_demo_checkpoint(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete, loadable Qwen3.5 checkpoint with RANDOM weights to ``directory`` and return its path.

    It holds the official layout (composite ``config.json``, ``model.safetensors`` with ``model.language_model.*``,
    ``model.visual.*`` and ``mtp.*`` tensors), the demo tokenizer, the official image/video processor files and a
    greedy ``generation_config.json``, so ``AutoTokenizer`` / ``AutoProcessor`` / ``AutoModelForCausalLM`` /
    ``AutoModelForImageTextToText.from_pretrained(path)`` work on it exactly as on a real checkpoint. A directory
    holding files the demo did not write is refused (``claim_demo_directory``).
    """
    directory = claim_demo_directory(directory)
    tokenizer = make_demo_tokenizer()
    config = tiny_config(vocab_size=_demo_vocab_size(tokenizer))
    text_config = config.text_config
    text_config.eos_token_id = tokenizer.convert_tokens_to_ids(IM_END)
    text_config.pad_token_id = tokenizer.pad_token_id
    # Untied, as in the 9B: with tied random embeddings the residual stream scores the input token highest, so
    # greedy decoding repeats the prompt's last token (a newline) forever and the demo would print blank lines.
    config.tie_word_embeddings = False
    text_config.tie_word_embeddings = False
    write_random_checkpoint(directory, config, seed=seed)
    tokenizer.save_pretrained(str(directory))
    _write_generation_config(directory, tokenizer)
    _write_processor_configs(directory)
    return directory


__all__ = [
    "build_demo_checkpoint",
    "build_demo_tokenizer",
    "claim_demo_directory",
    "make_demo_tokenizer",
    "CHAT_TEMPLATE",
    "TRAINING_TEXT",
]
