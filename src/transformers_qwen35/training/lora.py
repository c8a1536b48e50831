"""LoRA target presets for Qwen3.5 and PEFT defaults for its model types.

PEFT (0.21.2) knows no Qwen3.5 targets: ``LoraConfig(task_type="CAUSAL_LM")`` without ``target_modules`` raises
"Please specify `target_modules` in `peft_config`", and ``target_modules="all-linear"`` on the multimodal model also
adapts the vision tower. The presets here are regular expressions, which PEFT matches with ``re.fullmatch`` against
every name of ``model.named_modules()`` (``peft.utils.other.match_target_against_key``), anchored on the module path:

* the text presets match ``<anything.>(model|language_model).layers.N.<block>.<projection>``, so they work on
  ``Qwen3_5ForCausalLM`` (``model.layers...``), on ``Qwen3_5ForConditionalGeneration``
  (``model.language_model.layers...``) and under PEFT's ``base_model.model.`` prefix, and never touch the vision
  tower (``model.visual.blocks.N...``), ``lm_head``, the embeddings or the MTP head (``mtp.layers.N...``);
* ``conv1d`` of the Gated DeltaNet is never a target: PEFT refuses depthwise convolutions, and the model passes
  ``conv1d.weight`` to the kernel without calling the module, so an adapter there would never run;
* one adapter per checkpoint module (``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``), the layout that
  servers (vLLM, SGLang) load.

``register_peft_defaults()`` makes the ``"all"`` preset PEFT's default for ``qwen3_5`` and ``qwen3_5_text``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LINEAR_ATTENTION = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

# Any prefix (or none) ending in a dot, then the decoder's layer list of the text model or of the multimodal model.
_DECODER_LAYER = r"(?:.*\.)?(?:model|language_model)\.layers\.\d+\."
_VISION = r"(?:.*\.)?visual\."


def _alternatives(names: Iterable[str]) -> str:
    return "(?:" + "|".join(re.escape(name) for name in names) + ")"


def _decoder(block: str, names: Iterable[str]) -> str:
    return f"{_DECODER_LAYER}{block}\\.{_alternatives(names)}"


_TEXT_PRESETS = {
    "attention": _decoder("self_attn", ATTENTION),
    "linear_attention": _decoder("linear_attn", LINEAR_ATTENTION),
    "mlp": _decoder("mlp", MLP),
}
_TEXT_PRESETS["all"] = (
    f"{_DECODER_LAYER}(?:self_attn\\.{_alternatives(ATTENTION)}"
    f"|linear_attn\\.{_alternatives(LINEAR_ATTENTION)}"
    f"|mlp\\.{_alternatives(MLP)})"
)
_VISION_PATTERN = (
    f"{_VISION}(?:blocks\\.\\d+\\.(?:attn\\.(?:qkv|proj)|mlp\\.(?:linear_fc1|linear_fc2))"
    r"|merger\.(?:linear_fc1|linear_fc2))"
)

PRESETS: dict[str, str] = {
    **_TEXT_PRESETS,
    "vision": _VISION_PATTERN,
    "all+vision": f"(?:{_TEXT_PRESETS['all']})|(?:{_VISION_PATTERN})",
}

# PEFT's default-target table is keyed by `config.model_type`: the composite (multimodal) and the text-only config.
MODEL_TYPES = ("qwen3_5", "qwen3_5_text")


def lora_target_modules(preset: str = "all") -> str:
    """``target_modules`` for ``peft.LoraConfig``: a regular expression selecting the preset's ``nn.Linear`` layers.

    Presets:

    * ``"all"``: every linear layer of the text decoder: attention ``q_proj``/``k_proj``/``v_proj``/``o_proj``,
      Gated DeltaNet ``in_proj_qkv``/``in_proj_z``/``in_proj_b``/``in_proj_a``/``out_proj``, MLP
      ``gate_proj``/``up_proj``/``down_proj`` (not ``lm_head``, not the vision tower);
    * ``"attention"``, ``"linear_attention"``, ``"mlp"``: one of those three groups;
    * ``"vision"``: the vision tower's linear layers: ``blocks.N.attn.qkv``, ``blocks.N.attn.proj``,
      ``blocks.N.mlp.linear_fc1``/``linear_fc2``, ``merger.linear_fc1``/``linear_fc2`` (not the Conv3d patch embedding);
    * ``"all+vision"``: both.

    The result is a string, which PEFT treats as a regex that must match the whole module name.
    """
    try:
        return PRESETS[preset]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown LoRA target preset {preset!r}; choose one of {', '.join(repr(name) for name in PRESETS)}."
        ) from None


def register_peft_defaults() -> bool:
    """Make ``lora_target_modules("all")`` PEFT's default LoRA targets for ``qwen3_5`` and ``qwen3_5_text``.

    After this, ``get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))`` without ``target_modules`` adapts the text
    decoder's linear layers (never the vision tower). PEFT reads ``LoraModel.target_module_mapping``, which is the
    very dict object ``peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` (also used by the
    mixed-adapter model), so the dict is updated in place; an entry a PEFT release may ship for these model types is
    replaced, since this package's module layout is what the model has. Idempotent; returns False (and does nothing)
    when PEFT is not installed.
    """
    try:
        from peft.utils import constants
    except ImportError:
        return False
    mapping = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    for model_type in MODEL_TYPES:
        mapping[model_type] = PRESETS["all"]
    return True


def _matches(target: str, name: str) -> bool:
    """PEFT's rule for one entry of a list ``target_modules``: the whole name, or a dotted suffix of it."""
    return name == target or name.endswith(f".{target}")


def _examples(model: nn.Module, limit: int = 20) -> str:
    """Distinct names of the model's linear layers, layer indices folded to N (for error messages)."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            seen.setdefault(re.sub(r"\.\d+\.", ".N.", name))
    names = list(seen)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def matched_modules(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Names of ``model``'s modules that PEFT would adapt for ``target_modules`` (PEFT's own matching rules)."""
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(target_modules, str):
        return [name for name in names if re.fullmatch(target_modules, name)]
    targets = list(target_modules)
    return [name for name in names if any(_matches(target, name) for target in targets)]


def check_lora_targets(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Raise ``ValueError`` when a target matches no module of ``model``; return the matched module names.

    PEFT raises (``NoMatchingPeftModuleError``, a ``ValueError``) only when *nothing* matches, with a message that
    lists no module names, and it silently ignores the entries of a list that match nothing as long as one entry
    matches (``["q_proj", "in_proj_qkvz"]`` adapts the attention layers only: ``in_proj_qkvz`` is a Qwen3-Next name
    that Qwen3.5 does not have). This check names every entry that matches nothing and shows the linear layers the
    model does have. ``"all-linear"`` is accepted as PEFT's shorthand and not checked further.
    """
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        try:
            re.compile(target_modules)
        except re.error as error:
            raise ValueError(
                f"LoRA target_modules {target_modules} is not a valid regular expression: {error}."
            ) from None
        matched = matched_modules(model, target_modules)
        if not matched:
            raise ValueError(
                f"LoRA target_modules {target_modules} (a regular expression that must match a whole module name) "
                f"matches no module of {type(model).__name__}. Its linear layers are: {_examples(model)}."
            )
        return matched
    targets = list(target_modules)
    if not targets:
        raise ValueError("LoRA target_modules is empty.")
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [target for target in targets if not any(_matches(target, name) for name in names)]
    if unmatched:
        raise ValueError(
            f"LoRA target_modules {', '.join(repr(target) for target in unmatched)} "
            f"match{'es' if len(unmatched) == 1 else ''} no module of {type(model).__name__} (an entry must be a "
            f"whole module name or its last dotted parts). Its linear layers are: {_examples(model)}."
        )
    return matched_modules(model, targets)


__all__ = ["PRESETS", "check_lora_targets", "lora_target_modules", "matched_modules", "register_peft_defaults"]
