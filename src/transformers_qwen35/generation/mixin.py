"""``generate()`` for the two generating heads (``Qwen3_5ForCausalLM``, ``Qwen3_5ForConditionalGeneration``).

transformers' ``GenerationMixin`` does the work; this mixin adds what our checkpoints and caches call for before
handing over: ``mtp_draft_tokens`` (self-speculative decoding with the checkpoint's MTP head) and
``cache_implementation="static"`` (fixed-shape decoding state, CUDA graphs on a GPU) run our loop
(``speculative.py``) as transformers' ``custom_generate``; on CUDA the static loop is the default for the requests it
serves exactly. Like transformers' mixin, this code receives the model and asks it (its config, its text model, its
MTP head through ``get_mtp_head()``); it never imports the modeling code, which imports it.
"""

from __future__ import annotations

import copy
import functools

from transformers import GenerationMixin

from ..kernels.graph_key import adapter_layers, moved_by_hooks
from . import speculative
from .static_decode import cuda_graphs_enabled


class Qwen3_5GenerationMixin(GenerationMixin):
    def generate(self, *args, **kwargs):
        if "enable_thinking" in kwargs:
            # The prompt is already rendered by then; ignoring the switch would silently use the other mode.
            raise ValueError(
                "enable_thinking is a chat-template option, not a generate() argument: pass it to "
                "apply_chat_template(..., enable_thinking=...), or to pipeline('text-generation') as "
                "tokenizer_encode_kwargs={'enable_thinking': ...} (pipeline('image-text-to-text') takes it directly)."
            )
        draft_tokens = kwargs.pop("mtp_draft_tokens", 0)
        static = _static_cache_requested(self, kwargs)
        if draft_tokens or static:
            # Self-speculative decoding with the checkpoint's MTP head and/or fixed-shape decoding state (CUDA
            # graphs on a GPU): transformers prepares the inputs, speculative.py runs the loop.
            speculative.check_request(self, draft_tokens, kwargs)
            if kwargs.get("custom_generate") is not None:
                raise ValueError(
                    "mtp_draft_tokens / cache_implementation='static' cannot be combined with custom_generate."
                )
            # transformers hands a custom_generate callable neither the streamer nor synced_gpus: bind them here.
            decode = functools.partial(
                speculative.mtp_generate,
                draft_tokens=draft_tokens,
                static=static,
                streamer=kwargs.pop("streamer", None),
                synced_gpus=kwargs.pop("synced_gpus", None),
            )
            return super().generate(*args, custom_generate=decode, **kwargs)
        return super().generate(*args, **kwargs)


def _static_cache_requested(model, kwargs: dict) -> bool:
    """Whether ``generate()`` decodes on our fixed-shape state (``static_decode.py``: a static *hybrid* cache, CUDA
    graphs on a GPU): asked for with ``cache_implementation="static"`` (argument or generation config), and the default on
    CUDA for the requests it serves. ``cache_implementation="dynamic"`` keeps transformers' own loop. The request is
    taken out of what transformers sees, which would otherwise build its attention-only StaticCache or DynamicCache."""
    requested = kwargs.pop("cache_implementation", None)
    if requested == "dynamic":
        return False  # our growing hybrid cache, transformers' loop
    if requested not in (None, "static"):
        kwargs["cache_implementation"] = requested
        return False
    config = kwargs.get("generation_config") or model.generation_config
    configured = getattr(config, "cache_implementation", None)
    if requested is None and configured == "static":
        requested = "static"
    if requested == "static" and configured == "static":
        config = copy.deepcopy(config)
        config.cache_implementation = None
        kwargs["generation_config"] = config
    if requested is None and configured is None:
        return _static_by_default(model, kwargs)
    return requested == "static"


def _decodes_on_cuda_graphs(model) -> bool:
    return model.device.type == "cuda" and cuda_graphs_enabled()


def _packed_for_cpu(model) -> bool:
    return model.device.type == "cpu" and getattr(model, "cpu_weights", None) is not None


def _compiled_on_cpu(model, kwargs: dict) -> bool:
    """A CPU model asked for compiled decoding (``compile_config``, ``compiled_step.py``), which our static loop
    provides there."""
    config = kwargs.get("generation_config") or model.generation_config
    compile_config = kwargs.get("compile_config", getattr(config, "compile_config", None))
    disabled = kwargs.get("disable_compile", getattr(config, "disable_compile", False))
    return model.device.type == "cpu" and compile_config is not None and not disabled


def _static_by_default(model, kwargs: dict) -> bool:
    """On CUDA, plain ``generate()`` replays each decoding step as a CUDA graph (many times faster than launching
    ~24 layers of small kernels from Python) whenever the request is one the static loop serves exactly; anything
    else (beam search, per-step outputs, a cache to continue, a returned cache...) keeps transformers' loop. A model
    packed for CPU decoding (``model/cpu_weights.py``) takes the static loop too: without graphs, its leaner step is
    still ~10 % faster there (0.8B, packed bf16, 2 cores: 6.6 -> 7.3 tokens/s), as does any CPU model asked for
    compiled decoding (``compile_config``)."""
    if moved_by_hooks(model):
        return False
    if not (_decodes_on_cuda_graphs(model) or _packed_for_cpu(model) or _compiled_on_cpu(model, kwargs)):
        return False
    if adapter_layers(model):
        # PEFT adapters switch in Python (enable, disable, set_adapter, scale): each switch would need a new capture.
        # Such models keep transformers' loop unless asked (cache_implementation="static" recaptures on a switch).
        return False
    config = kwargs.get("generation_config") or model.generation_config
    for key in ("return_dict_in_generate", "custom_generate", "synced_gpus"):
        if kwargs.get(key, getattr(config, key, None)):
            return False
    if kwargs.get("use_cache", getattr(config, "use_cache", True)) is False:
        return False
    try:
        speculative.check_request(model, 0, kwargs)
    except ValueError:
        return False
    return True
