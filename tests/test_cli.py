"""The ``qwen35`` command: demo and generate end to end on the tiny random checkpoint, and its error reporting.

Most tests call ``main([...])`` in-process (fast); two run ``python -m transformers_qwen35`` in a subprocess to cover
the real entry point and Ctrl-C. Generated text is checked against ``model.generate`` run directly on the same
checkpoint, so the command is held to what transformers itself produces.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import transformers_qwen35
from transformers_qwen35.cli import common as cli_common
from transformers_qwen35.cli import main as cli
from transformers_qwen35.cli.demo import IM_END, build_demo_checkpoint, build_demo_tokenizer
from transformers_qwen35.kernels.cpu_linear import bf16_packing_supported
from transformers_qwen35.model.cpu_weights import pack_for_cpu

ERROR_PREFIX = "qwen35: error: "
CPU = ["--device", "cpu", "--dtype", "float32"]  # the reference below runs float32 on CPU too
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def reference(demo_dir):
    """(tokenizer, model) loaded directly through the Auto classes, as a user of transformers would."""
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    return tokenizer, model


def greedy_reply(reference, text: str, max_new_tokens: int) -> str:
    tokenizer, model = reference
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_single_error_line(code: int, out: str, err: str) -> str:
    assert code == 1
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR_PREFIX)
    return lines[0]


def subprocess_env() -> dict[str, str]:
    """The child must import this very package, whether or not it is installed."""
    source_root = str(Path(transformers_qwen35.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
    return env


# --------------------------------------------------------------------------------------------------------------------
# The demo checkpoint itself


def test_demo_tokenizer_has_the_qwen_chat_tokens(tmp_path):
    tokenizer = build_demo_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    assert len(tokenizer) < 1024
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == "<|endoftext|>"
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [token]
    text = "Hello, world! Ünïcödé ✓ and   spaces\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: every text round-trips
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    # the official 0.8B/2B format: thinking off unless asked for
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_demo_checkpoint_loads_as_our_model_with_matching_vocabulary(demo_dir, reference):
    tokenizer, model = reference
    assert isinstance(model, transformers_qwen35.Qwen3_5ForCausalLM)
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3_5"
    assert config["text_config"]["vocab_size"] == len(tokenizer) == model.config.vocab_size
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids(IM_END)
    assert json.loads((demo_dir / "generation_config.json").read_text())["do_sample"] is False


# --------------------------------------------------------------------------------------------------------------------
# Commands that succeed


def test_demo_command_streams_text_and_warns_about_random_weights(capsys, tmp_path):
    directory = tmp_path / "demo"
    code, out, err = run_main(capsys, "demo", "--dir", str(directory), "--max-new-tokens", "12", *CPU, "Hello")
    assert code == 0
    assert out.strip(), "the demo printed no generated text"
    assert "RANDOM weights" in err and "gibberish" in err
    assert "Traceback" not in err
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()
    # a second run may rewrite the directory it wrote
    assert run_main(capsys, "demo", "--dir", str(directory), "--max-new-tokens", "4", *CPU, "Hello")[0] == 0


def test_demo_refuses_a_directory_holding_files_it_did_not_write(capsys, tmp_path, demo_dir):
    """A real checkpoint (here: a copy of one) in --dir stays byte for byte as it was; the error names the files."""
    import shutil

    directory = tmp_path / "checkpoint"
    shutil.copytree(demo_dir, directory)
    (directory / ".qwen35-demo").unlink()  # now it is not ours
    before = {path.name: path.read_bytes() for path in directory.iterdir()}
    code, out, err = run_main(capsys, "demo", "--dir", str(directory), *CPU, "Hello")
    assert code != 0 and "Traceback" not in err
    assert "never overwrites files it did not create" in err and "config.json" in err
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before


def test_generate_no_chat_prints_exactly_the_greedy_continuation(capsys, demo_dir, reference):
    prompt = "The quick brown fox"
    code, out, err = run_main(
        capsys, "generate", "--model", str(demo_dir), "--no-chat", "--max-new-tokens", "10", *CPU, prompt
    )
    assert code == 0, err
    assert out == greedy_reply(reference, prompt, 10) + "\n"
    assert prompt not in out  # skip_prompt: only the new text is printed


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantize_prints_the_packed_models_greedy_text_and_stats_give_speeds(capsys, demo_dir, reference, weights):
    """--quantize loads bf16 and packs as pack_for_cpu does; --stats adds one line of speeds to stderr."""
    tokenizer = reference[0]
    model = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.bfloat16).eval()
    packed_reference = (tokenizer, pack_for_cpu(model, weights))
    prompt = "The quick brown fox"
    code, out, err = run_main(
        capsys, "generate", "--model", str(demo_dir), "--no-chat", "--max-new-tokens", "10", "--device", "cpu",
        "--quantize", weights, "--stats", prompt,
    )  # fmt: skip
    assert code == 0, err
    assert out == greedy_reply(packed_reference, prompt, 10) + "\n"
    stats = [line for line in err.splitlines() if line.startswith("qwen35: prompt:")]
    assert len(stats) == 1, err
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    assert re.fullmatch(
        rf"qwen35: prompt: {prompt_tokens} tokens in [0-9.]+ s \([0-9.]+ tok/s\); "
        r"reply: 10 tokens, [0-9.]+ tok/s after the first",
        stats[0],
    ), stats[0]


def test_compile_compiles_before_the_reply_and_prints_the_same_greedy_text(capsys, demo_dir, reference):
    """--compile: the decoding step is compiled (torch.compile, inductor) on a short generation first, then the
    reply is the eager model's greedy text (float32: the same tokens)."""
    prompt = "The quick brown fox"
    code, out, err = run_main(
        capsys, "generate", "--model", str(demo_dir), "--no-chat", "--max-new-tokens", "10", *CPU, "--compile", prompt
    )
    assert code == 0, err
    assert out == greedy_reply(reference, prompt, 10) + "\n"
    assert re.search(r"decoding step compiled in [0-9]+ s", err), err
    assert "could not compile" not in err


