"""``Qwen3_5Processor``: text, images and videos in, the model's inputs out.

It is transformers' own ``Qwen3VLProcessor`` (the class the official checkpoints name), with what Qwen3.5 users hit:

* it builds without torchvision: images go through the PIL image processor, and only video needs torchvision, which
  is asked for in one clear message when a video is given;
* it defaults to the official Qwen3.5 values (patch 16, temporal patch 2, merge 2, mean = std = 0.5, the pixel
  bounds), never to the Qwen2-VL class defaults (patch 14, CLIP statistics), when a folder lacks the JSON files;
* bad input (unreadable or empty images, a video shorter than the temporal patch, placeholder counts that do not
  match the media) fails before any pixel is resized, with what to do about it;
* it always returns ``mm_token_type_ids`` (0 text, 1 image, 2 video), which the model's 3-D positions use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.utils import logging

from ..model.checkpoint import read_checkpoint_json
from .media import MediaPolicy, open_image, to_8bit
from .template import get_chat_template, thinking_default_for

logger = logging.get_logger(__name__)

# From the official preprocessor_config.json and video_preprocessor_config.json of Qwen/Qwen3.5-*.
OFFICIAL_IMAGE_PROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
OFFICIAL_VIDEO_PROCESSOR = {
    **OFFICIAL_IMAGE_PROCESSOR,
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "fps": 2,
    "min_frames": 4,
    "max_frames": 768,
    "do_sample_frames": True,
}
IMAGE_CONFIG_FILE = "preprocessor_config.json"
VIDEO_CONFIG_FILE = "video_preprocessor_config.json"
VIDEO_NEEDS_TORCHVISION = (
    "Video input needs torchvision, which transformers' Qwen3-VL video processor is built on, and it is not "
    "importable here{reason}. Install the torchvision build that matches your torch (for example "
    "`pip install torch==2.14.1 torchvision==0.29.1`), or pass the frames you want as separate images."
)


def _image_processor_class():
    """The PIL-backed image processor where transformers has one (5.23+), else the classic one (no torchvision)."""
    import transformers

    return getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor


def _video_processor_class():
    """transformers' Qwen3-VL video processor, or the reason it cannot be used here."""
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        return None, " (torchvision is not installed)"
    try:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    except Exception as error:  # a torchvision built for another torch fails here
        return None, f" ({type(error).__name__}: {error})"
    return Qwen3VLVideoProcessor, ""


def default_image_processor(**overrides):
    return _image_processor_class()(**{**OFFICIAL_IMAGE_PROCESSOR, **overrides})


def default_video_processor(**overrides):
    video_class, _ = _video_processor_class()
    return None if video_class is None else video_class(**{**OFFICIAL_VIDEO_PROCESSOR, **overrides})


