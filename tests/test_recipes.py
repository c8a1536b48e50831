"""The fine-tuning recipes of examples/finetune/ run end to end on the demo checkpoint: the loss goes down and the
adapter / model is saved and loads again. A few steps each, in-process, one demo checkpoint for the whole file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from transformers import AutoModelForCausalLM  # noqa: E402

from transformers_qwen35.cli.demo import build_demo_checkpoint  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "examples" / "finetune"


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"finetune_recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(build_demo_checkpoint(tmp_path_factory.mktemp("demo")))


@pytest.fixture(autouse=True)
def one_thread():
    # A few hundred tokens per step: one thread is as fast, and does not stall when the cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(name: str, checkpoint: str, output: Path, *extra: str) -> tuple[int, dict]:
    argv = ["--model", checkpoint, "--output-dir", str(output), "--cpu", *extra]
    code = load_recipe(name).main(argv)
    return code, json.loads((output / "training_summary.json").read_text())


def test_lora_recipe_trains_packed_and_saves_the_adapter(checkpoint, tmp_path, capsys):
    output = tmp_path / "lora"
    code, summary = run(
        "lora", checkpoint, output, "--max-steps", "6", "--learning-rate", "1e-2", "--logging-steps", "2"
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert summary["loss_went_down"] and summary["eval_loss_after"] < summary["eval_loss_before"]
    assert len(summary["logged_losses"]) == 3
    assert "went down" in printed and "first" in printed and "last" in printed
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in output.iterdir()}
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16

    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(base, str(output))
    lora_b = [p for name, p in tuned.named_parameters() if "lora_B" in name]
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b)  # B starts at zero: it has trained
    assert not any("visual" in name or "lm_head" in name for name in tuned.base_model.targeted_module_names)


def test_lora_recipe_fails_when_the_loss_does_not_go_down(checkpoint, tmp_path):
    code, summary = run("lora", checkpoint, tmp_path / "flat", "--max-steps", "1", "--learning-rate", "0")
    assert code == 1
    assert not summary["loss_went_down"] and summary["eval_loss_after"] == pytest.approx(summary["eval_loss_before"])


def test_full_recipe_trains_and_saves_a_loadable_model(checkpoint, tmp_path, capsys):
    output = tmp_path / "full"
    code, summary = run("full", checkpoint, output, "--max-steps", "6", "--learning-rate", "3e-3")
    assert code == 0, capsys.readouterr().out
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert (output / "config.json").is_file() and list(output.glob("*.safetensors"))

    tuned = AutoModelForCausalLM.from_pretrained(str(output), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    changed = [name for name, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[name])]
    assert any("layers.0.linear_attn" in name for name in changed) and any("embed_tokens" in name for name in changed)


def test_multimodal_lora_recipe_trains_on_images(checkpoint, tmp_path, capsys):
    output = tmp_path / "vl"
    code, summary = run(
        "multimodal_lora", checkpoint, output, "--max-steps", "4", "--learning-rate", "1e-2", "--logging-steps", "1"
    )
    assert code == 0, capsys.readouterr().out
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    names = {p.name for p in output.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "preprocessor_config.json"} <= names
