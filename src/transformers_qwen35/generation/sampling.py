"""The model cards' recommended sampling settings, per size and mode, and the presence penalty they rely on.

Qwen3.5 is meant to be sampled, not decoded greedily (greedy thinking loops, small models most of all). The cards
give one setting per size group, mode and task; ``recommended_sampling`` returns it as ``generate()`` arguments.
``presence_penalty`` (OpenAI style: a flat subtraction from the logit of every token already generated) has no
``generate()`` argument in transformers, so it comes as ``PresencePenaltyLogitsProcessor``; transformers'
``repetition_penalty`` is a different, multiplicative mechanism and stays at 1.0 as the cards say.

Where these apply by themselves: a checkpoint loaded without a ``generation_config.json`` gets its size's default
mode settings as its generation config (see ``Qwen3_5PreTrainedModel.from_pretrained`` in ``model/modeling.py``),
and ``qwen35`` uses the full setting, presence penalty included, for the mode of each prompt. Anything the user passes wins.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor

SMALL_SIZES = ("0.8B", "2B")  # thinking off by default
LARGE_SIZES = ("4B", "9B")  # thinking on by default

# (size group, thinking, vision-language) -> the card's setting. min_p is 0.0 and repetition_penalty 1.0 throughout.
_CARD = {
    ("small", False, False): dict(temperature=1.0, top_p=1.0, top_k=20, presence_penalty=2.0),
    ("small", False, True): dict(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5),
    ("small", True, False): dict(temperature=1.0, top_p=0.95, top_k=20, presence_penalty=1.5),
    ("small", True, True): dict(temperature=0.6, top_p=0.95, top_k=20, presence_penalty=0.0),
    ("large", True, False): dict(temperature=1.0, top_p=0.95, top_k=20, presence_penalty=1.5),
    ("large", True, True): dict(temperature=1.0, top_p=0.95, top_k=20, presence_penalty=1.5),
    ("large", False, False): dict(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5),
    ("large", False, True): dict(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5),
}


def size_group(size: str) -> str:
    if size in SMALL_SIZES:
        return "small"
    if size in LARGE_SIZES:
        return "large"
    raise ValueError(f"Unknown Qwen3.5 size {size!r}: use one of {', '.join(SMALL_SIZES + LARGE_SIZES)}.")


def thinking_by_default(size: str) -> bool:
    """0.8B / 2B answer directly unless asked to think; 4B / 9B think unless asked not to."""
    return size_group(size) == "large"


def recommended_sampling(size: str, thinking: bool | None = None, vision: bool = False) -> dict:
    """The card's settings as ``generate()`` arguments plus ``presence_penalty`` (not a ``generate()`` argument:
    turn it into ``PresencePenaltyLogitsProcessor``). ``thinking=None`` means the size's default mode."""
    thinking = thinking_by_default(size) if thinking is None else thinking
    setting = _CARD[(size_group(size), bool(thinking), bool(vision))]
    return dict(do_sample=True, min_p=0.0, repetition_penalty=1.0, **setting)


def recommended_generation_config(size: str, thinking: bool | None = None, vision: bool = False, **extra):
    """``recommended_sampling`` as a ``GenerationConfig`` (without the presence penalty, which it cannot hold)."""
    settings = recommended_sampling(size, thinking, vision)
    settings.pop("presence_penalty")
    return GenerationConfig(**settings, **extra)


class PresencePenaltyLogitsProcessor(LogitsProcessor):
    """Subtract ``penalty`` from the logit of every token that already occurs in the generated part of a row.

    The prompt does not count (as in vLLM and the OpenAI API): its length is taken from the first call, so build a new
    processor for every ``generate()`` call.
    """

    def __init__(self, penalty: float):
        self.penalty = float(penalty)
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        generated = input_ids[:, self.prompt_length :]
        if self.penalty == 0.0 or generated.shape[1] == 0:
            return scores
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, generated.to(scores.device), True)
        return scores - self.penalty * seen.to(scores.dtype)


def apply_card(settings: GenerationConfig, size: str, thinking: bool, vision: bool = False) -> list[LogitsProcessor]:
    """Set the card's sampling for this size and mode on ``settings`` (in place); return the logits processors
    ``generate()`` needs besides it (the presence penalty, when the card asks for one)."""
    card = recommended_sampling(size, thinking, vision)
    penalty = card.pop("presence_penalty")
    for key, value in card.items():
        setattr(settings, key, value)
    return [PresencePenaltyLogitsProcessor(penalty)] if penalty else []
