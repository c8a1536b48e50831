"""enable_thinking wherever a user sets it: tokenizer, processor, both pipelines, and a clear error in generate()."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, pipeline

from transformers_qwen35.cli.demo import build_demo_checkpoint

THINKING_PROMPT_END = "<|im_start|>assistant\n<think>\n"
NON_THINKING_PROMPT_END = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "Why is the sky blue?"}]}]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("demo"), seed=1)


def greedy_answer(demo_dir, enable_thinking: bool, new_tokens: int = 6) -> str:
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, enable_thinking=enable_thinking, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("enable_thinking, ending", [(True, THINKING_PROMPT_END), (False, NON_THINKING_PROMPT_END)])
def test_tokenizer_and_processor_templates_switch(demo_dir, enable_thinking, ending):
    for loaded in (AutoTokenizer.from_pretrained(demo_dir), AutoProcessor.from_pretrained(demo_dir)):
        prompt = loaded.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
        )
        assert prompt.endswith(ending), type(loaded).__name__


def test_text_generation_pipeline_takes_the_switch(demo_dir):
    pipe = pipeline("text-generation", model=str(demo_dir))
    answers = {
        mode: pipe(MESSAGES, max_new_tokens=6, do_sample=False, tokenizer_encode_kwargs={"enable_thinking": mode})[0][
            "generated_text"
        ][-1]["content"]
        for mode in (True, False)
    }
    assert answers == {mode: greedy_answer(demo_dir, mode) for mode in (True, False)}
    assert answers[True] != answers[False]  # the switch reached the prompt


def test_image_text_to_text_pipeline_takes_the_switch(demo_dir):
    pipe = pipeline("image-text-to-text", model=str(demo_dir))
    answers = {
        mode: pipe(text=MESSAGES, max_new_tokens=6, do_sample=False, enable_thinking=mode)[0]["generated_text"][-1][
            "content"
        ]
        for mode in (True, False)
    }
    assert answers == {mode: greedy_answer(demo_dir, mode) for mode in (True, False)}


def test_generate_refuses_the_switch_with_advice(demo_dir):
    model = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="tokenizer_encode_kwargs"):
        model.generate(input_ids=torch.tensor([[1, 2, 3]]), enable_thinking=False, max_new_tokens=2)
    pipe = pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(demo_dir))
    with pytest.raises(ValueError, match="chat-template option"):
        pipe(MESSAGES, enable_thinking=False, max_new_tokens=2)
