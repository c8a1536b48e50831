"""The ``qwen35`` command line: chat with a Qwen3.5 checkpoint, or try the whole path offline with a demo model.

    qwen35 generate [--model PATH_OR_HUB_ID] [options] "prompt"
    qwen35 demo [--dir DIR] [options] ["prompt"]
    qwen35 chat [--model PATH_OR_HUB_ID | --demo] [--think | --no-think] [--hide-reasoning]

Generated text streams to stdout as it is produced; everything else (progress, notices, errors) goes to stderr, so
``qwen35 generate "..." > answer.txt`` captures just the answer. A problem the user can fix is reported as one line
``qwen35: error: ...`` and exit status 1; usage errors exit 2 (argparse); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
from pathlib import Path

import torch
from transformers import TextStreamer

from .. import __version__
from ..generation.sampling import apply_card
from .chat import add_chat_parser
from .common import (
    ALLOW_MISSING_HELP,
    COMPILE_HELP,
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    FROM_GENERATION_CONFIG,
    MTP_HELP,
    PROG,
    QUANTIZE_CHOICES,
    QUANTIZE_HELP,
    STATS_HELP,
    CliError,
    Throughput,
    build_prompt,
    check_checkpoint,
    check_text,
    choose_device,
    choose_dtype,
    compile_decoding,
    encode_prompt,
    first_line,
    generation_settings,
    info,
    load_model,
    load_tokenizer,
    non_negative_float,
    non_negative_int,
    positive_int,
    probability,
    resolve_model_source,
    seed_value,
    transformers_output,
)
from .demo import build_demo_checkpoint, claim_demo_directory

# --------------------------------------------------------------------------------------------------------------------
# Commands


def run_generate(args: argparse.Namespace) -> int:
    """Load, format the prompt, and stream the continuation to stdout. ``demo`` ends here too."""
    check_text(args.prompt, "the prompt")
    source = resolve_model_source(args.model)
    check_checkpoint(source, args.allow_missing_weights)
    device = choose_device(args.device)
    dtype = choose_dtype(args.dtype, device, args.quantize)
    origin = "" if source.is_local or not source.local_files_only else " (offline: from the local cache)"
    info(f"loading {source.name}{origin} on {device} ({str(dtype).removeprefix('torch.')})")
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype, device, args.quantize)
    if args.compile:
        compile_decoding(model, tokenizer, device)
    inputs = encode_prompt(tokenizer, model, build_prompt(tokenizer, args.prompt, not args.no_chat, args.thinking))
    base, processors = copy.deepcopy(model.generation_config), []
    size = getattr(model, "recommended_sampling_size", None)
    if size is not None and args.thinking is not None and not args.no_chat:
        # no generation_config.json came with the checkpoint: the card's setting for the mode asked for
        processors = apply_card(base, size, args.thinking)
    settings = generation_settings(model, tokenizer, args.max_new_tokens, args.temperature, args.top_p, base)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if args.stats:
        streamer = Throughput(streamer)
    try:
        with torch.inference_mode():
            model.generate(
                **inputs, generation_config=settings, streamer=streamer, logits_processor=processors,
                mtp_draft_tokens=args.mtp,  # 0: plain decoding
            )  # fmt: skip
    except (CliError, BrokenPipeError):
        raise  # main() knows these; a closed stdout is the reader's choice, not a generation failure
    except Exception as error:
        raise CliError(f"generation failed: {type(error).__name__}: {first_line(error)}") from None
    if args.stats:
        info(streamer.summary())
    return 0


RANDOM_WEIGHTS_NOTICE = (
    "demo: this checkpoint has RANDOM weights, so the text below is gibberish by design. It runs the full "
    f'load-and-generate path offline; for real answers run: {PROG} generate --model {DEFAULT_MODEL} "..."'
)


def run_demo(args: argparse.Namespace) -> int:
    """Build the tiny random checkpoint, then hand it to exactly the code path of ``generate``."""
    with contextlib.ExitStack() as stack:
        if args.dir is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qwen35-demo-")))
        else:
            directory = Path(args.dir).expanduser()
            try:
                claim_demo_directory(directory)  # before any work: a foreign directory is refused untouched
            except FileExistsError as error:
                raise CliError(f"--dir {args.dir}: {error}") from None
        info(f"demo: writing a tiny Qwen3.5 checkpoint to {directory}")
        build_demo_checkpoint(directory)
        info(RANDOM_WEIGHTS_NOTICE)
        args.model = str(directory)
        return run_generate(args)


def generation_options(max_new_tokens: int) -> argparse.ArgumentParser:
    """The options ``generate`` and ``demo`` share (``demo`` has a smaller default length)."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("generation")
    add = group.add_argument
    add(
        "--max-new-tokens",
        type=positive_int,
        default=max_new_tokens,
        metavar="N",
        help="stop after N new tokens (default: %(default)s)",
    )
    add(
        "--temperature",
        type=non_negative_float,
        default=None,
        metavar="T",
        help=f"sampling temperature, 0 = greedy ({FROM_GENERATION_CONFIG})",
    )
    add(
        "--top-p",
        type=probability,
        default=None,
        metavar="P",
        help=f"nucleus sampling probability mass ({FROM_GENERATION_CONFIG})",
    )
    add("--seed", type=seed_value, default=None, metavar="S", help="seed the sampler, for repeatable sampled output")
    add("--mtp", type=non_negative_int, default=0, metavar="K", help=MTP_HELP)
    add(
        "--no-chat", action="store_true", help="continue the prompt as plain text instead of applying the chat template"
    )
    add(
        "--think",
        "--thinking",
        dest="thinking",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="turn the chat template's thinking mode on or off (default: the template's own)",
    )
    add(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="weights dtype; auto = bfloat16 on a GPU and on a CPU with native bf16, else float32 (default: auto)",
    )
    add("--quantize", choices=QUANTIZE_CHOICES, default=None, help=QUANTIZE_HELP)
    add(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run; auto = cuda when available (default: auto)",
    )
    add("--compile", action="store_true", help=COMPILE_HELP)
    add("--stats", action="store_true", help=STATS_HELP)
    add("--verbose", action="store_true", help="show transformers' progress bars and warnings")
    add("--debug", action="store_true", help="on an error, show the full traceback")
    add("--allow-missing-weights", action="store_true", help=ALLOW_MISSING_HELP)
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Generate text with Qwen3.5 (0.8B / 2B / 4B / 9B) through transformers.",
        epilog=f'Example: {PROG} generate --model {DEFAULT_MODEL} "Why is the sky blue?"',
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser(
        "generate",
        parents=[generation_options(256)],
        help="generate a reply to a prompt, streamed to stdout",
        description="Generate a reply to PROMPT with a Qwen3.5 checkpoint, streaming it to stdout.",
    )
    generate.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="PATH_OR_ID",
        help="checkpoint directory or Hugging Face Hub id (default: %(default)s)",
    )
    generate.add_argument("prompt", help="the user message (or, with --no-chat, the text to continue)")
    generate.set_defaults(handler=run_generate)

    demo = commands.add_parser(
        "demo",
        parents=[generation_options(40)],
        help="run generate on a tiny RANDOM-weight checkpoint, offline",
        description="Build a tiny Qwen3.5 checkpoint with RANDOM weights and run generate on it: the whole path, "
        "offline, in seconds. Its output is gibberish by design.",
    )
    demo.add_argument(
        "--dir",
        default=None,
        metavar="DIR",
        help="where to write the demo checkpoint (default: a temporary directory, removed afterwards)",
    )
    demo.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="the user message (default: a short request)")
    demo.set_defaults(handler=run_demo)

    add_chat_parser(commands, (positive_int, non_negative_float, probability))
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit status argparse chose (2 for a usage error, 0 for --help / --version)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exit_request:
        code = exit_request.code
        return code if isinstance(code, int) else (0 if code is None else 2)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qwen35`` console command and of ``python -m transformers_qwen35``."""
    args = parse_args(argv)
    if isinstance(args, int):
        return args
    try:
        with transformers_output(args.verbose):
            return args.handler(args)
    except CliError as error:
        if args.debug:
            raise
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr, flush=True)  # end the half-written line, quietly
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): not an error of ours. Point stdout at devnull so that the
        # interpreter's final flush does not complain.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except Exception as error:  # a bug or an unforeseen failure: still one line, with the way to see more
        if args.debug:
            raise
        message = f"unexpected {type(error).__name__}: {first_line(error)} (run again with --debug for the traceback)"
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