def test_cpu_dtype_is_bf16_where_the_cpu_multiplies_bf16_natively():
    assert cli_common.choose_dtype("auto", "cpu") == (torch.bfloat16 if bf16_packing_supported() else torch.float32)
    assert cli_common.choose_dtype("float32", "cpu") == torch.float32
    assert cli_common.choose_dtype("auto", "cpu", "int4") == torch.bfloat16
    with pytest.raises(cli_common.CliError, match="leave out --dtype float32"):
        cli_common.choose_dtype("float32", "cpu", "int8")
    with pytest.raises(cli_common.CliError, match="on a GPU leave it out"):
        cli_common.choose_dtype("auto", "cuda", "int8")


def test_generate_chat_applies_the_template(capsys, demo_dir, reference):
    code, out, err = run_main(capsys, "generate", "--model", str(demo_dir), "--max-new-tokens", "10", *CPU, "Hi there")
    assert code == 0, err
    chat_prompt = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert out == greedy_reply(reference, chat_prompt, 10) + "\n"
    assert out != greedy_reply(reference, "Hi there", 10) + "\n"


def test_mtp_drafts_print_the_same_greedy_text(capsys, demo_dir, reference):
    """--mtp K uses the demo checkpoint's own MTP head (random: few drafts pass) and must not change the output."""
    prompt = "The quick brown fox"
    base = ["generate", "--model", str(demo_dir), "--no-chat", "--max-new-tokens", "10", *CPU]
    code, out, err = run_main(capsys, *base, "--mtp", "3", prompt)
    assert code == 0, err
    assert out == greedy_reply(reference, prompt, 10) + "\n"


def test_temperature_zero_is_greedy_and_seeded_sampling_repeats(capsys, demo_dir, reference):
    base = ["generate", "--model", str(demo_dir), "--no-chat", "--max-new-tokens", "8", *CPU]
    code, greedy, _ = run_main(capsys, *base, "--temperature", "0", "Hello")
    assert code == 0 and greedy == greedy_reply(reference, "Hello", 8) + "\n"
    sampled = [run_main(capsys, *base, "--temperature", "5", "--seed", str(seed), "Hello") for seed in (1, 1, 2)]
    assert [code for code, _, _ in sampled] == [0, 0, 0]
    first, again, other = (out for _, out, _ in sampled)
    assert first == again and first.strip()
    # At temperature 5 over 512 tokens, two seeds agreeing on all 8 tokens would be a broken sampler.
    assert other != first and first != greedy


