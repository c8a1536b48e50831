"""Full fine-tuning of Qwen3.5 on chat data, with plain ``transformers.Trainer``: every weight of the model trains.

    python examples/finetune/full.py                                   # demo checkpoint (random weights), CPU
    python examples/finetune/full.py --model Qwen/Qwen3.5-0.8B --data my_chats.jsonl --max-steps 500

The data path is the one of ``lora.py``: ``load_chat_dataset`` (assistant turns labelled through ``<|im_end|>``,
nothing truncated, skipped rows counted) and padding-free packing with ``DataCollatorWithFlattening`` (the model
keeps the packed samples apart in every layer). Activation checkpointing is on.

Memory: the weights, their gradients and AdamW's two moments are all fp32 here (16 bytes per parameter, about
14 GB for the 0.8B model before activations), and with a 248,320-token vocabulary the logits of long packed rows are
large too: lower ``--batch-size`` or use ``lora.py`` when that does not fit. The text model is loaded with
``AutoModelForCausalLM``, so the vision tower is neither loaded nor trained, and the result is saved as a text-only
checkpoint (``config.json`` + safetensors weights) plus the tokenizer, loadable with
``AutoModelForCausalLM.from_pretrained(output_dir)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithFlattening, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe_utils  # noqa: E402

from transformers_qwen35.training.data import load_chat_dataset  # noqa: E402

EVAL_ROWS = 16


def parse_args(argv=None):
    arguments = recipe_utils.parser(
        __doc__.splitlines()[0],
        recipe_utils.EXAMPLES / "data" / "chat.jsonl",
        learning_rate=1e-5,
        demo_learning_rate=3e-3,
    )
    arguments.add_argument("--weight-decay", type=float, default=0.0)
    return arguments.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with recipe_utils.scratch_dir() as scratch:
        model_path, _ = recipe_utils.resolve(args, "full", scratch)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        dataset = load_chat_dataset(args.data, tokenizer, max_length=args.max_length)
        print(f"data: {args.data}: {dataset.summary()}")

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
        print(f"trainable params: {trainable:,} (all of them)")

        trainer = Trainer(
            model=model,
            args=recipe_utils.training_arguments(args, weight_decay=args.weight_decay),
            train_dataset=dataset,
            eval_dataset=dataset[:EVAL_ROWS],
            data_collator=DataCollatorWithFlattening(),
        )
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
        went_down = recipe_utils.report(trainer, before, after, args.output_dir, {"skipped": dataset.skipped})

        trainer.save_model(args.output_dir)  # config.json + model.safetensors
        tokenizer.save_pretrained(args.output_dir)
        print(f"model saved to {args.output_dir}")
    return 0 if went_down else 1


if __name__ == "__main__":
    raise SystemExit(main())