class Qwen3_5Processor(Qwen3VLProcessor):
    """Tokenizer + image processor + (optional) video processor for Qwen3.5; see the module docstring."""

    def __init__(self, image_processor=None, tokenizer=None, video_processor=None, chat_template=None, **kwargs):
        if tokenizer is None:
            raise ValueError("Qwen3_5Processor needs a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...).")
        image_processor = image_processor if image_processor is not None else default_image_processor()
        chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, video_processor, chat_template=chat_template, **kwargs)
        # What images named in messages may be (URLs, local paths) and how long a download may take: media.py.
        self.media_policy = MediaPolicy.from_env()

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None  # images only: no torchvision here
        return super().check_argument_for_proper_class(argument_name, argument)

    # ---------------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Tokenizer, image and video processors from a checkpoint folder or Hub id, official values where absent."""
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        image_config = read_checkpoint_json(pretrained_model_name_or_path, IMAGE_CONFIG_FILE, hub_kwargs)
        video_config = read_checkpoint_json(pretrained_model_name_or_path, VIDEO_CONFIG_FILE, hub_kwargs)
        image_processor = default_image_processor(**_processor_values(image_config, OFFICIAL_IMAGE_PROCESSOR))
        video_processor = default_video_processor(**_processor_values(video_config, OFFICIAL_VIDEO_PROCESSOR))
        chat_template = kwargs.get("chat_template") or tokenizer.chat_template
        if chat_template is None:  # a base model or a fine-tune without one: the Qwen3.5 format for its size
            config = read_checkpoint_json(pretrained_model_name_or_path, "config.json", hub_kwargs)
            chat_template = get_chat_template(thinking_default_for(config))
        return cls(image_processor, tokenizer, video_processor, chat_template=chat_template)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Saved the way the official repos are laid out, naming this class so ``AutoProcessor`` finds it again."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        if isinstance(self.chat_template, str):
            (directory / "chat_template.jinja").write_text(self.chat_template)
        image = self.image_processor.to_dict()
        image.update(processor_class=type(self).__name__)
        (directory / IMAGE_CONFIG_FILE).write_text(json.dumps(image, indent=2, sort_keys=True, default=str) + "\n")
        video = self.video_processor.to_dict() if self.video_processor is not None else dict(OFFICIAL_VIDEO_PROCESSOR)
        video.setdefault("video_processor_type", "Qwen3VLVideoProcessor")
        video.update(processor_class=type(self).__name__)
        (directory / VIDEO_CONFIG_FILE).write_text(json.dumps(video, indent=2, sort_keys=True, default=str) + "\n")
        return [str(directory / IMAGE_CONFIG_FILE)]

    def to_dict(self):
        return {"processor_class": type(self).__name__, "has_video_processor": self.video_processor is not None}

    # ---------------------------------------------------------------------------------------------------- calling

    def apply_chat_template(self, conversation, *args, **kwargs):
        """transformers' ``apply_chat_template``, also taking tool calls in the OpenAI wire format, whose
        ``arguments`` are a JSON string (the template needs the mapping)."""
        return super().apply_chat_template(_decoded_tool_arguments(conversation), *args, **kwargs)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        _check_encodable(text)
        images = _check_images(images, self.media_policy)
        videos = self._check_videos(videos)
        _check_placeholder_counts(text, images, videos, self.image_token, self.video_token)
        try:
            return super().__call__(images=images, text=text, videos=videos, **kwargs)
        except ValueError as error:
            # A video file's frame count is only known once decoded: translate transformers' message.
            if "temporal_factor" not in str(error):
                raise
            needed = self.video_processor.temporal_patch_size
            raise ValueError(
                f"A video has fewer frames than the temporal patch of {needed} once sampled ({error}): use a longer "
                "clip, or pass its single frame as an image."
            ) from error

    def _check_videos(self, videos):
        """Frame counts first (cheap, and wrong whatever is installed), then whether video can be read at all."""
        if videos is None or (isinstance(videos, (list, tuple)) and len(videos) == 0):
            return None
        items = _list_videos(videos)
        for index, video in enumerate(items):
            if isinstance(video, (str, os.PathLike)):
                remote = str(video).startswith(("http://", "https://"))
                if not (self.media_policy.allow_remote if remote else self.media_policy.allow_local):
                    where = "video URLs" if remote else "local video paths"
                    raise ValueError(f"Video {index}: {where} are turned off here (processor.media_policy).")
        needed = getattr(self.video_processor, "temporal_patch_size", OFFICIAL_VIDEO_PROCESSOR["temporal_patch_size"])
        for index, video in enumerate(items):
            if isinstance(video, (str, os.PathLike)):
                continue  # counted once decoded (see __call__)
            frames = len(video) if isinstance(video, (list, tuple)) else np.asarray(video).shape[0]
            if frames < needed:
                raise ValueError(
                    f"Video {index} has {frames} frame(s), fewer than the temporal patch of {needed}: give at least "
                    f"{needed} frames, or pass a single frame as an image."
                )
        if self.video_processor is None:
            _, reason = _video_processor_class()
            raise ImportError(VIDEO_NEEDS_TORCHVISION.format(reason=reason))
        return videos


def _decoded_tool_arguments(conversation):
    """A copy of the conversation(s) with JSON-string tool-call arguments decoded; the input is left as it was."""
    if not isinstance(conversation, (list, tuple)):
        return conversation
    if conversation and isinstance(conversation[0], (list, tuple)):  # a batch of conversations
        return [_decoded_tool_arguments(item) for item in conversation]
    decoded = []
    for message in conversation:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if calls and isinstance(calls, list):
            message = {**message, "tool_calls": [_decoded_call(call) for call in calls]}
        decoded.append(message)
    return decoded


def _decoded_call(call):
    if not isinstance(call, dict):
        return call
    if isinstance(call.get("function"), dict):
        return {**call, "function": _decoded_call(call["function"])}
    arguments = call.get("arguments")
    if not isinstance(arguments, str):
        return call
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError as error:
        raise ValueError(
            f"Tool call {call.get('name')!r}: its arguments are a string that is not JSON ({error}): give a JSON "
            "object (the OpenAI format) or a mapping."
        ) from None
    if not isinstance(value, dict):
        raise ValueError(
            f"Tool call {call.get('name')!r}: its arguments must be a JSON object, got {arguments[:60]!r}."
        )
    return {**call, "arguments": value}


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code")
# Keys of the JSON files that are bookkeeping, not processor settings.
_NOT_SETTINGS = {"processor_class", "image_processor_type", "video_processor_type", "auto_map", "_processor_class"}


