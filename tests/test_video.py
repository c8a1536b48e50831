"""Video end to end: our processor against transformers' own Qwen3VLProcessor, placeholder expansion, a video file
through apply_chat_template / generate / the image-text-to-text pipeline, model parity with built-in transformers.

Needs torchvision (transformers' Qwen3-VL video processor is built on it); the whole module is skipped without it.
Decoding a video *file* also needs a decoder that transformers 5.24 accepts (torchcodec with FFmpeg, or a torchvision
older than 0.26); those tests are skipped without one. Expected values come from the reference (§3.4 of
chat-tokenizer-processor.md) worked out by hand, or from built-in transformers, never from our own code.
"""

from __future__ import annotations

import re

import pytest

try:  # not installed, or a torchvision built for another torch (which raises at import, not always ImportError)
    import torchvision  # noqa: F401
except Exception as error:  # pragma: no cover - depends on the environment
    pytest.skip(f"video needs torchvision ({type(error).__name__}: {error})", allow_module_level=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import relative_error  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Qwen2VLImageProcessorPil,
    pipeline,
)
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor  # noqa: E402
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor  # noqa: E402

from transformers_qwen35 import Qwen3_5ForConditionalGeneration  # noqa: E402
from transformers_qwen35.chat.processing import (  # noqa: E402
    OFFICIAL_IMAGE_PROCESSOR,
    OFFICIAL_VIDEO_PROCESSOR,
    Qwen3_5Processor,
)
from transformers_qwen35.cli.demo import build_demo_checkpoint  # noqa: E402

VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROCESSOR_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw")


def _can_decode_video_files() -> bool:
    """What transformers 5.24's video processor accepts for files: torchcodec, else torchvision's removed read_video."""
    try:
        from transformers.utils.import_utils import is_torchcodec_usable

        if is_torchcodec_usable(decode="video"):
            return True
    except Exception:
        pass
    try:
        from transformers.video_utils import is_torchvision_video_decoding_available

        return bool(is_torchvision_video_decoding_available())
    except Exception:
        return False


needs_file_decoding = pytest.mark.skipif(
    not _can_decode_video_files(), reason="decoding a video file needs torchcodec (with FFmpeg) in transformers 5.24"
)


# ------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo"), seed=5)


@pytest.fixture(scope="module")
def processor(demo_dir):
    processor = AutoProcessor.from_pretrained(demo_dir)
    assert type(processor) is Qwen3_5Processor
    assert type(processor.video_processor) is Qwen3VLVideoProcessor
    return processor


@pytest.fixture(scope="module")
def builtin_processor(demo_dir, processor):
    """transformers' own Qwen3VLProcessor from the same tokenizer files, the PIL image processor and the official
    video values: what a user of built-in transformers builds by hand."""
    return Qwen3VLProcessor(
        Qwen2VLImageProcessorPil(**OFFICIAL_IMAGE_PROCESSOR),
        AutoTokenizer.from_pretrained(demo_dir),
        Qwen3VLVideoProcessor(**OFFICIAL_VIDEO_PROCESSOR),
        chat_template=processor.chat_template,
    )


