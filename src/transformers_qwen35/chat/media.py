"""Where message images come from, and what a server lets them come from.

Chat messages may name an image by URL, local path or ``data:`` URI; the processor opens it. A server that exposes
the processor to its users decides what that may touch: ``MediaPolicy`` on ``processor.media_policy`` (or the
environment variables below, read when a processor is built, for servers that build it themselves, such as
``transformers serve``):

==========================================  ========  ===========================================================
``TRANSFORMERS_QWEN35_REMOTE_MEDIA=0``      ``1``     refuse http(s) URLs
``TRANSFORMERS_QWEN35_LOCAL_MEDIA=0``       ``1``     refuse local paths (``file`` names on the server's disk)
``TRANSFORMERS_QWEN35_MEDIA_TIMEOUT=S``     ``20``    seconds a URL may make us wait, at once and in all
``TRANSFORMERS_QWEN35_MEDIA_MAX_BYTES=N``   64 MiB    largest download or ``data:`` payload
==========================================  ========  ===========================================================

Images are also brought to 8-bit RGB the way their values mean it: 16-bit PNGs are scaled down (converting them
directly clips to white) and float arrays in [0, 1] are scaled up (the image processor would read them as 0-255
values and see black).
"""

from __future__ import annotations

import base64
import io
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REMOTE_ENV = "TRANSFORMERS_QWEN35_REMOTE_MEDIA"
LOCAL_ENV = "TRANSFORMERS_QWEN35_LOCAL_MEDIA"
TIMEOUT_ENV = "TRANSFORMERS_QWEN35_MEDIA_TIMEOUT"
MAX_BYTES_ENV = "TRANSFORMERS_QWEN35_MEDIA_MAX_BYTES"
_READ_CHUNK = 1 << 16


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def _env_number(name: str, default: float, kind=float):
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number.") from None
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {text!r}.")
    return value


@dataclass
class MediaPolicy:
    """What images named in messages may be: remote (http/https), local files, and how long / large a download."""

    allow_remote: bool = True
    allow_local: bool = True
    timeout_s: float = 20.0
    max_bytes: int = 64 * 2**20
    user_agent: str = field(default="transformers-qwen35", repr=False)

    @classmethod
    def from_env(cls) -> MediaPolicy:
        return cls(
            allow_remote=_env_flag(REMOTE_ENV),
            allow_local=_env_flag(LOCAL_ENV),
            timeout_s=_env_number(TIMEOUT_ENV, cls.timeout_s),
            max_bytes=_env_number(MAX_BYTES_ENV, cls.max_bytes, int),
        )


def open_image(source: str, index: int, policy: MediaPolicy):
    """The PIL image a message names: an http(s) URL, a ``data:image/...`` URI or a local path, within ``policy``.
    Every failure is a ValueError that names the image and what to do."""
    from PIL import Image

    if source.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise ValueError(
                f"Image {index}: image URLs are turned off here (media_policy.allow_remote is False / {REMOTE_ENV}=0): "
                "send the image itself (a data: URI or the bytes) instead of a link."
            )
        data = _download(source, index, policy)
    elif source.startswith("data:"):
        data = _decode_data_uri(source, index, policy)
    else:
        if not policy.allow_local:
            raise ValueError(
                f"Image {index}: local file paths are turned off here (media_policy.allow_local is False / "
                f"{LOCAL_ENV}=0): send the image itself (a data: URI) instead of a path."
            )
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(
                f"Image {index}: no file at {source!r}. Give an existing path, an http(s) URL or a PIL image."
            )
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ValueError(f"Image {index}: cannot read {source!r} ({error.strerror or error}).") from None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:
        raise ValueError(
            f"Image {index}: {source[:100]!r} is not an image PIL can read ({type(error).__name__}: {error})."
        ) from None
    return image


def _download(url: str, index: int, policy: MediaPolicy) -> bytes:
    """The body of ``url``, within the policy's size and time: no single wait (connect, each read) longer than
    ``timeout_s``, and no read started after ``timeout_s`` in all (a server dripping bytes is cut off)."""
    deadline = time.monotonic() + policy.timeout_s
    request = urllib.request.Request(url, headers={"User-Agent": policy.user_agent})
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                raise _too_large(index, url, int(length), policy)
            pieces, size = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError()
                piece = response.read(_READ_CHUNK)
                if not piece:
                    return b"".join(pieces)
                size += len(piece)
                if size > policy.max_bytes:
                    raise _too_large(index, url, size, policy)
                pieces.append(piece)
    except TimeoutError:
        raise ValueError(
            f"Image {index}: {url} did not deliver within {policy.timeout_s:g} s; try again, or download it and pass the "
            f"file (the limit is media_policy.timeout_s / {TIMEOUT_ENV})."
        ) from None
    except urllib.error.HTTPError as error:
        raise ValueError(f"Image {index}: {url} answered HTTP {error.code} ({error.reason}).") from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise ValueError(f"Image {index}: {url} did not answer within {policy.timeout_s:g} s.") from None
        raise ValueError(
            f"Image {index}: could not fetch {url} ({reason}) (no network here? download it first and pass the path)."
        ) from None


def _too_large(index: int, url: str, size: int, policy: MediaPolicy) -> ValueError:
    return ValueError(
        f"Image {index}: {url[:100]} is over {policy.max_bytes:,} bytes ({size:,} so far); the limit is "
        f"media_policy.max_bytes / {MAX_BYTES_ENV}."
    )


def _decode_data_uri(uri: str, index: int, policy: MediaPolicy) -> bytes:
    header, _, payload = uri.partition(",")
    if not header.startswith("data:image/") or ";base64" not in header:
        raise ValueError(f"Image {index}: a data: URI must be data:image/<type>;base64,<data>, got {header[:60]!r}.")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise _too_large(index, "the data: URI", len(payload) * 3 // 4, policy)
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise ValueError(f"Image {index}: the data: URI's base64 payload is damaged.") from None


def to_8bit(image, index: int):
    """16-bit and float images as 8-bit values that mean the same brightness (see the module docstring); others
    unchanged."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            values = np.asarray(image).astype(np.float64)
            top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
            return Image.fromarray((values * (255.0 / top)).round().clip(0, 255).astype(np.uint8)).convert("RGB")
        if image.mode == "F":
            return Image.fromarray(_float_to_8bit(np.asarray(image), index)).convert("RGB")
        return image
    array = np.asarray(image) if not hasattr(image, "numpy") else image.detach().cpu().numpy()
    if np.issubdtype(array.dtype, np.floating):
        return _float_to_8bit(array, index)
    if array.dtype == np.uint16:
        return (array.astype(np.float64) * (255.0 / 65535.0)).round().astype(np.uint8)
    return image


def _float_to_8bit(values: np.ndarray, index: int) -> np.ndarray:
    if not np.isfinite(values).all():
        raise ValueError(f"Image {index} holds NaN or infinite values.")
    low, high = float(values.min()), float(values.max())
    if low < 0:
        raise ValueError(
            f"Image {index} holds negative values ({low:g}): give pixel values in [0, 1] or [0, 255], not normalised "
            "ones (the processor normalises)."
        )
    scale = 255.0 if high <= 1.0 else 1.0  # [0, 1] floats, else already 0-255
    return (values * scale).round().clip(0, 255).astype(np.uint8)
