"""Chat with a Qwen3.5 checkpoint through the plain transformers API, fully offline.

The checkpoint is the tiny demo one, built on the spot with RANDOM weights, so the replies are gibberish; pass a real
checkpoint directory (or a Hub id such as Qwen/Qwen3.5-0.8B, with network) as the first argument for real answers:

    python examples/chat_demo.py                      # tiny random demo checkpoint in a temporary directory
    python examples/chat_demo.py /path/to/Qwen3.5-0.8B
"""

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import transformers_qwen35  # noqa: F401  (registers the Qwen3.5 classes with the Auto factories)
from transformers_qwen35.cli.demo import build_demo_checkpoint


def chat(model_path: str, questions: list[str], max_new_tokens: int = 24) -> list[str]:
    """Ask each question in turn, keeping the conversation, and return the replies."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    messages, replies = [], []
    for question in questions:
        messages.append({"role": "user", "content": question})
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


def main() -> None:
    questions = ["Hello! Who are you?", "Tell me a story about the sea."]
    with tempfile.TemporaryDirectory() as scratch:
        if len(sys.argv) > 1:
            model_path = sys.argv[1]
        else:
            model_path = str(build_demo_checkpoint(scratch))
            print("(demo checkpoint with RANDOM weights: expect gibberish)\n")
        for question, reply in zip(questions, chat(model_path, questions)):
            print(f"user:      {question}\nassistant: {reply!r}\n")


if __name__ == "__main__":
    main()
