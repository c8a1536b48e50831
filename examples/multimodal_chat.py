"""Ask Qwen3.5 about an image and a video through the plain transformers API, fully offline.

With no argument the checkpoint is the tiny demo one (built on the spot, RANDOM weights: the answers are gibberish,
but every step is the real one: official processor files, AutoProcessor, placeholder expansion, 3-D positions,
generate). Pass a real checkpoint directory (or a Hub id such as Qwen/Qwen3.5-0.8B, with network) for real answers:

    python examples/multimodal_chat.py
    python examples/multimodal_chat.py /path/to/Qwen3.5-0.8B

Video needs torchvision (matched to your torch); without it the video part prints the processor's message and the
image part still runs.
"""

import sys
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

import transformers_qwen35  # noqa: F401  (registers the Qwen3.5 classes, including the processor)
from transformers_qwen35.cli.demo import build_demo_checkpoint


def make_picture() -> Image.Image:
    """A 320x240 drawing: a red sun over a blue sea (stand-in for a photo, so the example needs no files)."""
    picture = Image.new("RGB", (320, 240), (135, 206, 235))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((0, 150, 320, 240), fill=(20, 60, 160))
    draw.ellipse((200, 30, 260, 90), fill=(230, 40, 30))
    return picture


def make_video(frames: int = 8) -> list[np.ndarray]:
    """A ball moving left to right, as a list of RGB frames."""
    clip = []
    for index in range(frames):
        frame = Image.new("RGB", (160, 120), (255, 255, 255))
        x = 10 + index * 16
        ImageDraw.Draw(frame).ellipse((x, 50, x + 20, 70), fill=(0, 120, 0))
        clip.append(np.asarray(frame))
    return clip


def ask(model, processor, content: list[dict], max_new_tokens: int = 16) -> tuple[str, dict]:
    messages = [{"role": "user", "content": content}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    reply = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    return reply, inputs


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        if len(sys.argv) > 1:
            model_path = sys.argv[1]
        else:
            model_path = str(build_demo_checkpoint(scratch))
            print("(demo checkpoint with RANDOM weights: expect gibberish)\n")
        processor = AutoProcessor.from_pretrained(model_path)
        model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32).eval()
        print(f"processor: {type(processor).__name__}, model: {type(model).__name__}\n")

        question = "What is in this picture?"
        reply, inputs = ask(
            model, processor, [{"type": "image", "image": make_picture()}, {"type": "text", "text": question}]
        )
        tokens = int((inputs["mm_token_type_ids"] == 1).sum())
        print(f"image grid {inputs['image_grid_thw'].tolist()[0]} -> {tokens} image tokens")
        print(f"user:      [image] {question}\nassistant: {reply!r}\n")

        question = "What does the ball do?"
        try:
            reply, inputs = ask(
                model, processor, [{"type": "video", "video": make_video()}, {"type": "text", "text": question}]
            )
        except ImportError as error:
            print(f"video skipped: {error}")
            return
        print(
            f"video grid {inputs['video_grid_thw'].tolist()[0]} -> {int((inputs['mm_token_type_ids'] == 2).sum())} video tokens"
        )
        print(f"user:      [video] {question}\nassistant: {reply!r}")


if __name__ == "__main__":
    main()