def test_thinking_switch_reaches_the_template_only_when_it_has_one(capsys, reference):
    tokenizer, _ = reference
    off = cli.build_prompt(tokenizer, "Hi", chat=True, thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert cli.build_prompt(tokenizer, "Hi", chat=True, thinking=None) == off  # the 0.8B/2B default
    assert cli.build_prompt(tokenizer, "Hi", chat=True, thinking=True).endswith("<|im_start|>assistant\n<think>\n")
    assert cli.build_prompt(tokenizer, "Hi", chat=False, thinking=False) == "Hi"

    class TemplateWithoutThinking:
        chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

        def apply_chat_template(self, messages, **options):
            assert "enable_thinking" not in options
            return messages[0]["content"] + "!"

    capsys.readouterr()
    assert cli.build_prompt(TemplateWithoutThinking(), "Hi", chat=True, thinking=True) == "Hi!"
    assert "no thinking switch" in capsys.readouterr().err


def test_generation_settings_override_the_checkpoint_defaults(reference):
    tokenizer, model = reference
    greedy = cli.generation_settings(model, tokenizer, 7, temperature=0.0, top_p=0.5)
    assert (greedy.do_sample, greedy.max_new_tokens, greedy.temperature, greedy.top_p) == (False, 7, None, None)
    sampled = cli.generation_settings(model, tokenizer, 9, temperature=0.7, top_p=0.9)
    assert (sampled.do_sample, sampled.temperature, sampled.top_p) == (True, 0.7, 0.9)
    unchanged = cli.generation_settings(model, tokenizer, 5, temperature=None, top_p=None)
    assert unchanged.do_sample is False  # the demo's generation_config.json says greedy
    assert model.generation_config.max_new_tokens == 32  # a copy was changed, not the model's own


# --------------------------------------------------------------------------------------------------------------------
# Errors: one line, exit 1, no traceback


def test_missing_directory_is_one_clear_error(capsys, tmp_path):
    missing = tmp_path / "no" / "such" / "checkpoint"
    line = assert_single_error_line(*run_main(capsys, "generate", "--model", str(missing), "hi"))
    assert f"no such model directory: {missing}" in line


def test_checkpoint_of_another_model_type_is_refused(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    line = assert_single_error_line(*run_main(capsys, "generate", "--model", str(tmp_path), "hi"))
    assert "'llama' model, not Qwen3.5" in line


def test_directory_without_config_is_refused(capsys, tmp_path):
    line = assert_single_error_line(*run_main(capsys, "generate", "--model", str(tmp_path), "hi"))
    assert "has no config.json" in line


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: data[:8] + b"not json at all!" + data[24:], id="garbled-header"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_corrupt_safetensors_is_named_in_one_error(capsys, tmp_path, demo_dir, damage):
    broken = shutil.copytree(demo_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    line = assert_single_error_line(*run_main(capsys, "generate", "--model", str(broken), *CPU, "hi"))
    assert f"the weights file {weights} is damaged or incomplete" in line


def _rewritten_checkpoint(demo_dir, directory, change):
    """A copy of the demo checkpoint whose tensors went through ``change(dict)``."""
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(demo_dir, directory)
    (copy / ".qwen35-demo").unlink()
    tensors = load_file(str(copy / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return copy


def test_checkpoint_missing_weights_is_refused_unless_allowed(capsys, tmp_path, demo_dir):
    name = "model.language_model.layers.1.mlp.up_proj.weight"
    partial = _rewritten_checkpoint(demo_dir, tmp_path / "partial", lambda tensors: tensors.pop(name))
    line = assert_single_error_line(*run_main(capsys, "generate", "--model", str(partial), *CPU, "hi"))
    assert "lacks 1 of the model's weights (model.layers.1.mlp.up_proj.weight)" in line
    assert "--allow-missing-weights" in line
    args = ("generate", "--model", str(partial), "--allow-missing-weights", "--max-new-tokens", "3", *CPU, "hi")
    code, out, err = run_main(capsys, *args)
    assert code == 0 and "WARNING: 1 weights are missing" in err and "RANDOM" in err


def test_checkpoint_with_integer_weights_is_refused(capsys, tmp_path, demo_dir):
    name = "model.language_model.layers.0.mlp.down_proj.weight"

    def to_int8(tensors):
        tensors[name] = tensors[name].to(torch.int8)

    broken = _rewritten_checkpoint(demo_dir, tmp_path / "int8", to_int8)
    line = assert_single_error_line(*run_main(capsys, "generate", "--model", str(broken), *CPU, "hi"))
    assert "stores 1 weight(s) as integers" in line and "(I8)" in line


def test_checkpoint_without_tokenizer_is_refused(capsys, tmp_path, demo_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(demo_dir / name, bare / name)
    line = assert_single_error_line(*run_main(capsys, "generate", "--model", str(bare), "hi"))
    assert "has no tokenizer" in line


def test_hub_id_without_network_fails_fast_with_advice(capsys, monkeypatch):
    # Pretend the Hub is unreachable: the command must then only look in the local cache, never retry the network.
    monkeypatch.setattr(cli_common, "hub_is_reachable", lambda *args: False)
    monkeypatch.setattr(cli_common, "hub_offline_by_setting", lambda: False)
    hub_id = "qwen35-cli-tests/not-a-cached-model"
    line = assert_single_error_line(*run_main(capsys, "generate", "--model", hub_id, "hi"))
    assert f"{hub_id} is neither a local directory nor in the Hugging Face cache" in line
    assert "cannot be reached" in line and "--model DIR" in line


def test_usage_errors_exit_2_like_argparse(capsys):
    assert cli.main(["generate"]) == 2
    assert cli.main(["generate", "--temperature", "-1", "hi"]) == 2
    assert cli.main(["generate", "--top-p", "1.5", "hi"]) == 2
    assert cli.main(["generate", "--dtype", "float8", "hi"]) == 2
    assert cli.main(["generate", "--mtp", "-1", "hi"]) == 2
    assert cli.main([]) == 2
    assert "usage: qwen35" in capsys.readouterr().err


def test_plausible_hub_ids_and_paths_are_told_apart():
    assert cli_common.is_plausible_hub_id("Qwen/Qwen3.5-0.8B") and cli_common.is_plausible_hub_id("gpt2")
    for path_like in ("./model", "/abs/model", "~/model", "a/b/c", "model/", "bad id", "a--b/c"):
        assert not cli_common.is_plausible_hub_id(path_like), path_like


# --------------------------------------------------------------------------------------------------------------------
# The real entry point, in a child process


def test_python_dash_m_runs_the_demo_end_to_end():
    result = subprocess.run(
        [sys.executable, "-m", "transformers_qwen35", "demo", "--max-new-tokens", "8", *CPU],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "RANDOM weights" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_exits_130_quietly(tmp_path, demo_dir):
    # A copy whose generation_config forbids stopping early: generation is surely still running when Ctrl-C comes.
    endless = shutil.copytree(demo_dir, tmp_path / "endless")
    settings = json.loads((endless / "generation_config.json").read_text())
    (endless / "generation_config.json").write_text(json.dumps({**settings, "min_new_tokens": 100000}))
    command = [sys.executable, "-m", "transformers_qwen35", "generate", "--model", str(endless), "--no-chat"]
    command += ["--max-new-tokens", "100000", *CPU, "The"]

    def generating(child):
        readable, _, _ = select.select([child.stdout], [], [], 90)
        assert readable, "no generated text within 90 s"
        assert child.stdout.read1(1)  # generation is under way

    returncode, err = interrupted(command, generating)
    assert returncode == 130
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err


def interrupted(command: list[str], until) -> tuple[int, bytes]:
    """Start ``command``, wait with ``until(child)`` for the moment to interrupt, send SIGINT; (exit status, stderr).
    The child is killed if it outlives the test."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env())
    try:
        until(child)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.returncode, err


def test_chat_example_runs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["chat_demo.py"])
    runpy.run_path(str(REPO_ROOT / "examples" / "chat_demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "RANDOM weights" in out
    assert out.count("assistant: ") == 2


def test_ctrl_c_during_start_up_exits_130_quietly(demo_dir):
    """SIGINT while the command is still importing torch and transformers (the console script's entry point)."""
    import time

    # "ready" once Python runs (its Ctrl-C handling is in place); the entry module is tiny, importing torch after it
    # takes over a second: a SIGINT 0.1 s after "ready" lands in the heavy imports.
    script = "import sys; print('ready', flush=True); import transformers_qwen35_command as c; sys.exit(c.main())"
    command = [sys.executable, "-c", script, "generate", "--model", str(demo_dir), *CPU, "hi"]

    def importing(child):
        assert child.stdout.readline() == b"ready\n"
        time.sleep(0.1)

    returncode, err = interrupted(command, importing)
    assert returncode == 130, err.decode()[-2000:]
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err


def test_a_seed_out_of_range_is_a_usage_error(capsys, demo_dir):
    code, _, err = run_main(capsys, "generate", "--model", str(demo_dir), "--seed", str(2**64), *CPU, "hi")
    assert code == 2 and "--seed: must be between 0 and 2**63 - 1" in err


def test_a_prompt_that_is_not_utf8_is_named(capsys, demo_dir):
    prompt = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    line = assert_single_error_line(*run_main(capsys, "generate", "--model", str(demo_dir), *CPU, prompt))
    assert "the prompt is not valid UTF-8 text: character 4 cannot be encoded (byte 0xe9)" in line


def test_an_unreadable_weights_file_is_not_called_damaged(capsys, monkeypatch, demo_dir):
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cli_common, "open", refuse, raising=False)
    line = assert_single_error_line(*run_main(capsys, "generate", "--model", str(demo_dir), *CPU, "hi"))
    assert "cannot be read (Permission denied)" in line and "damaged" not in line
