"""``qwen35 chat``: a multi-turn chat in the terminal, streaming, with the reasoning shown dimmed (or hidden).

    qwen35 chat --model Qwen/Qwen3.5-0.8B [--think | --no-think] [--hide-reasoning]
    qwen35 chat --demo                      # the tiny random-weight demo checkpoint, offline

Commands at the prompt: ``/think``, ``/no_think``, ``/reset``, ``/image PATH`` (attached to your next message),
``/help``, ``/exit``. Ctrl-C while the model writes stops that answer, not the program; Ctrl-D or ``/exit`` ends the
chat. Answers go to stdout, prompts and notices to stderr, as in ``qwen35 generate``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import signal
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from ..chat.parsing import StreamingResponseParser
from ..chat.template import thinking_default_for
from ..generation.sampling import apply_card
from .common import (
    ALLOW_MISSING_HELP,
    COMPILE_HELP,
    MTP_HELP,
    QUANTIZE_CHOICES,
    QUANTIZE_HELP,
    STATS_HELP,
    CliError,
    Throughput,
    check_checkpoint,
    check_text,
    choose_device,
    choose_dtype,
    compile_decoding,
    describe_load_error,
    generation_settings,
    info,
    load_tokenizer,
    non_negative_int,
    prepare_weights,
    resolve_model_source,
    seed_value,
)
from .demo import build_demo_checkpoint

HELP = """commands:
  /think          think before answering (from the next message on)
  /no_think       answer directly
  /reset          forget the conversation
  /image PATH     attach an image to your next message
  /help           this list
  /exit           leave (Ctrl-D does too); Ctrl-C stops an answer being written"""
DIM, RESET = "\033[2m", "\033[0m"


class _Interrupt(StoppingCriteria):
    """Ctrl-C during generation sets the flag; generation then stops cleanly at the next token."""

    def __init__(self):
        self.requested = False

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.requested, dtype=torch.bool, device=input_ids.device)


class _PrintingStreamer(BaseStreamer):
    """Decodes the new tokens as they come and routes reasoning / answer / tool calls to the terminal."""

    def __init__(self, tokenizer, parser: StreamingResponseParser, show_reasoning: bool, color: bool):
        self.tokenizer, self.parser = tokenizer, parser
        self.show_reasoning, self.color = show_reasoning, color
        self.ids: list[int] = []
        self.printed = 0
        self.prompt_seen = False
        self.reasoning, self.content, self.tool_calls = [], [], []
        self._kind: str | None = None

    def put(self, value):
        if not self.prompt_seen:  # generate() hands the prompt over first
            self.prompt_seen = True
            return
        self.ids.extend(value.flatten().tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return  # half of a multi-byte character: wait for the rest
        delta, self.printed = text[self.printed :], len(text)
        self._show(self.parser.feed(delta))

    def end(self):
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        self._show(self.parser.feed(text[self.printed :]))  # what was held back for a character never completed
        self._show(self.parser.finish())
        if self.color and self._kind == "reasoning":
            print(RESET, end="")
        print(flush=True)

    def _show(self, events):
        for kind, value in events:
            if kind == "reasoning":
                self.reasoning.append(value)
                if self.show_reasoning:
                    self._switch(kind)
                    print(value, end="", flush=True)
            elif kind == "content":
                self.content.append(value)
                self._switch(kind)
                print(value, end="", flush=True)
            else:
                self.tool_calls.append(value)
                self._switch(kind)
                print(f"[tool call] {value['name']}({value['arguments']})", end="", flush=True)

    def _switch(self, kind: str):
        """Dim the reasoning, and put a line break between reasoning, answer and tool calls."""
        if self._kind is not None and kind != self._kind:
            if self.color and self._kind == "reasoning":
                print(RESET, end="")
            print("\n", end="")
        if self.color and kind == "reasoning" and self._kind != "reasoning":
            print(DIM, end="")
        self._kind = kind


class ChatSession:
    """The conversation, the mode and the attached images; ``ask`` runs one turn."""

    def __init__(self, model, tokenizer, processor, thinking: bool, args):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.thinking, self.args = thinking, args
        self.messages: list[dict] = []
        self.images: list = []
        self.color = sys.stdout.isatty() and "NO_COLOR" not in os.environ

    def command(self, line: str) -> bool:
        """Handle a ``/command``; False means leave."""
        name, _, rest = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/think" or name == "/no_think":
            self.thinking = name == "/think"
            info(f"thinking {'on' if self.thinking else 'off'} from the next message on")
        elif name == "/reset":
            self.messages.clear()
            self.images.clear()
            info("conversation cleared")
        elif name == "/image":
            self.attach(rest.strip())
        elif name == "/help":
            print(HELP, file=sys.stderr)
        else:
            info(f"unknown command {name}; /help lists them")
        return True

    def attach(self, path: str) -> None:
        if self.processor is None:
            info("this model was loaded without its vision tower; images are not available here")
            return
        if not path:
            info("usage: /image PATH")
            return
        from ..chat.media import MediaPolicy, open_image, to_8bit

        try:
            index = len(self.images)
            image = to_8bit(open_image(str(Path(path).expanduser()), index, MediaPolicy()), index).convert("RGB")
        except ValueError as error:
            info(f"error: {error}")
            return
        self.images.append(image)
        info(f"image attached ({image.width}x{image.height}); it goes with your next message")

    def ask(self, text: str) -> None:
        content = [{"type": "image", "image": image} for image in self.images] + [{"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": content})
        self.images = []
        encoder = self.processor if self.processor is not None else self.tokenizer
        inputs = encoder.apply_chat_template(
            self.messages, add_generation_prompt=True, enable_thinking=self.thinking,
            tokenize=True, return_dict=True, return_tensors="pt",
        )  # fmt: skip
        inputs = {key: value.to(self.model.device) for key, value in inputs.items() if hasattr(value, "to")}
        settings, processors = self.settings(vision=any(part["type"] == "image" for part in content))
        parser = StreamingResponseParser(thinking=self.thinking)
        printer = _PrintingStreamer(self.tokenizer, parser, not self.args.hide_reasoning, self.color)
        streamer = Throughput(printer) if self.args.stats else printer
        interrupt = _Interrupt()
        previous = signal.signal(signal.SIGINT, lambda *_: setattr(interrupt, "requested", True))
        try:
            with torch.inference_mode():
                self.model.generate(
                    **inputs, generation_config=settings, streamer=streamer,
                    logits_processor=processors, stopping_criteria=[interrupt],
                    mtp_draft_tokens=self.args.mtp,  # 0: plain decoding
                )  # fmt: skip
        finally:
            signal.signal(signal.SIGINT, previous)
        if interrupt.requested:
            info("stopped")
        if self.args.stats:
            info(streamer.summary())
        reply = {"role": "assistant", "content": self._history_text("".join(printer.content))}
        if self.thinking:
            reply["reasoning_content"] = self._history_text("".join(printer.reasoning))
        self.messages.append(reply)

    def _history_text(self, text: str) -> str:
        """A reply as the conversation keeps it: shown as generated, stored without the tokenizer's special tokens.
        Models emit them (random and fine-tuned ones often); kept, a vision placeholder would make the next turn ask
        for an image that was never given, and an ``<|im_start|>`` would open a turn of its own."""
        for token in sorted(self.tokenizer.all_special_tokens, key=len, reverse=True):
            text = text.replace(token, "")
        return text

    def settings(self, vision: bool):
        """The checkpoint's generation config, or the card's setting for this size and mode; the flags win."""
        base, processors = copy.deepcopy(self.model.generation_config), []
        size = getattr(self.model, "recommended_sampling_size", None)
        if size is not None:  # no generation_config.json came with the checkpoint: the card's, for this mode
            processors = apply_card(base, size, self.thinking, vision)
        args = self.args
        settings = generation_settings(
            self.model, self.tokenizer, args.max_new_tokens, args.temperature, args.top_p, base
        )
        return settings, processors


def _load(source, dtype, device, quantize):
    """The vision-language model and processor when the checkpoint has a vision tower, else the text model."""
    with contextlib.suppress(Exception):
        processor = AutoProcessor.from_pretrained(source.load_from, local_files_only=source.local_files_only)
        model = AutoModelForImageTextToText.from_pretrained(
            source.load_from, dtype=dtype, local_files_only=source.local_files_only
        )
        return prepare_weights(model.to(device).eval(), device, quantize), processor.tokenizer, processor
    tokenizer = load_tokenizer(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.load_from, dtype=dtype, local_files_only=source.local_files_only
        )
    except Exception as error:
        raise CliError(describe_load_error("model", source, error)) from None
    return prepare_weights(model.to(device).eval(), device, quantize), tokenizer, None


def run_chat(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        if args.demo:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qwen35-demo-")))
            build_demo_checkpoint(directory)
            info("demo: a tiny checkpoint with RANDOM weights, so its answers are gibberish by design")
            args.model = str(directory)
        elif args.model is None:
            raise CliError("say which model to chat with: --model PATH_OR_HUB_ID, or --demo for the offline demo.")
        source = resolve_model_source(args.model)
        check_checkpoint(source, args.allow_missing_weights)
        device = choose_device(args.device)
        info(f"loading {source.name} on {device}")
        dtype = choose_dtype(args.dtype, device, args.quantize)
        model, tokenizer, processor = _load(source, dtype, device, args.quantize)
        if args.compile:
            compile_decoding(model, tokenizer, device)
        thinking = args.think if args.think is not None else thinking_default_for(model.config)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        session = ChatSession(model, tokenizer, processor, thinking, args)
        info(f"thinking {'on' if thinking else 'off'}; /help lists the commands, /exit or Ctrl-D leaves")
        return _loop(session)


def _loop(session: ChatSession) -> int:
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = input()
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line, stay in the chat
            print(file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line):
                return 0
            continue
        try:
            check_text(line, "that line")
        except CliError as error:  # nothing was added to the conversation: type the line again
            info(f"error: {error}")
            continue
        try:
            session.ask(line)
        except CliError:
            raise
        except ValueError as error:  # bad input for this turn (an image, the context length): say so, go on
            info(f"error: {error}")
            session.messages.pop()


def add_chat_parser(commands, generation_types) -> None:
    positive_int, non_negative_float, probability = generation_types
    chat = commands.add_parser(
        "chat",
        help="chat in the terminal (multi-turn, streaming, images with /image)",
        description="Chat with a Qwen3.5 checkpoint in the terminal. " + HELP.replace("commands:", "Commands:"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = chat.add_argument
    add("--model", default=None, metavar="PATH_OR_HUB_ID", help="a local checkpoint directory or a Hub id")
    add("--allow-missing-weights", action="store_true", help=ALLOW_MISSING_HELP)
    add("--demo", action="store_true", help="chat with the tiny random-weight demo checkpoint, offline")
    add("--think", "--thinking", dest="think", action=argparse.BooleanOptionalAction, default=None,
        help="start with thinking on or off (default: the model's: off for 0.8B/2B, on for 4B/9B)")  # fmt: skip
    add("--hide-reasoning", action="store_true", help="do not print the reasoning, only the answers")
    add("--max-new-tokens", type=positive_int, default=2048, metavar="N", help="longest answer (default: %(default)s)")
    add("--temperature", type=non_negative_float, default=None, metavar="T", help="0 = greedy (default: the card's)")
    add("--top-p", type=probability, default=None, metavar="P", help="nucleus mass (default: the card's)")
    add("--seed", type=seed_value, default=None, metavar="S", help="seed the sampler")
    add("--mtp", type=non_negative_int, default=0, metavar="K", help=MTP_HELP)
    add("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="weights dtype (default: auto)")
    add("--quantize", choices=QUANTIZE_CHOICES, default=None, help=QUANTIZE_HELP)
    add("--compile", action="store_true", help=COMPILE_HELP)
    add("--stats", action="store_true", help=STATS_HELP)
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run (default: auto)")
    add("--verbose", action="store_true", help="show transformers' progress bars and warnings")
    add("--debug", action="store_true", help="on an error, show the full traceback")
    chat.set_defaults(handler=run_chat)
