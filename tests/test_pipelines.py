"""pipeline("image-text-to-text") and pipeline("text-generation") on an official-layout checkpoint (the demo one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, pipeline
from transformers.models.qwen3_5 import modeling_qwen3_5
from transformers.utils import is_torchvision_available

from transformers_qwen35 import Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration
from transformers_qwen35.chat.processing import Qwen3_5Processor
from transformers_qwen35.cli.demo import build_demo_checkpoint

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo"), seed=3)


@pytest.fixture(scope="module")
def vl_pipe(demo_dir):
    return pipeline("image-text-to-text", model=str(demo_dir))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    pixels = np.random.default_rng(7).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("media") / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def chat(image, question="What is in the picture?"):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def answer(outputs) -> str:
    return outputs[0]["generated_text"][-1]["content"]


def test_pipeline_uses_our_classes(vl_pipe):
    assert type(vl_pipe.model) is Qwen3_5ForConditionalGeneration
    assert type(vl_pipe.processor) is Qwen3_5Processor


def test_image_as_path_pil_or_array_gives_the_same_answer(vl_pipe, photo):
    image = Image.open(photo).convert("RGB")
    answers = {
        kind: answer(vl_pipe(text=chat(source), max_new_tokens=NEW_TOKENS))
        for kind, source in (("path", str(photo)), ("pil", image), ("array", np.asarray(image)))
    }
    assert len(set(answers.values())) == 1, answers
    assert answers["path"]  # random weights, but it did generate


def test_pipeline_answer_equals_builtin_model_on_the_same_inputs(vl_pipe, demo_dir, photo):
    """The pipeline's tokens are the ones built-in transformers' model generates from our processor's inputs."""
    processor = AutoProcessor.from_pretrained(demo_dir)
    inputs = processor.apply_chat_template(
        chat(str(photo)), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    native = modeling_qwen3_5.Qwen3_5ForConditionalGeneration.from_pretrained(demo_dir, dtype=torch.float32)
    with torch.no_grad():
        ids = native.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    assert answer(vl_pipe(text=chat(str(photo)), max_new_tokens=NEW_TOKENS)) == expected


def test_several_chats_with_and_without_images(vl_pipe, photo):
    chats = [chat(str(photo)), [{"role": "user", "content": [{"type": "text", "text": "Hello there!"}]}]]
    together = vl_pipe(text=chats, max_new_tokens=NEW_TOKENS)
    alone = [vl_pipe(text=one, max_new_tokens=NEW_TOKENS) for one in chats]
    assert [answer(item) for item in together] == [answer(item) for item in alone]


def test_unreachable_image_url_gives_a_clear_error(vl_pipe, monkeypatch):
    def offline(*args, **kwargs):
        import urllib.error

        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(ValueError, match="could not fetch https://example.com/cat.jpg .*no network"):
        vl_pipe(text=chat("https://example.com/cat.jpg"), max_new_tokens=2)


@pytest.mark.skipif(is_torchvision_available(), reason="checks the no-torchvision behaviour")
def test_video_without_torchvision_names_the_fix(vl_pipe):
    frames = [np.zeros((64, 64, 3), dtype=np.uint8)] * 4
    video_chat = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "?"}]}]
    with pytest.raises(ImportError, match="torchvision"):
        vl_pipe(text=video_chat, max_new_tokens=2)


def test_text_generation_pipeline_matches_builtin(demo_dir):
    pipe = pipeline("text-generation", model=str(demo_dir))
    assert type(pipe.model) is Qwen3_5ForCausalLM
    messages = [{"role": "user", "content": "Tell me a story about a robot."}]
    ours = pipe(messages, max_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"][-1]["content"]
    native = modeling_qwen3_5.Qwen3_5ForCausalLM.from_pretrained(demo_dir, dtype=torch.float32)
    prompt = pipe.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        ids = native.generate(**prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert ours == pipe.tokenizer.decode(ids[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)


def test_multimodal_example_runs(capsys, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    monkeypatch.setattr(sys, "argv", ["multimodal_chat.py"])
    runpy.run_path(str(Path(__file__).parents[1] / "examples" / "multimodal_chat.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "processor: Qwen3_5Processor, model: Qwen3_5ForConditionalGeneration" in out
    assert "image grid [1, 16, 20] -> 80 image tokens" in out  # 320 x 240 rounded to 320 x 256
    if is_torchvision_available():
        assert "video tokens" in out and out.count("assistant: ") == 2
    else:
        assert "video skipped: Video input needs torchvision" in out


def test_processor_batch_mixing_image_and_text_rows_generates_each_row_as_alone(demo_dir, photo):
    """AutoProcessor + AutoModelForImageTextToText + generate on a left-padded batch: each row as if run alone."""
    from transformers import AutoModelForImageTextToText

    processor = AutoProcessor.from_pretrained(demo_dir)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(demo_dir, dtype=torch.float32).eval()
    image = Image.open(photo).convert("RGB")
    chats = [
        chat(image),
        [{"role": "user", "content": [{"type": "text", "text": "A question with no picture at all, and longer."}]}],
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "image", "image": image}]}],
    ]

    def run(batch):
        inputs = processor.apply_chat_template(
            batch, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
        )
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        return ids[:, inputs["input_ids"].shape[1] :].tolist()

    together = run(chats)
    assert together == [run([one])[0] for one in chats]
