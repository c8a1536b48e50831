"""qwen35 chat: turns, modes, commands, images, and Ctrl-C stopping an answer but not the program."""

from __future__ import annotations

import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from transformers_qwen35 import parse_response
from transformers_qwen35.cli import main as cli
from transformers_qwen35.cli.demo import build_demo_checkpoint

CPU = ["--device", "cpu", "--dtype", "float32"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo"))


def chat(capsys, monkeypatch, demo_dir, lines: list[str], *options: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = cli.main(["chat", "--model", str(demo_dir), "--max-new-tokens", str(NEW_TOKENS), *CPU, *options])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected_turns(demo_dir, questions: list[tuple[str, bool]], image=None) -> list[dict]:
    """What the chat should answer, computed with the plain transformers API: one parsed reply per question."""
    processor = AutoProcessor.from_pretrained(demo_dir)
    model = AutoModelForImageTextToText.from_pretrained(demo_dir, dtype=torch.float32).eval()
    messages, replies = [], []
    for index, (question, thinking) in enumerate(questions):
        content = [{"type": "text", "text": question}]
        if image is not None and index == 0:
            content.insert(0, {"type": "image", "image": image})
        messages.append({"role": "user", "content": content})
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, enable_thinking=thinking, tokenize=True, return_dict=True,
            return_tensors="pt",
        )  # fmt: skip
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        text = processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
        reply = parse_response(text, thinking=thinking)
        replies.append(reply)
        message = {"role": "assistant", "content": reply["content"]}
        if thinking:
            message["reasoning_content"] = reply["reasoning"]
        messages.append(message)
    return replies


def test_turns_modes_and_commands(capsys, monkeypatch, demo_dir):
    lines = ["Hello there", "/think", "Why is the sky blue?", "/nonsense", "/help", "/exit", "never read"]
    code, out, err = chat(capsys, monkeypatch, demo_dir, lines)
    assert code == 0, err
    first, second = expected_turns(demo_dir, [("Hello there", False), ("Why is the sky blue?", True)])
    assert out.startswith(first["content"])  # non-thinking: the answer only
    assert second["reasoning"] in out  # thinking: the reasoning is shown (plain: stdout is not a terminal)
    assert "thinking off" in err and "thinking on from the next message on" in err
    assert "unknown command /nonsense" in err and "/image PATH" in err
    assert "\x1b[" not in out  # no colour codes when stdout is not a terminal


def test_mtp_drafts_leave_the_answers_unchanged(capsys, monkeypatch, demo_dir):
    lines = ["Hello there", "/think", "Why is the sky blue?"]
    code, out, err = chat(capsys, monkeypatch, demo_dir, lines, "--mtp", "2", "--temperature", "0")
    assert code == 0, err
    plain_code, plain_out, _ = chat(capsys, monkeypatch, demo_dir, lines, "--temperature", "0")
    assert plain_code == 0 and out == plain_out and out.strip()


def test_replies_with_special_tokens_do_not_break_the_next_turn(capsys, monkeypatch, demo_dir):
    """The demo's random model emits vision placeholders within 60 tokens; the history keeps the reply without them,
    so the next turn is not asked for a video (it was, before: "The text has 4 <|video_pad|> placeholder(s)...")."""
    lines = ["Hello", "Again", "More", "/exit"]
    code, out, err = chat(capsys, monkeypatch, demo_dir, lines, "--max-new-tokens", "60", "--temperature", "0")
    assert code == 0, err
    assert "<|video_pad|>" in out  # shown as generated
    assert "error" not in err and "placeholder" not in err
    assert out.count("\n") >= 3  # three answers


def test_hidden_reasoning_and_reset(capsys, monkeypatch, demo_dir):
    lines = ["Why is the sky blue?", "/reset", "Why is the sky blue?"]
    code, out, err = chat(capsys, monkeypatch, demo_dir, lines, "--think", "--hide-reasoning")
    assert code == 0, err  # end of input leaves like Ctrl-D
    (reply,) = expected_turns(demo_dir, [("Why is the sky blue?", True)])
    assert reply["reasoning"] not in out or not reply["reasoning"]
    assert out == 2 * (reply["content"] + "\n")  # after /reset the same question gets the same first answer
    assert "conversation cleared" in err


def test_image_command_attaches_to_the_next_message(capsys, monkeypatch, demo_dir, tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    lines = [f"/image {tmp_path / 'photo.png'}", "What is in it?", "/image /no/such.png"]
    code, out, err = chat(capsys, monkeypatch, demo_dir, lines, "--no-think")
    assert code == 0, err
    (reply,) = expected_turns(demo_dir, [("What is in it?", False)], image=Image.open(tmp_path / "photo.png"))
    assert out == reply["content"] + "\n"
    assert "image attached (80x64)" in err and "no file at '/no/such.png'" in err


def test_chat_needs_a_model_or_the_demo(capsys):
    assert cli.main(["chat"]) == 1
    assert "--model PATH_OR_HUB_ID, or --demo" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_stops_the_answer_not_the_chat(tmp_path, demo_dir):
    endless = shutil.copytree(demo_dir, tmp_path / "endless")
    settings = json.loads((endless / "generation_config.json").read_text())
    (endless / "generation_config.json").write_text(json.dumps({**settings, "min_new_tokens": 100000}))
    command = [sys.executable, "-m", "transformers_qwen35", "chat", "--model", str(endless), *CPU]
    command += ["--max-new-tokens", "100000", "--no-think"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src")
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        child.stdin.write(b"Tell me everything\n")
        child.stdin.flush()
        readable, _, _ = select.select([child.stdout], [], [], 120)
        assert readable, "no answer within 120 s"
        assert child.stdout.read1(1)  # the answer is being written
        time.sleep(0.5)
        child.send_signal(signal.SIGINT)
        time.sleep(0.5)
        child.stdin.write(b"/exit\n")
        child.stdin.flush()
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    assert b"stopped" in err and b"Traceback" not in err and b"KeyboardInterrupt" not in err


def test_a_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(capsys, monkeypatch, demo_dir):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")
    code, out, err = chat(capsys, monkeypatch, demo_dir, [bad, "Hello there"])
    assert code == 0, err
    assert "that line is not valid UTF-8 text" in err
    (reply,) = expected_turns(demo_dir, [("Hello there", False)])
    assert out.startswith(reply["content"])  # the bad line left nothing in the conversation


def test_stats_report_each_turn_and_quantized_weights_chat(capsys, monkeypatch, demo_dir):
    lines = ["Hello there", "Again"]
    code, out, err = chat(capsys, monkeypatch, demo_dir, lines, "--stats", "--temperature", "0")
    assert code == 0, err
    stats = [line for line in err.splitlines() if "qwen35: prompt:" in line]  # after the "> " prompt
    assert len(stats) == 2 and all("tok/s after the first" in line for line in stats), err
    code, plain_out, plain_err = chat(capsys, monkeypatch, demo_dir, lines, "--temperature", "0")
    assert code == 0 and plain_out == out  # --stats writes to stderr only
    assert "qwen35: prompt:" not in plain_err
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nAgain\n"))
    code = cli.main(["chat", "--model", str(demo_dir), "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu",
                     "--quantize", "int4", "--temperature", "0", "--stats"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "weights quantised to int4" in captured.err
    assert captured.err.count("qwen35: prompt:") == 2
