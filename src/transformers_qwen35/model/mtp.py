"""The multi-token-prediction (MTP) head every official Qwen3.5 checkpoint ships (``mtp.*``, 15 tensors).

From the main model's final (normed) hidden state at position ``t`` and the embedding of token ``t + 1`` it predicts
token ``t + 2``::

    u = fc([pre_fc_norm_embedding(embed(token[t + 1])) ; pre_fc_norm_hidden(H[t])])   # 2h -> h, embedding first
    u = layers[0](u)           # a gated full-attention decoder layer with its own KV cache, RoPE at position t
    logits = lm_head(norm(u))  # the main model's embedding and output head are shared

That is the math vLLM serves (``qwen3_5_mtp.py``); whether ``H[t]`` is taken before or after the main model's final
norm is not documented anywhere we could find. We follow vLLM (after). A draft a further step ahead feeds the head
its own normed output in place of ``H``.

Built-in transformers drops these tensors at load. We do not put them in the module tree either (the parameter
count, ``state_dict`` and training stay those of the official classes); :func:`mtp_head` builds the head on first use
from the checkpoint files the model was loaded from (``model.carried_tensors``, which also writes them back on save).
"""

from __future__ import annotations

import itertools

import torch
from safetensors import safe_open
from torch import nn

from ..core.cache import Qwen3_5HybridCache
from ..core.configuration import FULL_ATTENTION
from .layers import Qwen3_5DecoderLayer, Qwen3_5RMSNorm

PREFIX = "mtp."


class Qwen3_5MultiTokenPredictor(nn.Module):
    """Attribute names are the checkpoint's (``mtp.`` removed), so its tensors load unchanged."""

    def __init__(self, config):
        super().__init__()
        layers = getattr(config, "mtp_num_hidden_layers", 1)
        if layers != 1:
            raise NotImplementedError(
                f"mtp_num_hidden_layers={layers}: only the single-layer MTP head of the official checkpoints is "
                "supported."
            )
        h, eps = config.hidden_size, config.rms_norm_eps
        self.config = config
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = Qwen3_5RMSNorm(h, eps=eps)
        self.pre_fc_norm_hidden = Qwen3_5RMSNorm(h, eps=eps)
        self.layers = nn.ModuleList([Qwen3_5DecoderLayer(config, 0, layer_type=FULL_ATTENTION)])
        self.norm = Qwen3_5RMSNorm(h, eps=eps)

    def new_cache(self) -> Qwen3_5HybridCache:
        return Qwen3_5HybridCache(_AttentionOnly())

    def forward(self, hidden_states, token_embeddings, position_embeddings, attention_mask, cache) -> torch.Tensor:
        """``hidden_states`` ``(B, T, h)``: the main model's final hidden states at positions ``t`` (or the head's own
        output, a step further ahead); ``token_embeddings`` ``(B, T, h)``: embeddings of the tokens at ``t + 1``;
        ``position_embeddings``: cos/sin for positions ``t``; ``attention_mask``: boolean ``(B, 1, T, past + T)`` or
        None. Returns the normed output ``(B, T, h)``, ready for ``lm_head``."""
        joined = torch.cat(
            [self.pre_fc_norm_embedding(token_embeddings), self.pre_fc_norm_hidden(hidden_states)], dim=-1
        )
        hidden = self.fc(joined)
        for layer in self.layers:
            hidden, _ = layer(
                hidden, position_embeddings=position_embeddings, attention_mask=attention_mask, cache=cache
            )
        cache.seen_tokens += hidden.shape[1]
        return self.norm(hidden)


class _AttentionOnly:
    layer_types = [FULL_ATTENTION]


def set_mtp_head(model, head: Qwen3_5MultiTokenPredictor | None) -> None:
    """Give ``model`` this MTP head (or none) instead of the one from its checkpoint: for models built from a config
    (benchmarks, tests) or heads kept elsewhere. ``mtp_head`` moves it to the model's device and dtype."""
    if head is None:
        model.__dict__.pop("_mtp_head", None)
    else:
        model.__dict__["_mtp_head"] = head.eval()


def mtp_head(model) -> Qwen3_5MultiTokenPredictor:
    """The model's MTP head, built from its checkpoint on first use and kept on the ``lm_head``'s device and dtype."""
    lm_head = model.get_output_embeddings()
    # The head's first tensor, parameter or buffer: a head packed for CPU decoding (cpu_weights.py) holds no weight.
    anchor = next(itertools.chain(lm_head.parameters(), lm_head.buffers()))
    device, dtype = anchor.device, model.get_input_embeddings().weight.dtype
    head = model.__dict__.get("_mtp_head")
    if head is None:
        head = _load_head(model)
        # Not registered as a submodule: it must stay out of state_dict, parameters() and the saved checkpoint.
        model.__dict__["_mtp_head"] = head
    reference = head.fc.weight
    if reference.device != device or reference.dtype != dtype:
        head.to(device=device, dtype=dtype)
    return head


def _load_head(model) -> Qwen3_5MultiTokenPredictor:
    carried = getattr(model, "carried_tensors", None)
    files = {name: file for name, file in (carried.files if carried else {}).items() if name.startswith(PREFIX)}
    if not files:
        raise ValueError(
            "mtp_draft_tokens > 0 needs the checkpoint's multi-token-prediction head (the mtp.* tensors), and this "
            "model has none: it was not loaded with from_pretrained from an official Qwen3.5 checkpoint, or from one "
            "saved by a tool that drops them (built-in transformers does). Load the official checkpoint (or one "
            "saved by this package), or generate with mtp_draft_tokens=0."
        )
    text_config = model.config.get_text_config()
    with torch.device("meta"):
        head = Qwen3_5MultiTokenPredictor(text_config)
    state = {}
    by_file: dict = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        if not file.is_file():
            raise FileNotFoundError(
                f"The MTP head's tensors were in {file}, which is gone. Re-download the checkpoint, or generate with "
                "mtp_draft_tokens=0."
            )
        with safe_open(str(file), framework="pt") as handle:
            state.update({name[len(PREFIX) :]: handle.get_tensor(name) for name in names})
    expected = set(head.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"The checkpoint's mtp.* tensors do not match the MTP head: missing {missing[:4]}, unexpected "
            f"{extra[:4]}. Generate with mtp_draft_tokens=0."
        )
    head.load_state_dict(state, assign=True, strict=True)
    return head.eval()
