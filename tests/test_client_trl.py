"""TRL's SFTTrainer, given a model *path* (TRL's usual form), trains our classes, in a process that never imports us.

TRL builds the model with ``getattr(transformers, config.architectures[0])`` and the processing class with
``AutoProcessor``/``AutoTokenizer``: only activation on install (the ``.pth`` hook) can route those to this package.
One fresh interpreter runs four short trainings on a tiny checkpoint with the real tokenizer (no chat template in the
files: ours is supplied) and reports what it saw; the assertions run here, against this package's own answers:

- padded batches with ``assistant_only_loss=True``: the labels TRL trains equal ``training_data.tokenize_chat``'s;
- ``padding_free=True`` and ``packing=True``: TRL's flattened batches (position ids restarting per sample) run;
- PEFT ``LoraConfig()`` without ``target_modules``: PEFT picks our defaults (the text decoder's linear layers);

and in each the model is ours and the training loss goes down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from client_checkpoints import real_checkpoint

from transformers_qwen35.training.data import IGNORE_INDEX, tokenize_chat
from transformers_qwen35.training.lora import lora_target_modules

pytest.importorskip("trl")

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "reasoning_content": "A geography question.", "content": "Paris."},
    ],
    [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And times 4?"},
        {"role": "assistant", "reasoning_content": "5 * 4 = 20.", "content": "20."},
    ],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ],
    [
        {"role": "user", "content": "Say hello in Spanish."},
        {"role": "assistant", "content": "Hola."},
    ],
]

TRAIN = textwrap.dedent("""
    import json, sys, tempfile
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    path, conversations = sys.argv[1], json.loads(sys.argv[2])
    dataset = Dataset.from_list([{"messages": messages} for messages in conversations * 4])
    modes = {
        "assistant_only": dict(assistant_only_loss=True),
        "padding_free": dict(padding_free=True, max_length=None),
        "packing": dict(packing=True, max_length=256),
        "lora": dict(peft=True, learning_rate=2e-2),  # adapters start at zero: a higher rate to move in 8 steps
    }
    report = {}
    for mode, options in modes.items():
        peft = options.pop("peft", False)
        args = SFTConfig(
            output_dir=tempfile.mkdtemp(), max_steps=8, per_device_train_batch_size=4, logging_steps=1,
            save_strategy="no", report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0,
            **{"learning_rate": 3e-3, **options},
        )
        trainer = SFTTrainer(model=path, args=args, train_dataset=dataset,
                             peft_config=LoraConfig(r=4, lora_alpha=8) if peft else None)
        base = trainer.model.get_base_model() if peft else trainer.model
        entry = {"model": f"{type(base).__module__}.{type(base).__qualname__}"}
        batch = trainer.data_collator([trainer.train_dataset[0]])
        entry["labels"] = batch["labels"][0].tolist()
        entry["position_ids"] = batch["position_ids"][0].tolist() if "position_ids" in batch else None
        if peft:
            targets = trainer.model.peft_config["default"].target_modules
            entry["targets"] = targets if isinstance(targets, str) else sorted(targets)
        trainer.train()
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        entry["losses"] = losses
        report[mode] = entry
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return real_checkpoint(tmp_path_factory.mktemp("trl_checkpoint"), seed=2)


@pytest.fixture(scope="module")
def report(checkpoint):
    env = {key: value for key, value in os.environ.items() if key != "TRANSFORMERS_QWEN35_AUTOLOAD"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(
        [sys.executable, "-c", TRAIN, str(checkpoint), json.dumps(CONVERSATIONS)],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


MODES = ["assistant_only", "padding_free", "packing", "lora"]


@pytest.mark.parametrize("mode", MODES)
def test_trl_trains_our_class_and_the_loss_goes_down(report, mode):
    entry = report[mode]
    assert entry["model"] == "transformers_qwen35.model.multimodal.Qwen3_5ForConditionalGeneration"
    losses = entry["losses"]
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5, losses  # from ~ln(vocab) = 12.4 at the start


def test_assistant_only_loss_trains_exactly_our_labels(report, checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))  # our template (the files have none)
    expected = tokenize_chat(tokenizer, CONVERSATIONS[0])["labels"]
    labels = report["assistant_only"]["labels"]
    assert labels == expected
    assert sum(label != IGNORE_INDEX for label in labels) > 5


def test_padding_free_and_packing_restart_positions_per_sample(report):
    for mode in ("padding_free", "packing"):
        positions = report[mode]["position_ids"]
        assert positions is not None and positions[0] == 0
        if mode == "packing":
            assert positions.count(0) > 1, positions  # several samples in one row, each from position 0


def test_lora_without_target_modules_picks_our_defaults(report):
    assert report["lora"]["targets"] == lora_target_modules("all")
