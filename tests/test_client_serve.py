"""``transformers serve`` answers with our classes, with no import of ours anywhere in the server process.

The server is transformers' own CLI, started in a fresh interpreter on 127.0.0.1 and a free port, on a scripted tiny
checkpoint (tests/client_checkpoints.py) with the real tokenizer: with thinking on it answers a reasoning text and a
tool call, with thinking off a plain answer. The client is the ``openai`` package, as users call the server. The
reply's ``reasoning_content`` and ``tool_calls`` must come back parsed by the server.

What served the requests is read from the server's processes themselves (transformers serve loads the model in a
process it spawns, the processor in the API process): the server and its children start with a test-only
``sitecustomize`` on PYTHONPATH that installs a SIGUSR1 handler writing the classes of the models and processors
alive in that process to a file. It only observes: it imports nothing of ours. The server is started as
``python -m transformers.cli.transformers``... exactly what the ``transformers`` console script runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
from client_checkpoints import BLANK_LINE, NEWLINE, scripted_checkpoint

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

REASONING = "Let me check."
TOOL_CALL = "<tool_call><function=get_weather><parameter=city>Paris</parameter></function></tool_call>"
ANSWER = "Hello!"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 30

OBSERVER = textwrap.dedent("""
    import gc, json, os, signal

    def report(*_):
        import sys
        if "torch" not in sys.modules:
            seen = []
        else:
            import torch
            from transformers import ProcessorMixin
            frozen = gc.get_freeze_count()
            gc.unfreeze()  # the server freezes what it loaded (gc.freeze), which hides it from gc.get_objects
            seen = sorted({f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects()
                           if isinstance(o, (torch.nn.Module, ProcessorMixin))
                           and type(o).__name__.startswith("Qwen3")
                           and (isinstance(o, ProcessorMixin) or hasattr(o, "generate"))})
            if frozen:
                gc.freeze()
        path = os.path.join(os.environ["SERVED_BY_DIR"], f"{os.getpid()}.json")
        with open(path + ".part", "w") as handle:
            json.dump(seen, handle)
        os.replace(path + ".part", path)

    if os.environ.get("SERVED_BY_DIR"):
        signal.signal(signal.SIGUSR1, report)
""")
SERVER = [
    "-c",
    "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())",
]


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                found.append(int(entry))
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return scripted_checkpoint(
        tmp_path_factory.mktemp("scripted"), {NEWLINE: REASONING + "</think>" + TOOL_CALL, BLANK_LINE: ANSWER}
    )


# transformers serve's two ways of generating: generate() per request, and --continuous-batching.
@pytest.fixture(scope="module", params=[[], ["--continuous-batching"]], ids=["generate", "continuous-batching"])
def server(request, checkpoint, tmp_path_factory):
    port = free_port()
    served_by = tmp_path_factory.mktemp("served")
    observer = tmp_path_factory.mktemp("observer")
    (observer / "sitecustomize.py").write_text(OBSERVER)
    env = {key: value for key, value in os.environ.items() if key != "TRANSFORMERS_QWEN35_AUTOLOAD"}
    python_path = [str(observer), *filter(None, [env.get("PYTHONPATH")])]
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SERVED_BY_DIR=str(served_by))
    env["PYTHONPATH"] = os.pathsep.join(python_path)
    log = tmp_path_factory.mktemp("log") / "serve.log"
    command = [sys.executable, *SERVER, "serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--device", "cpu", *request.param]
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"transformers serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=120, max_retries=0)
        yield {"client": client, "model": str(checkpoint), "process": process, "served_by": served_by, "log": log}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)


def chat(server, thinking: bool, tools=None):
    return server["client"].chat.completions.create(
        model=server["model"],
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=tools,
        max_tokens=40,
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
    )


def test_thinking_off_returns_the_answer_alone(server):
    message = chat(server, thinking=False).choices[0].message
    assert message.content == ANSWER
    assert not getattr(message, "reasoning_content", None)
    assert not message.tool_calls


def test_thinking_on_with_a_tool_returns_reasoning_and_a_parsed_call(server):
    completion = chat(server, thinking=True, tools=TOOLS)
    message = completion.choices[0].message
    assert getattr(message, "reasoning_content", None) == REASONING
    assert not message.content
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0].function
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}


def test_the_server_ran_our_classes(server):
    """Ask the server's processes (by PID) what they have loaded, right after an answer."""
    chat(server, thinking=False)
    pids = [server["process"].pid, *children_of(server["process"].pid)]
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 30
    reports = {}
    while time.monotonic() < deadline:
        reports = {pid: server["served_by"] / f"{pid}.json" for pid in pids}
        if sum(path.is_file() for path in reports.values()) >= 2:  # the API process and the model's process
            break
        time.sleep(0.2)
    served_by = sorted({name for path in reports.values() if path.is_file() for name in json.loads(path.read_text())})
    assert served_by, server["log"].read_text()[-4000:]
    assert all(name.startswith("transformers_qwen35.") for name in served_by), served_by
    assert "transformers_qwen35.chat.processing.Qwen3_5Processor" in served_by
    assert "transformers_qwen35.model.multimodal.Qwen3_5ForConditionalGeneration" in served_by
