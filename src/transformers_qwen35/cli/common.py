"""What the ``qwen35`` commands share: errors and notices, where a model comes from, the checks run before
anything is loaded, loading, prompt building, generation settings, and the argument types.

``main.py`` (``generate``, ``demo``, the parser and ``main``) and ``chat.py`` (``chat``) both import this module,
and nothing here imports them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hub_constants
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, CompileConfig
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as transformers_logging

from ..core.configuration import Qwen3_5TextConfig
from ..generation.compiled_step import compilation_failed
from ..kernels.cpu_linear import bf16_packing_supported
from ..model.checkpoint import check_checkpoint_tensors
from ..model.cpu_weights import pack_for_cpu

PROG = "qwen35"
DEFAULT_MODEL = "Qwen/Qwen3.5-0.8B"
DEFAULT_PROMPT = "Tell me a short story about a robot who wanted to paint the sea."
QWEN35_MODEL_TYPES = ("qwen3_5", "qwen3_5_text")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd program
HUB_PROBE_TIMEOUT_S = 3.0
# Hub repository ids: "name" or "namespace/name" of letters, digits, '.', '_' and '-' (at most 96 characters).
HUB_ID_PATTERN = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


class CliError(Exception):
    """A failure the user can fix; :func:`main` prints it as one ``qwen35: error:`` line and exits 1."""


def info(message: str) -> None:
    """Informational output: stderr, so that stdout carries only generated text."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Where the model comes from


@dataclass
class ModelSource:
    """A resolved ``--model``: a local checkpoint directory, or a Hub id (possibly served from the local cache)."""

    name: str
    local_dir: Path | None = None
    local_files_only: bool = False

    @property
    def is_local(self) -> bool:
        return self.local_dir is not None

    @property
    def load_from(self) -> str:
        return str(self.local_dir) if self.local_dir is not None else self.name


def looks_like_path(name: str) -> bool:
    """True for what a user can only mean as a file-system path (never a Hub id)."""
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name in (".", "..")
        or "\\" in name
        or name.count("/") > 1
        or name.endswith("/")
    )


def is_plausible_hub_id(name: str) -> bool:
    return (
        not looks_like_path(name)
        and len(name) <= 96
        and HUB_ID_PATTERN.match(name) is not None
        and ".." not in name
        and "--" not in name
    )