def _processor_values(saved: dict, official: dict) -> dict:
    if not saved:
        return {}
    values = {key: value for key, value in saved.items() if key not in _NOT_SETTINGS}
    # older files carry min_pixels / max_pixels beside size; size wins, as in transformers
    return {key: value for key, value in values.items() if key in official or key in ("min_pixels", "max_pixels")}


def _is_frame(item) -> bool:
    """A single frame (PIL image or array), as opposed to a video (path or list of frames)."""
    from PIL import Image

    return isinstance(item, Image.Image) or (hasattr(item, "shape") and len(item.shape) == 3)


def _flatten(images):
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten(item)]
    return [images]


def _check_images(images, policy: MediaPolicy):
    """Open paths and URLs (within ``policy``) and reject images that cannot be processed, before any resizing."""
    if images is None:
        return None
    from PIL import Image

    def load(image, index):
        if isinstance(image, (str, os.PathLike)):
            image = open_image(str(image), index, policy)
        image = to_8bit(image, index)
        if isinstance(image, Image.Image):
            if image.width == 0 or image.height == 0:
                raise ValueError(f"Image {index} is empty ({image.width}x{image.height} pixels).")
            return image
        shape = tuple(getattr(image, "shape", ()))
        if len(shape) not in (2, 3) or 0 in shape:
            raise ValueError(
                f"Image {index} has shape {shape}: give an (H, W, 3) or (3, H, W) array, a PIL image, a path or a URL."
            )
        if len(shape) == 3 and 3 not in (shape[0], shape[-1]):
            raise ValueError(
                f"Image {index} has shape {shape}: Qwen3.5 takes RGB images with 3 channels. Convert it first, e.g. "
                "PIL.Image.fromarray(array).convert('RGB')."
            )
        values = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
        if len(shape) == 2:  # greyscale (H, W): the same grey in each channel, as PIL's convert("RGB") does
            values = np.repeat(values[..., None], 3, axis=-1)
        if values.shape[-1] == 3 and values.shape[0] != 3 and values.dtype == np.uint8:
            # Unambiguously channels-last: as a PIL image, so that transformers does not guess the layout (a
            # (1, W, 3) array reads as one channel of width 3 to its inference).
            return Image.fromarray(values)
        return values if len(shape) == 2 else image

    def walk(item, counter):
        if isinstance(item, (list, tuple)):
            return type(item)(walk(inner, counter) for inner in item)
        counter.append(None)
        return load(item, len(counter) - 1)

    return walk(images, [])


def _check_encodable(text) -> None:
    """Lone surrogates (what Python makes of bytes that are not UTF-8) cannot be tokenized: name them."""
    texts = [text] if isinstance(text, str) else text if isinstance(text, (list, tuple)) else []
    for index, item in enumerate(texts):
        if isinstance(item, str):
            bad = next((i for i, ch in enumerate(item) if 0xD800 <= ord(ch) <= 0xDFFF), None)
            if bad is not None:
                raise ValueError(
                    f"Text {index} is not valid Unicode text: character {bad + 1} is a lone surrogate "
                    f"(U+{ord(item[bad]):04X}), typically bytes that were not UTF-8. Decode the input as UTF-8 first."
                )


def _check_placeholder_counts(text, images, videos, image_token, video_token):
    if text is None:
        return
    texts = [text] if isinstance(text, str) else list(text)
    if not all(isinstance(item, str) for item in texts):
        return
    for token, media, name in ((image_token, images, "image"), (video_token, videos, "video")):
        placeholders = sum(item.count(token) for item in texts)
        count = len(_flatten(media)) if name == "image" else _count_videos(media)
        if placeholders != count:
            raise ValueError(
                f"The text has {placeholders} {token} placeholder(s) but {count} {name}(s) were given. Put one "
                f"{token} (or a chat message part of type '{name}') in the text for every {name}; "
                "processor.apply_chat_template writes them for you."
            )


def _list_videos(videos) -> list:
    """The videos in any accepted nesting (batch of samples, videos per sample): each a path, frames or an array."""
    if videos is None:
        return []
    if isinstance(videos, (str, os.PathLike)) or len(getattr(videos, "shape", ())) == 4:
        return [videos]
    if _is_frame(videos):
        return [[videos]]
    if isinstance(videos, (list, tuple)):
        if videos and all(_is_frame(item) for item in videos):
            return [videos]
        return [video for item in videos for video in _list_videos(item)]
    return [videos]


def _count_videos(videos) -> int:
    return len(_list_videos(videos))
