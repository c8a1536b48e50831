"""Qwen3_5Processor: official values, equality with built-in Qwen3VLProcessor, AutoProcessor routing, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.utils import is_torchvision_available

from transformers_qwen35.chat.processing import Qwen3_5Processor, default_image_processor
from transformers_qwen35.cli.demo import build_demo_checkpoint, make_demo_tokenizer

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
needs_no_torchvision = pytest.mark.skipif(is_torchvision_available(), reason="checks the no-torchvision behaviour")


class BuiltinImagesOnly(Qwen3VLProcessor):
    """transformers' own processor, allowed to run without a video processor (its class check refuses None)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def tokenizer():
    return make_demo_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return Qwen3_5Processor(tokenizer=tokenizer)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo"))


@pytest.mark.parametrize(
    "size, grid, tokens",
    [((640, 480), [1, 30, 40], 300), ((32, 32), [1, 16, 16], 64), ((1920, 1080), [1, 68, 120], 2040)],
)
def test_official_resize_and_token_counts(processor, tokenizer, size, grid, tokens):
    """The table of the reference: one placeholder per 32x32 pixels, within the official pixel bounds."""
    out = processor(text=[f"Look: {IMAGE} now"], images=[random_image(*size)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [grid]
    assert out["pixel_values"].shape == (grid[1] * grid[2], 1536)
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((out["input_ids"] == image_pad).sum()) == tokens
    assert torch.equal(out["mm_token_type_ids"], (out["input_ids"] == image_pad).int())
    assert float(out["pixel_values"].min()) >= -1.0 and float(out["pixel_values"].max()) <= 1.0  # mean = std = 0.5


def test_outputs_equal_builtin_qwen3vl_processor(processor, tokenizer):
    builtin = BuiltinImagesOnly(default_image_processor(), tokenizer, None)
    texts = [f"Two pictures {IMAGE} and {IMAGE}.", "No picture here, just text.", f"{IMAGE} one"]
    images = [[random_image(640, 480, 1), random_image(100, 300, 2)], [], [random_image(50, 50, 3)]]
    ours = processor(text=texts, images=images, return_tensors="pt", padding=True)
    theirs = builtin(text=texts, images=images, return_tensors="pt", padding=True)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_images_as_paths_arrays_and_pil_give_the_same_inputs(processor, tmp_path):
    image = random_image(120, 90, 4)
    image.save(tmp_path / "photo.png")
    array = np.asarray(image)
    results = [
        processor(text=[IMAGE], images=[source], return_tensors="pt")
        for source in (image, array, str(tmp_path / "photo.png"))
    ]
    for other in results[1:]:
        assert torch.equal(other["pixel_values"], results[0]["pixel_values"])
        assert torch.equal(other["input_ids"], results[0]["input_ids"])


def test_auto_processor_returns_ours_for_official_checkpoint_files(demo_dir, monkeypatch):
    """Official repos name Qwen3VLProcessor in their files; AutoProcessor still hands back our processor."""
    named = json.loads((demo_dir / "preprocessor_config.json").read_text())["processor_class"]
    assert named == "Qwen3VLProcessor"
    processor = AutoProcessor.from_pretrained(demo_dir)
    assert type(processor) is Qwen3_5Processor
    assert processor.image_processor.patch_size == 16 and processor.image_processor.merge_size == 2
    assert processor.chat_template is not None
    monkeypatch.setenv("TRANSFORMERS_QWEN35_PROCESSOR", "builtin")
    if is_torchvision_available():
        assert type(AutoProcessor.from_pretrained(demo_dir)) is Qwen3VLProcessor
    else:
        with pytest.raises(ImportError, match="[Tt]orchvision"):  # what users of built-in transformers get
            AutoProcessor.from_pretrained(demo_dir)


def test_folder_without_processor_files_gets_official_values_not_qwen2vl_defaults(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor) is Qwen3_5Processor
    assert processor.image_processor.patch_size == 16  # the Qwen2-VL class default would be 14
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]


def test_save_and_reload_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    again = AutoProcessor.from_pretrained(tmp_path)
    assert type(again) is Qwen3_5Processor
    image = random_image(200, 150, 5)
    first = processor(text=[IMAGE], images=[image], return_tensors="pt")
    second = again(text=[IMAGE], images=[image], return_tensors="pt")
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize(
    "images, text, message",
    [
        ([np.zeros((0, 10, 3), dtype=np.uint8)], IMAGE, "shape"),
        ([np.zeros((10, 10, 4), dtype=np.uint8)], IMAGE, "3 channels"),
        (["/no/such/photo.jpg"], IMAGE, "no file at"),
        ([random_image(10, 10)], IMAGE + IMAGE, "2 <|image_pad|> placeholder"),
        ([random_image(10, 10), random_image(10, 10)], IMAGE, "1 <|image_pad|> placeholder"),
    ],
)
def test_bad_images_raise_clear_errors(processor, images, text, message):
    with pytest.raises(ValueError, match=message.replace("|", r"\|")):
        processor(text=[text], images=images)


def test_unreadable_file_and_offline_url(processor, tmp_path, monkeypatch):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match="is not an image PIL can read"):
        processor(text=[IMAGE], images=[str(broken)])

    def offline(*args, **kwargs):
        import urllib.error

        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(ValueError, match="could not fetch.*no network"):
        processor(text=[IMAGE], images=["https://example.com/cat.jpg"])


def test_video_shorter_than_the_temporal_patch_is_refused(processor):
    with pytest.raises(ValueError, match="1 frame.*temporal patch of 2"):
        processor(text=[VIDEO], videos=[[random_image(64, 64)]])


@needs_no_torchvision
def test_video_without_torchvision_names_the_fix(processor):
    frames = [random_image(64, 64, i) for i in range(4)]
    with pytest.raises(ImportError, match="pip install torch==.* torchvision=="):
        processor(text=[VIDEO], videos=[frames])


def test_tool_call_arguments_as_a_json_string_are_accepted(processor):
    """The OpenAI wire format: the processor decodes them; the tokenizer alone says how to."""
    from jinja2.exceptions import TemplateError

    def conversation(arguments):
        call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
        return [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]

    as_string = conversation('{"city": "Paris", "days": 3}')
    decoded = processor.apply_chat_template(conversation({"city": "Paris", "days": 3}), tokenize=False)
    assert processor.apply_chat_template(as_string, tokenize=False) == decoded
    assert "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>" in decoded
    assert isinstance(as_string[1]["tool_calls"][0]["function"]["arguments"], str)  # the caller's copy is untouched
    with pytest.raises(TemplateError, match="json.loads"):
        processor.tokenizer.apply_chat_template(as_string, tokenize=False)
    with pytest.raises(ValueError, match="not JSON"):
        processor.apply_chat_template(conversation("{city: Paris"), tokenize=False)


def test_text_with_lone_surrogates_is_named(processor):
    with pytest.raises(ValueError, match=r"character 4 is a lone surrogate \(U\+DCE9\)"):
        processor(text=[b"caf\xe9".decode("utf-8", "surrogateescape")])