@pytest.fixture(scope="module")
def frames():
    """8 RGB frames of 120x160, as numpy arrays."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(8)]


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8))


def write_mp4(path, num_frames: int, fps: int = 8, height: int = 128, width: int = 160):
    """A short clip written with PyAV: a white bar that moves right over green noise."""
    av = pytest.importorskip("av")
    rng = np.random.default_rng(2)
    for codec in ("libx264", "mpeg4"):
        try:
            with av.open(str(path), "w") as container:
                stream = container.add_stream(codec, rate=fps)
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                for index in range(num_frames):
                    pixels = np.zeros((height, width, 3), dtype=np.uint8)
                    pixels[..., 1] = rng.integers(0, 256, (height, width))
                    left = (index * 10) % (width - 20)
                    pixels[:, left : left + 20] = 255
                    for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
        except Exception:  # this PyAV build lacks the codec: try the next one
            continue
        with av.open(str(path)) as container:
            assert sum(1 for _ in container.decode(video=0)) == num_frames
        return path
    pytest.skip("PyAV can encode neither libx264 nor mpeg4 here")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """16 frames at 8 fps: 2 seconds of 128x160 video."""
    return write_mp4(tmp_path_factory.mktemp("media") / "clip.mp4", num_frames=16)


def video_chat(video, question="What happens in the video?", image=None):
    content = [{"type": "video", "video": video}]
    if image is not None:
        content.append({"type": "image", "image": image})
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def native_module():
    """Built-in transformers' Qwen3.5 modeling module (conftest points it at its PyTorch ops where triton would
    break it on a CPU machine)."""
    from transformers.models.qwen3_5 import modeling_qwen3_5

    return modeling_qwen3_5


@pytest.fixture(scope="module")
def models(demo_dir, native_module):
    ours = AutoModelForImageTextToText.from_pretrained(demo_dir, dtype=torch.float32).eval()
    native = native_module.Qwen3_5ForConditionalGeneration.from_pretrained(demo_dir, dtype=torch.float32).eval()
    assert type(ours) is Qwen3_5ForConditionalGeneration
    assert type(native) is not type(ours)
    return ours, native


def token_id(processor, token: str) -> int:
    return processor.tokenizer.convert_tokens_to_ids(token)


# ------------------------------------------------------------------------------------------------- official values


def test_official_video_values_are_the_reference_ones(processor):
    """The reference table: 2 fps, 4..768 frames, 4,096..25,165,824 pixels, patch 16, temporal patch 2, merge 2,
    mean = std = 0.5; and the loaded processor uses them (the demo files name transformers' Qwen3VLProcessor)."""
    video = processor.video_processor
    assert (video.fps, video.min_frames, video.max_frames, video.do_sample_frames) == (2, 4, 768, True)
    assert (video.size["shortest_edge"], video.size["longest_edge"]) == (4096, 25165824)
    assert (video.patch_size, video.temporal_patch_size, video.merge_size) == (16, 2, 2)
    assert list(video.image_mean) == [0.5] * 3 and list(video.image_std) == [0.5] * 3


# ------------------------------------------------------------------------------------- a. equal to built-in processor


def test_video_frames_give_the_builtin_processor_outputs(processor, builtin_processor, frames):
    text = [f"Watch {VIDEO} now."]
    metadata = [{"fps": 1, "total_num_frames": len(frames)}]
    ours = processor(text=text, videos=[frames], video_metadata=metadata, return_tensors="pt")
    theirs = builtin_processor(text=text, videos=[frames], video_metadata=metadata, return_tensors="pt")
    for key in PROCESSOR_KEYS:
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["video_grid_thw"].tolist() == [[4, 8, 10]]  # 8 frames -> 4 pairs; 120x160 -> 128x160 -> 8x10 patches


def test_builtin_auto_processor_from_the_checkpoint_files_agrees(demo_dir, processor, frames, monkeypatch):
    """The processor built-in transformers loads from the same files (routing switched off) gives the same inputs."""
    monkeypatch.setenv("TRANSFORMERS_QWEN35_PROCESSOR", "builtin")
    builtin = AutoProcessor.from_pretrained(demo_dir)
    assert type(builtin) is Qwen3VLProcessor
    text = [f"{VIDEO} What happens?"]
    metadata = [{"fps": 4, "total_num_frames": len(frames)}]
    ours = processor(text=text, videos=[frames], video_metadata=metadata, return_tensors="pt")
    theirs = builtin(text=text, videos=[frames], video_metadata=metadata, return_tensors="pt")
    for key in PROCESSOR_KEYS:
        assert torch.equal(ours[key], theirs[key]), key


def test_video_with_an_image_and_a_batch_give_the_builtin_outputs(processor, builtin_processor, frames, photo):
    texts = [f"A picture {IMAGE} and a clip {VIDEO}.", "Only text in this row."]
    kwargs = dict(
        images=[photo],
        videos=[frames[:6]],
        video_metadata=[{"fps": 3, "total_num_frames": 6}],
        return_tensors="pt",
        padding=True,
    )
    ours = processor(text=texts, **kwargs)
    theirs = builtin_processor(text=list(texts), **kwargs)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


# -------------------------------------------------------------------------------------- b. placeholder expansion


def test_placeholder_expansion_timestamps_and_groups(processor, frames):
    """8 frames at 1 fps: 2 fps sampling keeps all 8 (int(8 / 1 * 2) = 16, capped at the 8 available), pairs (0,1),
    (2,3), (4,5), (6,7) at t = index / 1 s, so the group timestamps are the pair means 0.5, 2.5, 4.5, 6.5 s; each
    group is <t seconds><|vision_start|> + h*w/4 = 8*10/4 = 20 pads + <|vision_end|>."""
    out = processor(text=[f"Watch {VIDEO} now."], videos=[frames], video_metadata=[{"fps": 1, "total_num_frames": 8}])
    ids = list(out["input_ids"][0])
    t, h, w = out["video_grid_thw"][0].tolist()
    start, pad, end = (token_id(processor, name) for name in ("<|vision_start|>", "<|video_pad|>", "<|vision_end|>"))

    assert ids.count(pad) == t * h * w // 4 == 80
    groups = [i for i in range(len(ids) - 1) if ids[i] == start and ids[i + 1] == pad]
    assert len(groups) == t == 4
    for i in groups:  # every group is one unbroken run of h*w/4 pads closed by <|vision_end|>
        assert ids[i + 1 : i + 1 + h * w // 4] == [pad] * (h * w // 4) and ids[i + 1 + h * w // 4] == end
    assert list(np.asarray(out["mm_token_type_ids"][0])) == [2 if token == pad else 0 for token in ids]

    text = processor.tokenizer.decode(ids).replace("<|video_pad|>" * (h * w // 4), "<pads>")
    stamps = re.findall(r"<(\d+(?:\.\d+)?) seconds>", text)
    assert stamps == ["0.5", "2.5", "4.5", "6.5"]
    assert [float(s) for s in stamps] == sorted(float(s) for s in stamps)
    group = "<{} seconds><|vision_start|><pads><|vision_end|>"
    # transformers >= 5 expands only the <|video_pad|> and keeps the template's own <|vision_start|> ... <|vision_end|>
    # around the groups (the reference §3.4 describes the 4.x layout, which replaced the whole triple)
    expanded = "<|vision_start|>" + "".join(group.format(s) for s in stamps) + "<|vision_end|>"
    assert text == f"Watch {expanded} now."


def test_sampling_at_two_frames_per_second(processor, frames):
    """8 frames at 4 fps (2 s): int(8 / 4 * 2) = 4 frames, indices round(linspace(0, 7, 4)) = 0, 2, 5, 7 at 0, 0.5,
    1.25, 1.75 s: 2 groups at 0.25 and 1.5 s (formatted '%.1f': 0.2 and 1.5), pixels from frames 0, 2, 5, 7."""
    out = processor(
        text=[VIDEO], videos=[frames], video_metadata=[{"fps": 4, "total_num_frames": 8}], return_tensors="pt"
    )
    assert out["video_grid_thw"].tolist() == [[2, 8, 10]]
    text = processor.tokenizer.decode(out["input_ids"][0])
    assert re.findall(r"<([\d.]+) seconds>", text) == [f"{0.25:.1f}", "1.5"]
    chosen = [frames[i] for i in (0, 2, 5, 7)]
    direct = processor(
        text=[VIDEO], videos=[chosen], video_metadata=[{"fps": 2, "total_num_frames": 4}], return_tensors="pt"
    )
    assert torch.equal(direct["pixel_values_videos"], out["pixel_values_videos"])


# ------------------------------------------------------------------------------------------------ c. a video file


@needs_file_decoding
def test_video_file_through_the_chat_template_and_generate(processor, demo_dir, clip):
    """16 frames at 8 fps (2 s): int(16 / 8 * 2) = 4 frames sampled, indices 0, 5, 10, 15 at 0, 0.625, 1.25,
    1.875 s -> groups at 0.3125 and 1.5625 s ('<0.3 seconds>', '<1.6 seconds>'); 128x160 -> 8x10 patches."""
    inputs = processor.apply_chat_template(
        video_chat(str(clip)), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["video_grid_thw"].tolist() == [[2, 8, 10]]
    assert inputs["pixel_values_videos"].shape == (2 * 8 * 10, 3 * 2 * 16 * 16)
    pad = token_id(processor, "<|video_pad|>")
    assert int((inputs["input_ids"] == pad).sum()) == 2 * 8 * 10 // 4
    assert torch.equal(inputs["mm_token_type_ids"], 2 * (inputs["input_ids"] == pad).long())
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert re.findall(r"<([\d.]+) seconds>", text) == ["0.3", "1.6"]
    assert text.endswith("What happens in the video?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")

    model = AutoModelForImageTextToText.from_pretrained(demo_dir, dtype=torch.float32)
    assert type(model) is Qwen3_5ForConditionalGeneration
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 4  # the demo's eos is unlikely but would stop it early
    assert torch.equal(ids[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@needs_file_decoding
def test_video_file_through_the_pipeline(processor, demo_dir, clip):
    pipe = pipeline("image-text-to-text", model=str(demo_dir))
    assert type(pipe.processor) is Qwen3_5Processor
    assert type(pipe.model) is Qwen3_5ForConditionalGeneration
    outputs = pipe(text=video_chat(str(clip)), max_new_tokens=4)
    answer = outputs[0]["generated_text"][-1]
    assert answer["role"] == "assistant"

    # the same tokens as the model generates from the processor's own inputs
    inputs = processor.apply_chat_template(
        video_chat(str(clip)), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    model = AutoModelForImageTextToText.from_pretrained(demo_dir, dtype=pipe.model.dtype)
    with torch.no_grad():
        ids = model.generate(**inputs.to(pipe.model.dtype), max_new_tokens=4, do_sample=False)
    expected = processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer["content"] == expected


# --------------------------------------------------------------------------------------- d. model parity with video


def test_video_image_text_logits_and_generation_match_builtin(processor, models, frames, photo):
    ours, native = models
    chat = video_chat(frames, question="Compare the clip with the picture.", image=photo)
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt.count(VIDEO) == 1 and prompt.count(IMAGE) == 1
    inputs = processor(
        text=[prompt],
        images=[photo],
        videos=[frames],
        video_metadata=[{"fps": 2, "total_num_frames": len(frames)}],
        return_tensors="pt",
    )
    assert inputs["video_grid_thw"].tolist() == [[4, 8, 10]] and inputs["image_grid_thw"].tolist() == [[1, 14, 20]]

    with torch.no_grad():
        theirs = native(**inputs).logits
        mine = ours(**inputs).logits
        blank = ours(**{**inputs, "pixel_values_videos": torch.zeros_like(inputs["pixel_values_videos"])}).logits
    error = relative_error(mine, theirs)
    print(f"video+image+text logits: relative error {error:.3e}, max |logit| {float(theirs.abs().max()):.3f}")
    assert error < 1e-5
    assert relative_error(blank, theirs) > 1e-3  # the video pixels do reach the logits

    with torch.no_grad():
        mine_ids = ours.generate(**inputs, max_new_tokens=6, do_sample=False)
        their_ids = native.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert mine_ids.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(mine_ids, their_ids)


# ------------------------------------------------------------------------------------------ e. too short a video


@pytest.mark.parametrize(
    "make_video",
    [
        lambda frame: [frame],  # a list of one frame
        lambda frame: frame[None],  # a (1, H, W, 3) array
        lambda frame: [Image.fromarray(frame)],  # one PIL frame
    ],
    ids=["list", "array", "pil"],
)
def test_one_frame_video_is_refused_naming_the_temporal_patch(processor, frames, make_video):
    video = make_video(frames[0])
    with pytest.raises(ValueError, match="1 frame.*temporal patch of 2"):
        processor(text=[VIDEO], videos=[video])
    with pytest.raises(ValueError, match="1 frame.*temporal patch of 2"):
        processor.apply_chat_template(video_chat(video), tokenize=True, return_dict=True, return_tensors="pt")


@needs_file_decoding
def test_one_frame_video_file_is_refused_naming_the_temporal_patch(processor, tmp_path):
    path = write_mp4(tmp_path / "one.mp4", num_frames=1)
    with pytest.raises(ValueError, match="temporal patch"):
        processor.apply_chat_template(video_chat(str(path)), tokenize=True, return_dict=True, return_tensors="pt")


def test_two_frames_are_enough(processor, frames):
    out = processor(text=[VIDEO], videos=[frames[:2]], video_metadata=[{"fps": 2, "total_num_frames": 2}])
    assert out["video_grid_thw"].tolist() == [[1, 8, 10]]
