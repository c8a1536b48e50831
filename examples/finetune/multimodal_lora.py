"""LoRA fine-tuning of the Qwen3.5 vision-language model on image + text chats, with ``transformers.Trainer``.

    python examples/finetune/multimodal_lora.py                        # demo checkpoint (random weights), CPU
    python examples/finetune/multimodal_lora.py --model Qwen/Qwen3.5-0.8B --data my_vision_chats.jsonl

Rows look like ``{"messages": [{"role": "user", "content": [{"type": "image", "image": "images/cat.png"},
{"type": "text", "text": "What is this?"}]}, {"role": "assistant", "content": "A cat."}]}``; image paths are relative
to the JSONL file. What differs from ``lora.py``:

- The processor (``AutoProcessor``) renders and tokenizes each row: every image placeholder is expanded to the
  image's token count (one token per 32 x 32 pixels, at least 64), and ``pixel_values``, ``image_grid_thw`` and
  ``mm_token_type_ids`` (which the model's 3-D positions need) come with the ids. Vision tokens are never labelled.
- No packing: image samples are batched one per row by ``PaddingCollator``, which right-pads ``input_ids`` (pad
  token), ``labels`` (-100), ``mm_token_type_ids`` (0) and sets ``attention_mask``, and concatenates the pixel
  tensors in sample order. Right padding is exact for training because every layer only looks back: a real token
  never sees the pads after it. (Generation uses left padding, which is the side that keeps a continuation exact.)
- ``AutoModelForImageTextToText`` loads the vision tower too; LoRA adapts the text decoder's linear layers only
  (``lora_target_modules("all")``), so the vision tower and the merger stay frozen. Use the ``"all+vision"`` preset
  to adapt the vision tower as well.

The adapter is saved to ``--output-dir`` with the processor; load it with
``PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), output_dir)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe_utils  # noqa: E402

from transformers_qwen35.training.data import PaddingCollator, load_chat_dataset  # noqa: E402
from transformers_qwen35.training.lora import lora_target_modules  # noqa: E402

EVAL_ROWS = 8


def parse_args(argv=None):
    arguments = recipe_utils.parser(
        __doc__.splitlines()[0],
        recipe_utils.EXAMPLES / "data" / "vision_chat.jsonl",
        learning_rate=1e-4,
        demo_learning_rate=1e-2,
    )
    arguments.add_argument("--lora-rank", type=int, default=16)
    arguments.set_defaults(batch_size=4)
    return arguments.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with recipe_utils.scratch_dir() as scratch:
        model_path, _ = recipe_utils.resolve(args, "multimodal_lora", scratch)
        processor = AutoProcessor.from_pretrained(model_path)
        dataset = load_chat_dataset(args.data, processor, max_length=args.max_length)
        print(f"data: {args.data}: {dataset.summary()}")

        model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
        lora = LoraConfig(
            r=args.lora_rank,
            lora_alpha=2 * args.lora_rank,
            lora_dropout=0.0,
            target_modules=lora_target_modules("all"),  # text decoder only: the vision tower stays frozen
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        model.print_trainable_parameters()

        trainer = Trainer(
            model=model,
            args=recipe_utils.training_arguments(args),
            train_dataset=dataset,
            eval_dataset=dataset[:EVAL_ROWS],
            data_collator=PaddingCollator(pad_token_id=processor.tokenizer.pad_token_id),
        )
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]
        went_down = recipe_utils.report(trainer, before, after, args.output_dir, {"skipped": dataset.skipped})

        trainer.save_model(args.output_dir)  # the adapter only
        processor.save_pretrained(args.output_dir)
        print(f"adapter saved to {args.output_dir}")
    return 0 if went_down else 1


if __name__ == "__main__":
    raise SystemExit(main())
