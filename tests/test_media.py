"""Images named in messages (URLs, paths, data: URIs) under the processor's media policy, and images whose values
mean something else than 8-bit RGB. The servers here bind 127.0.0.1 on a free port and stop with the test."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from transformers_qwen35 import Qwen3_5Processor
from transformers_qwen35.chat.media import MediaPolicy
from transformers_qwen35.cli.demo import make_demo_tokenizer

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture
def processor():
    return Qwen3_5Processor(tokenizer=make_demo_tokenizer())


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8))


@contextlib.contextmanager
def serving(handler_body):
    """An HTTP server on 127.0.0.1 (free port) whose GET runs ``handler_body(handler)``; yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            handler_body(self)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def silent_listener():
    """A socket that accepts connections and never answers; yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/cat.png"
    finally:
        listener.close()


def test_an_image_url_is_fetched(processor):
    data = png_bytes(picture())

    def send(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    with serving(send) as url:
        fetched = processor(text=[IMAGE], images=[f"{url}/cat.png"])
    direct = processor(text=[IMAGE], images=[picture()])
    assert np.array_equal(np.asarray(fetched["pixel_values"]), np.asarray(direct["pixel_values"]))


def test_a_server_that_never_answers_times_out(processor):
    processor.media_policy = MediaPolicy(timeout_s=1.0)
    with silent_listener() as url:
        start = time.monotonic()
        with pytest.raises(ValueError, match=r"did not (deliver|answer) within 1 s"):
            processor(text=[IMAGE], images=[url])
    assert time.monotonic() - start < 30  # bounded, not forever (the limit itself is 1 s)


def test_a_download_over_the_size_limit_is_cut_off(processor):
    processor.media_policy = MediaPolicy(max_bytes=10_000)

    def flood(handler):  # no Content-Length: the limit must hold while reading
        handler.send_response(200)
        handler.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(100):
                handler.wfile.write(b"\0" * 4096)

    with serving(flood) as url, pytest.raises(ValueError, match="over 10,000 bytes"):
        processor(text=[IMAGE], images=[f"{url}/big.png"])


def test_a_server_can_refuse_urls_and_local_paths(processor, tmp_path, monkeypatch):
    path = tmp_path / "cat.png"
    picture().save(path)
    processor.media_policy = MediaPolicy(allow_remote=False, allow_local=False)
    with pytest.raises(ValueError, match="image URLs are turned off"):
        processor(text=[IMAGE], images=["http://127.0.0.1:9/cat.png"])
    with pytest.raises(ValueError, match="local file paths are turned off"):
        processor(text=[IMAGE], images=[str(path)])
    # what stays allowed: the image itself, as an object or a data: URI
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(picture())).decode()
    assert processor(text=[IMAGE], images=[uri])["pixel_values"].shape[0] > 0
    # the environment sets the same for processors a server builds itself
    monkeypatch.setenv("TRANSFORMERS_QWEN35_REMOTE_MEDIA", "0")
    monkeypatch.setenv("TRANSFORMERS_QWEN35_MEDIA_TIMEOUT", "3")
    fresh = Qwen3_5Processor(tokenizer=make_demo_tokenizer())
    assert fresh.media_policy.allow_remote is False and fresh.media_policy.allow_local is True
    assert fresh.media_policy.timeout_s == 3.0


def _pixels(processor, image):
    return np.asarray(processor(text=[IMAGE], images=[image])["pixel_values"])


def test_16_bit_pngs_and_float_arrays_mean_what_their_values_say(processor, tmp_path):
    """A 16-bit grey PNG and a float array in [0, 1] give the pixels of the same picture in 8 bits (before: white
    and black)."""
    grey8 = np.random.default_rng(1).integers(0, 256, (40, 48), dtype=np.uint8)
    reference = _pixels(processor, Image.fromarray(grey8).convert("RGB"))
    path = tmp_path / "grey16.png"
    Image.fromarray(grey8.astype(np.uint16) * 257).save(path)  # the same picture, 16 bits
    assert Image.open(path).mode.startswith("I")
    np.testing.assert_allclose(_pixels(processor, str(path)), reference, atol=1e-6)
    rgb8 = np.random.default_rng(2).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    floats = rgb8.astype(np.float32) / 255.0
    np.testing.assert_allclose(_pixels(processor, floats), _pixels(processor, rgb8), atol=1e-6)
    with pytest.raises(ValueError, match="negative values"):
        _pixels(processor, floats - 0.5)


def test_a_greyscale_array_is_an_image_of_grey_pixels(processor):
    grey = np.random.default_rng(4).integers(0, 256, (40, 48), dtype=np.uint8)
    as_rgb = Image.fromarray(grey).convert("RGB")
    np.testing.assert_allclose(_pixels(processor, grey), _pixels(processor, as_rgb), atol=1e-6)
