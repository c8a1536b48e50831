"""LoRA fine-tuning of Qwen3.5 on chat data, with plain ``transformers.Trainer`` and PEFT.

    python examples/finetune/lora.py                                   # demo checkpoint (random weights), CPU, ~10 s
    python examples/finetune/lora.py --model Qwen/Qwen3.5-0.8B --data my_chats.jsonl --max-steps 500

What it does:

1. ``load_chat_dataset``: each JSONL row ``{"messages": [...], "tools": [...]?}`` is rendered with the model's chat
   template and tokenized; only the assistant turns are labelled (through their ``<|im_end|>``). Rows without an
   assistant turn or longer than ``--max-length`` are skipped and counted, never truncated.
2. LoRA adapters on every linear layer of the text decoder (attention, Gated DeltaNet and MLP projections:
   ``lora_target_modules("all")``); the embeddings, ``lm_head`` and the vision tower stay frozen.
3. Padding-free packing: ``DataCollatorWithFlattening`` concatenates the batch into one row and restarts
   ``position_ids`` at every sample. The model reads the restarts and keeps the samples apart in every layer
   (attention and the DeltaNet convolution and recurrent state), so no compute is spent on padding and the loss is
   the one of separate samples (tests/test_training_data.py checks it against separate forward passes).
4. Activation checkpointing (``activation_checkpointing=True``, the 5.24 name of ``gradient_checkpointing``).
5. The loss on a fixed set of rows is measured before and after training; the run fails (exit 1) if it did not go
   down. The adapter (``adapter_config.json``, ``adapter_model.safetensors``) and the tokenizer are saved to
   ``--output-dir``; load it with ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dir)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithFlattening, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe_utils  # noqa: E402

from transformers_qwen35.training.data import load_chat_dataset  # noqa: E402
from transformers_qwen35.training.lora import lora_target_modules  # noqa: E402

EVAL_ROWS = 16


def parse_args(argv=None):
    arguments = recipe_utils.parser(
        __doc__.splitlines()[0],
        recipe_utils.EXAMPLES / "data" / "chat.jsonl",
        learning_rate=2e-4,
        demo_learning_rate=1e-2,
    )
    arguments.add_argument("--lora-rank", type=int, default=16)
    return arguments.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with recipe_utils.scratch_dir() as scratch:
        model_path, _ = recipe_utils.resolve(args, "lora", scratch)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        dataset = load_chat_dataset(args.data, tokenizer, max_length=args.max_length)
        print(f"data: {args.data}: {dataset.summary()}")

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        lora = LoraConfig(
            r=args.lora_rank,
            lora_alpha=2 * args.lora_rank,
            lora_dropout=0.0,
            target_modules=lora_target_modules("all"),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        model.print_trainable_parameters()

        trainer = Trainer(
            model=model,
            args=recipe_utils.training_arguments(args),
            train_dataset=dataset,
            eval_dataset=dataset[:EVAL_ROWS],
            data_collator=DataCollatorWithFlattening(),  # packs the batch into one row; position_ids restart per sample
        )
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
        went_down = recipe_utils.report(trainer, before, after, args.output_dir, {"skipped": dataset.skipped})

        trainer.save_model(args.output_dir)  # the adapter only
        tokenizer.save_pretrained(args.output_dir)
        print(f"adapter saved to {args.output_dir}")
    return 0 if went_down else 1


if __name__ == "__main__":
    raise SystemExit(main())