def hub_is_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the Hub? Answers in seconds instead of huggingface_hub's ~25 s of retries."""
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct probe proves nothing; let the real request find out
    endpoint = urlparse(hub_constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_offline_by_setting() -> bool:
    return bool(hub_constants.HF_HUB_OFFLINE)


def resolve_model_source(name: str) -> ModelSource:
    """Decide whether ``name`` is a local checkpoint or a Hub id, and whether the network may be used."""
    path = Path(name).expanduser()
    if path.is_dir():
        # A local checkpoint never needs the network; saying so keeps transformers from trying it.
        return ModelSource(name, local_dir=path, local_files_only=True)
    if path.exists():
        hint = f" (use its folder {path.parent})" if path.name == "config.json" else ""
        raise CliError(f"{name} is a file; --model needs the checkpoint directory that holds config.json{hint}.")
    if not is_plausible_hub_id(name):
        raise CliError(
            f"no such model directory: {name} (pass an existing Qwen3.5 checkpoint directory, "
            f"or a Hugging Face Hub id such as {DEFAULT_MODEL})."
        )
    if hub_offline_by_setting():
        return ModelSource(name, local_files_only=True)
    # Offline: fall back to the local Hugging Face cache instead of waiting on retries.
    return ModelSource(name, local_files_only=not hub_is_reachable())


# --------------------------------------------------------------------------------------------------------------------
# Checking a local checkpoint before loading it (precise messages, no half-loaded model)


def read_config_json(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CliError(
            f"{directory} has no config.json, so it is not a model checkpoint: pass the directory that holds "
            "config.json and the *.safetensors weights."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CliError(f"{config_path} is not valid JSON ({error}): the file is damaged; download it again.") from None
    if not isinstance(config, dict):
        raise CliError(f"{config_path} does not hold a JSON object: the file is damaged; download it again.")
    return config


def check_model_type(model_type: object, where: str) -> None:
    if model_type not in QWEN35_MODEL_TYPES:
        raise CliError(
            f"{where} is a {model_type!r} model, not Qwen3.5: {PROG} runs Qwen3.5 checkpoints only "
            f"(config.json model_type {' or '.join(map(repr, QWEN35_MODEL_TYPES))}), e.g. {DEFAULT_MODEL}."
        )


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files a checkpoint declares: those of the shard index if there is one, else every *.safetensors."""
    index_path = directory / "model.safetensors.index.json"
    if not index_path.is_file():
        return sorted(directory.glob("*.safetensors"))
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CliError(f"{index_path} is damaged (no valid weight_map): download the checkpoint again.") from None
    shards = [directory / name for name in sorted(set(weight_map.values()))]
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise CliError(
            f"{directory} is incomplete: its shard index lists {', '.join(missing)}, which is missing; "
            "download the checkpoint again."
        )
    return shards


def check_safetensors_headers(files: list[Path]) -> None:
    """Open each file's header: a truncated or garbled file fails here, named, instead of deep inside loading."""
    for file in files:
        try:
            with open(file, "rb") as stream:
                stream.read(8)
        except OSError as error:  # not damaged: unreadable (permissions, a directory, an I/O error)
            raise CliError(
                f"the weights file {file} cannot be read ({error.strerror or type(error).__name__}): check its "
                "permissions and that it is a regular file."
            ) from None
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # the file reads, but is not a whole safetensors file
            raise CliError(
                f"the weights file {file} is damaged or incomplete ({first_line(error)}): download it again."
            ) from None


def check_local_checkpoint(directory: Path, allow_missing_weights: bool = False) -> None:
    """Everything that can be wrong with a local directory, found before a single weight is loaded."""
    check_model_type(read_config_json(directory).get("model_type"), str(directory))
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise CliError(
            f"{directory} has no tokenizer (tokenizer.json / tokenizer_config.json): copy the tokenizer files of the "
            "original checkpoint into it."
        )
    weights = safetensors_files(directory)
    if weights:
        check_safetensors_headers(weights)
        check_weights_fit_config(directory, allow_missing_weights)


def check_weights_fit_config(directory: Path, allow_missing_weights: bool) -> None:
    """The text decoder's tensors against config.json, from the file headers: wrong shapes and integer weights are
    refused; missing ones too (transformers would fill them with random values and the answers would be gibberish),
    unless --allow-missing-weights."""
    try:
        config = Qwen3_5TextConfig.from_pretrained(directory)
        missing = check_checkpoint_tensors(directory, config, with_vision=False)
    except ValueError as error:
        raise CliError(first_line(error)) from None
    if not missing:
        return
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    if not allow_missing_weights:
        raise CliError(
            f"{directory} lacks {len(missing)} of the model's weights ({shown}), which would be filled with random "
            "values: download the checkpoint again, or pass --allow-missing-weights to run it anyway."
        )
    info(f"WARNING: {len(missing)} weights are missing ({shown}) and are RANDOM: expect meaningless output.")


# --------------------------------------------------------------------------------------------------------------------
# Turning loader exceptions into one line


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= 300 else line[:297] + "..."


# What transformers / huggingface_hub say when a file is neither downloadable nor in the cache.
NETWORK_ERROR_CLUES = (
    "couldn't connect",
    "offline mode",
    "cannot find the requested files in the disk cache",
    "outgoing traffic has been disabled",
)


def is_network_error(error: BaseException) -> bool:
    text = str(error).lower()
    return any(clue in text for clue in NETWORK_ERROR_CLUES)


def describe_load_error(what: str, source: ModelSource, error: BaseException) -> str:
    """One line that says what failed and what to do about it."""
    if type(error).__name__ == "SafetensorError":
        return f"the weights of {source.name} are damaged or incomplete ({first_line(error)}): download them again."
    if not source.is_local and is_network_error(error):
        if hub_offline_by_setting():
            reason = "HF_HUB_OFFLINE is set"
        elif source.local_files_only:
            reason = "the Hugging Face Hub cannot be reached (no network?)"
        else:
            reason = "the download failed"
        return (
            f"{source.name} is neither a local directory nor in the Hugging Face cache, and {reason}: connect to the "
            f"internet, or download it where you can (hf download {source.name} --local-dir DIR) and pass --model DIR."
        )
    name = type(error).__name__
    if name in ("RepositoryNotFoundError", "GatedRepoError") or "is not a valid model identifier" in str(error):
        return (
            f"no accessible model {source.name!r} on the Hugging Face Hub (misspelt, private or gated; for gated "
            "models log in with `hf auth login`)."
        )
    return f"could not load the {what} of {source.name}: {name}: {first_line(error)}"


# --------------------------------------------------------------------------------------------------------------------
# Device, dtype, loading


def choose_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was requested but PyTorch sees no CUDA GPU here: use --device cpu.")
    return requested


def choose_dtype(requested: str, device: str, quantize: str | None = None):
    """``auto``: bfloat16 (the checkpoints' own dtype) on a GPU that has it and on a CPU with native bf16 products
    (AVX512-BF16 or AMX: the weights are then packed for CPU decoding, see ``prepare_weights``), float32 elsewhere.
    Quantised weights run with bfloat16 activations."""
    if quantize is not None:
        if device != "cpu":
            raise CliError(f"--quantize {quantize} packs the weights for CPU decoding; on a GPU leave it out.")
        if requested == "float32":
            raise CliError(f"--quantize {quantize} runs with bfloat16 activations: leave out --dtype float32.")
        return torch.bfloat16
    if requested == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device == "cpu" and bf16_packing_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[requested]


def prepare_weights(model, device: str, quantize: str | None):
    """On the CPU, pack a bfloat16 model's language-model weights for decoding (``model/cpu_weights.py``): quantised
    to ``quantize`` (int8 / int4), or as bf16 where the CPU has native bf16 products (the same results, faster)."""
    weights = quantize or ("bf16" if model.dtype == torch.bfloat16 and bf16_packing_supported() else None)
    if device != "cpu" or weights is None:
        return model
    if quantize is not None:
        info(f"quantising the weights to {quantize} (0.8B: about 4 s on 2 cores; larger sizes take longer)")
    started = time.perf_counter()
    pack_for_cpu(model, weights)
    if quantize is not None:
        info(f"weights quantised to {quantize} in {time.perf_counter() - started:.1f} s")
    return model


def compile_decoding(model, tokenizer, device: str) -> None:
    """``--compile``: on the CPU, decode with the static decoding block compiled by ``torch.compile``
    (``generation/compiled_step.py``; CUDA replays CUDA graphs instead). Compiles now, on a two-token generation, so
    that the first reply (and its ``--stats`` line) does not carry the compilation."""
    if device != "cpu":
        return
    model.generation_config.compile_config = CompileConfig()
    info("compiling the decoding step with torch.compile (0.8B on 2 cores: ~30 s the first time, ~15 s once cached)")
    started = time.perf_counter()
    prompt = torch.tensor([[tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]])
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
    if compilation_failed(model):
        info("the decoding step could not be compiled (the warning above says why): decoding without it")
    else:
        info(f"decoding step compiled in {time.perf_counter() - started:.0f} s")


class Throughput(BaseStreamer):
    """Hands every call on to ``inner`` and times them: generate() puts the prompt first, and the prompt's forward
    has ended when the first new token arrives."""

    def __init__(self, inner: BaseStreamer):
        self.inner = inner
        self.started = time.perf_counter()
        self.prompt_tokens: int | None = None
        self.first_token_at: float | None = None
        self.ended_at: float | None = None
        self.new_tokens = 0

    def put(self, value):
        if self.prompt_tokens is None:
            self.prompt_tokens = int(value.shape[-1])
        else:
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.new_tokens += value.numel()
        self.inner.put(value)

    def end(self):
        self.ended_at = time.perf_counter()
        self.inner.end()

    def summary(self) -> str:
        if self.first_token_at is None or self.ended_at is None:
            return "no tokens generated"
        prompt_time = self.first_token_at - self.started
        line = (
            f"prompt: {self.prompt_tokens} tokens in {prompt_time:.2f} s ({self.prompt_tokens / prompt_time:.1f} tok/s)"
        )
        decode_time = self.ended_at - self.first_token_at
        if self.new_tokens > 1 and decode_time > 0:
            rate = (self.new_tokens - 1) / decode_time
            line += f"; reply: {self.new_tokens} tokens, {rate:.1f} tok/s after the first"
        return line


def load_tokenizer(source: ModelSource):
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.load_from, local_files_only=source.local_files_only)
    except Exception as error:
        raise CliError(describe_load_error("tokenizer", source, error)) from None
    if len(tokenizer) < 2:  # transformers builds an empty tokenizer rather than fail when the files are missing
        raise CliError(f"{source.name} has no usable tokenizer files: download the checkpoint again.")
    return tokenizer


def check_hub_config(source: ModelSource) -> None:
    """Fetch only config.json first, so that a non-Qwen3.5 Hub model is refused before gigabytes are downloaded."""
    try:
        config = AutoConfig.from_pretrained(source.name, local_files_only=source.local_files_only)
    except Exception as error:
        raise CliError(describe_load_error("config", source, error)) from None
    check_model_type(config.model_type, source.name)


def check_checkpoint(source: ModelSource, allow_missing_weights: bool = False) -> None:
    if source.is_local:
        check_local_checkpoint(source.local_dir, allow_missing_weights)
    else:
        check_hub_config(source)


def load_model(source: ModelSource, dtype, device: str, quantize: str | None = None):
    # The Auto factories give our classes because importing this package (and so this module) registered them.
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.load_from, dtype=dtype, local_files_only=source.local_files_only
        )
    except Exception as error:
        raise CliError(describe_load_error("model", source, error)) from None
    return prepare_weights(model.to(device).eval(), device, quantize)


# --------------------------------------------------------------------------------------------------------------------
# Prompt and generation settings


def template_source(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates
        return " ".join(str(value) for value in template.values())
    return template or ""


def build_prompt(tokenizer, prompt: str, chat: bool, thinking: bool | None) -> str:
    """The text the model continues: the chat-formatted user turn (with the assistant's opening), or the raw prompt."""
    if not chat:
        return prompt
    template = template_source(tokenizer)
    if not template:
        info("note: this tokenizer has no chat template, so the prompt is used as plain text (as with --no-chat).")
        return prompt
    options = {}
    if thinking is not None:
        if "enable_thinking" in template:
            options["enable_thinking"] = thinking
        else:
            info("note: this model's chat template has no thinking switch; --thinking/--no-thinking is ignored.")
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **options)


def encode_prompt(tokenizer, model, text: str):
    # The chat template already wrote every special token the model expects.
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    if inputs["input_ids"].numel() == 0:
        raise CliError("the prompt is empty: give some text to continue, or drop --no-chat.")
    if int(inputs["input_ids"].max()) >= vocab_size:
        raise CliError(
            f"the tokenizer ({len(tokenizer)} tokens) does not match the model (vocabulary of {vocab_size}): "
            "use the tokenizer files that came with this checkpoint."
        )
    return {name: tensor.to(model.device) for name, tensor in inputs.items()}


def generation_settings(
    model, tokenizer, max_new_tokens: int, temperature: float | None, top_p: float | None, base=None
):
    """The checkpoint's generation_config.json (or ``base``), overridden by what was given on the command line."""
    settings = copy.deepcopy(base if base is not None else model.generation_config)
    settings.max_new_tokens = max_new_tokens
    settings.max_length = None  # max_new_tokens is the one limit the user sets
    if top_p is not None:
        settings.top_p = top_p
    if temperature is not None:
        settings.do_sample = temperature > 0
        if temperature > 0:
            settings.temperature = temperature
    if not settings.do_sample:
        # Greedy: drop sampling knobs so that transformers does not warn that they are ignored.
        settings.temperature = settings.top_p = settings.top_k = None
    if settings.pad_token_id is None:
        settings.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if settings.eos_token_id is None and tokenizer.eos_token_id is not None:
        settings.eos_token_id = tokenizer.eos_token_id
    return settings


@contextlib.contextmanager
def transformers_output(verbose: bool):
    """Keep stderr to our own notices (no progress bars or library warnings) unless --verbose.

    The previous settings come back afterwards, so that calling :func:`main` in-process leaves the caller's logging
    as it was.
    """
    verbosity = transformers_logging.get_verbosity()
    progress_bars = transformers_logging.is_progress_bar_enabled()
    if not verbose:
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if progress_bars:
            transformers_logging.enable_progress_bar()
        else:
            transformers_logging.disable_progress_bar()


# --------------------------------------------------------------------------------------------------------------------
# Arguments


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def seed_value(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**63 - 1, got {text}")
    return value


def check_text(text: str, what: str) -> str:
    """Text typed or passed on the command line that is not valid UTF-8 reaches Python as lone surrogates, which no
    tokenizer can encode: say so instead of failing inside it."""
    for position, character in enumerate(text):
        if 0xD800 <= ord(character) <= 0xDFFF:
            byte = f" (byte 0x{ord(character) - 0xDC00:02x})" if ord(character) >= 0xDC80 else ""
            raise CliError(
                f"{what} is not valid UTF-8 text: character {position + 1} cannot be encoded{byte}. Save or type it as "
                "UTF-8 (e.g. iconv -t utf-8)."
            )
    return text


FROM_GENERATION_CONFIG = "default: the model's generation_config.json"
MTP_HELP = (
    "draft K tokens per step with the checkpoint's multi-token-prediction head and verify them in one pass "
    "(same output, faster when drafts are accepted; 0 = off, default: %(default)s)"
)

QUANTIZE_CHOICES = ("int8", "int4")
QUANTIZE_HELP = (
    "CPU only: quantise the weights to 8 or 4 bits when loading (about 2x / 3x fewer bytes read per token than "
    "bf16, faster decoding, slightly different output; docs/performance.md)"
)
COMPILE_HELP = (
    "CPU only: compile the decoding step with torch.compile before the first reply (0.8B on 2 cores: ~30 s the first "
    "time, ~15 s once cached; then 20-40%% more tokens per second)"
)
STATS_HELP = "after each reply, print the prompt and reply speeds (tokens per second) to stderr"


ALLOW_MISSING_HELP = "run a checkpoint that lacks some weights (they are random: the output is meaningless)"
