"""Checkpoint layout: the one place that knows the official tensor names, shapes and dtypes.

* :func:`official_tensors` lists every tensor of an official checkpoint for a composite config (text, vision, MTP);
  its counts and byte total reproduce the official ``model.safetensors.index.json`` files.
* :func:`write_random_checkpoint` writes a random-weight checkpoint in exactly that layout (tests, ``qwen35 demo``).
* :func:`check_checkpoint_tensors` compares a checkpoint's tensors with a config from the file headers alone,
  before any weight is allocated (wrong shapes, integer dtypes, missing tensors).
* :class:`CarriedTensors` keeps track of what a text-only model loads but does not use (``model.visual.*``,
  ``mtp.*``) and of the composite ``config.json``, so that ``save_pretrained`` writes the official checkpoint back
  whole instead of silently dropping them. Tensors are read lazily from the source files at save time.

Loading itself is transformers' own: the built-in rule renames ``model.language_model.*`` to ``model.*`` for the
text-only classes (registered for ours in the package's ``registration.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.configuration import Qwen3_5Config
from .presets import tiny_config  # noqa: F401  (re-exported: the demo's and tests' checkpoint shape)

TEXT_PREFIX = "model.language_model."
CARRIED_PREFIXES = ("model.visual.", "mtp.")
FP32_SUFFIXES = ("linear_attn.A_log", "linear_attn.norm.weight")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CARRIED_SHARD = "model-carried.safetensors"


def _attention_tensors(text, prefix: str) -> dict[str, tuple]:
    h, d = text.hidden_size, text.head_dim
    return {
        f"{prefix}self_attn.q_proj.weight": (2 * text.num_attention_heads * d, h),
        f"{prefix}self_attn.k_proj.weight": (text.num_key_value_heads * d, h),
        f"{prefix}self_attn.v_proj.weight": (text.num_key_value_heads * d, h),
        f"{prefix}self_attn.o_proj.weight": (h, text.num_attention_heads * d),
        f"{prefix}self_attn.q_norm.weight": (d,),
        f"{prefix}self_attn.k_norm.weight": (d,),
    }


def _mlp_and_norms(text, prefix: str) -> dict[str, tuple]:
    h, inter = text.hidden_size, text.intermediate_size
    return {
        f"{prefix}input_layernorm.weight": (h,),
        f"{prefix}post_attention_layernorm.weight": (h,),
        f"{prefix}mlp.gate_proj.weight": (inter, h),
        f"{prefix}mlp.up_proj.weight": (inter, h),
        f"{prefix}mlp.down_proj.weight": (h, inter),
    }


def _deltanet_tensors(text, prefix: str) -> dict[str, tuple]:
    h = text.hidden_size
    key_dim = text.linear_num_key_heads * text.linear_key_head_dim
    value_dim = text.linear_num_value_heads * text.linear_value_head_dim
    conv_dim = 2 * key_dim + value_dim
    heads = text.linear_num_value_heads
    return {
        f"{prefix}linear_attn.in_proj_qkv.weight": (conv_dim, h),
        f"{prefix}linear_attn.in_proj_z.weight": (value_dim, h),
        f"{prefix}linear_attn.in_proj_b.weight": (heads, h),
        f"{prefix}linear_attn.in_proj_a.weight": (heads, h),
        f"{prefix}linear_attn.conv1d.weight": (conv_dim, 1, text.linear_conv_kernel_dim),
        f"{prefix}linear_attn.A_log": (heads,),
        f"{prefix}linear_attn.dt_bias": (heads,),
        f"{prefix}linear_attn.norm.weight": (text.linear_value_head_dim,),
        f"{prefix}linear_attn.out_proj.weight": (h, value_dim),
    }


def _vision_tensors(vision, prefix: str) -> dict[str, tuple]:
    vh, vi = vision.hidden_size, vision.intermediate_size
    merged = vh * vision.spatial_merge_size**2
    p, tp = vision.patch_size, vision.temporal_patch_size
    shapes = {
        f"{prefix}patch_embed.proj.weight": (vh, vision.in_channels, tp, p, p),
        f"{prefix}patch_embed.proj.bias": (vh,),
        f"{prefix}pos_embed.weight": (vision.num_position_embeddings, vh),
    }
    for j in range(vision.depth):
        block = f"{prefix}blocks.{j}."
        for name, shape in (
            ("norm1", (vh,)), ("norm2", (vh,)), ("attn.qkv", (3 * vh, vh)), ("attn.proj", (vh, vh)),
            ("mlp.linear_fc1", (vi, vh)), ("mlp.linear_fc2", (vh, vi)),
        ):  # fmt: skip
            shapes[f"{block}{name}.weight"] = shape
            shapes[f"{block}{name}.bias"] = (shape[0],)
    for name, shape in (
        ("merger.norm", (vh,)), ("merger.linear_fc1", (merged, merged)), ("merger.linear_fc2", (vision.out_hidden_size, merged))
    ):  # fmt: skip
        shapes[f"{prefix}{name}.weight"] = shape
        shapes[f"{prefix}{name}.bias"] = (shape[0],)
    return shapes


def official_tensors(config: Qwen3_5Config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of the official checkpoint for ``config``: name -> (shape, stored dtype)."""
    text, vision = config.text_config, config.vision_config
    shapes = {f"{TEXT_PREFIX}embed_tokens.weight": (text.vocab_size, text.hidden_size)}
    for i, layer_type in enumerate(text.layer_types):
        prefix = f"{TEXT_PREFIX}layers.{i}."
        mixer = _deltanet_tensors if layer_type == "linear_attention" else _attention_tensors
        shapes.update(_mlp_and_norms(text, prefix))
        shapes.update(mixer(text, prefix))
    shapes[f"{TEXT_PREFIX}norm.weight"] = (text.hidden_size,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (text.vocab_size, text.hidden_size)
    shapes.update(_vision_tensors(vision, "model.visual."))
    h = text.hidden_size
    shapes.update({"mtp.fc.weight": (h, 2 * h), "mtp.norm.weight": (h,)})
    shapes.update({"mtp.pre_fc_norm_embedding.weight": (h,), "mtp.pre_fc_norm_hidden.weight": (h,)})
    for j in range(getattr(text, "mtp_num_hidden_layers", 1)):
        shapes.update(_mlp_and_norms(text, f"mtp.layers.{j}."))
        shapes.update(_attention_tensors(text, f"mtp.layers.{j}."))
    return {
        name: (tuple(shape), torch.float32 if name.endswith(FP32_SUFFIXES) else torch.bfloat16)
        for name, shape in shapes.items()
    }


def _random_tensor(name: str, shape: tuple, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    is_text_norm = name.endswith("norm.weight") and not name.startswith("model.visual.")
    if name.endswith("linear_attn.norm.weight"):
        value = torch.ones(shape)
    elif name.endswith("A_log"):
        value = torch.empty(shape).uniform_(1, 16, generator=generator).log()
    elif name.endswith("dt_bias"):
        value = torch.ones(shape)
    elif is_text_norm:
        value = torch.zeros(shape)  # zero-centred: the norm multiplies by (1 + w)
    elif name.startswith("model.visual.") and ("norm" in name):
        value = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    elif name.endswith("bias"):
        value = torch.zeros(shape)
    else:
        value = torch.randn(shape, generator=generator) * 0.02
    return value.to(dtype)


def write_random_checkpoint(directory: str | os.PathLike, config: Qwen3_5Config, seed: int = 0) -> Path:
    """Write ``config.json`` and ``model.safetensors`` with random weights in the official layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: _random_tensor(name, shape, dtype, generator) for name, (shape, dtype) in official_tensors(config).items()
    }
    save_file(tensors, str(directory / SINGLE_NAME), metadata={"format": "pt"})
    config_dict = config.to_dict()
    config_dict["architectures"] = ["Qwen3_5ForConditionalGeneration"]
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str) + "\n")
    return directory


def _checkpoint_files(directory: Path) -> dict[str, Path]:
    """tensor name -> file, for a local checkpoint directory (sharded or single-file)."""
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE_NAME
    if single.is_file():
        with safe_open(str(single), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), single)
    return {}


# safetensors dtype names that can hold a weight (an integer tensor where a weight belongs would be cast silently).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def checkpoint_inventory(directory: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """tensor name -> (shape, safetensors dtype name), from the files' headers: nothing is read or allocated."""
    by_file: dict[Path, list[str]] = {}
    for name, file in _checkpoint_files(directory).items():
        by_file.setdefault(file, []).append(name)
    inventory = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            present = set(handle.keys())
            for name in names:
                if name in present:
                    piece = handle.get_slice(name)
                    inventory[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return inventory


def _decoder_key(name: str) -> str:
    """One spelling for the text decoder's tensors: official files say model.language_model.*, text-only saves model.*"""
    return "model." + name[len(TEXT_PREFIX) :] if name.startswith(TEXT_PREFIX) else name


def check_checkpoint_tensors(directory: Path, config, with_vision: bool, check_shapes: bool = True) -> list[str]:
    """Compare a local checkpoint's tensors (headers only) with what a model of ``config`` needs: the text decoder,
    ``lm_head`` when untied, the vision tower when ``with_vision``. Raises ValueError naming the first tensors of
    the wrong shape (unless ``check_shapes`` is off) or of a non-float dtype; returns the names the checkpoint lacks
    (the caller decides: transformers would fill them with random values)."""
    inventory = checkpoint_inventory(directory)
    if not inventory:
        return []  # no safetensors files (transformers reads other formats itself)
    composite = config if isinstance(config, Qwen3_5Config) else Qwen3_5Config(text_config=config.to_dict())
    composite.tie_word_embeddings = config.get_text_config().tie_word_embeddings
    wanted = {
        _decoder_key(name): shape
        for name, (shape, _) in official_tensors(composite).items()
        if name.startswith(TEXT_PREFIX)
        or name == "lm_head.weight"
        or (with_vision and name.startswith("model.visual."))
    }
    present = {_decoder_key(name): value for name, value in inventory.items()}
    not_float = [
        f"{name} ({dtype})" for name, (_, dtype) in present.items() if name in wanted and dtype not in FLOAT_DTYPES
    ]
    if not_float:
        raise ValueError(
            f"{directory} stores {len(not_float)} weight(s) as integers, e.g. {', '.join(not_float[:3])}: they would be "
            "cast to floats silently. Quantised checkpoints need their quantisation config; otherwise download the "
            "checkpoint again."
        )
    if check_shapes:
        wrong = [
            f"{name} {list(present[name][0])} (config: {list(shape)})"
            for name, shape in wanted.items()
            if name in present and tuple(present[name][0]) != tuple(shape)
        ]
        if wrong:
            raise ValueError(
                f"{directory}: {len(wrong)} tensor(s) do not match config.json, e.g. {'; '.join(wrong[:3])}. The "
                "config does not describe these weights (a composite config.json needs its text_config and "
                "vision_config: without them the 9B defaults apply). Use the config.json that came with the weights."
            )
    return sorted(name for name in wanted if name not in present)


def local_checkpoint_directory(name_or_path: str | os.PathLike, kwargs: dict) -> Path | None:
    """The local folder holding the checkpoint (``subfolder`` included): the path itself, or a hub id's cached copy;
    None when neither is on disk."""
    subfolder = kwargs.get("subfolder") or ""
    path = Path(name_or_path) / subfolder
    if path.is_dir():
        return path
    try:  # a hub id: from_pretrained has just cached the files
        from transformers.utils import cached_file

        config = cached_file(
            str(name_or_path),
            "config.json",
            cache_dir=kwargs.get("cache_dir"),
            revision=kwargs.get("revision"),
            subfolder=subfolder,
            local_files_only=True,
            _raise_exceptions_for_missing_entries=False,
        )
    except Exception:
        return None
    return Path(config).parent if config else None


@dataclass
class CarriedTensors:
    """What a text-only model keeps of an official checkpoint it does not use, to write it back on save."""

    files: dict[str, Path] = field(default_factory=dict)
    composite_config: dict | None = None

    @classmethod
    def from_checkpoint(
        cls, name_or_path, kwargs: dict, prefixes: tuple[str, ...] = CARRIED_PREFIXES, text_only: bool = True
    ) -> CarriedTensors | None:
        """``prefixes``: the tensors the model leaves unused; ``text_only``: also keep the composite config."""
        directory = local_checkpoint_directory(name_or_path, kwargs)
        if directory is None:
            return None
        files = {name: file for name, file in _checkpoint_files(directory).items() if name.startswith(prefixes)}
        config_path = directory / "config.json"
        composite = None
        if text_only and config_path.is_file():
            data = json.loads(config_path.read_text())
            composite = data if data.get("model_type") == "qwen3_5" else None
        if not files and composite is None:
            return None
        return cls(files=files, composite_config=composite)

    def write(self, directory: str | os.PathLike, text_config) -> None:
        """Add the carried tensors (and the composite config) to a checkpoint ``save_pretrained`` just wrote."""
        directory = Path(directory)
        if self.files:
            self._write_tensors(directory)
        if self.composite_config is not None:
            self._write_composite_config(directory, text_config)

    def _write_tensors(self, directory: Path) -> None:
        saved = _checkpoint_files(directory)
        carried = {}
        by_file: dict[Path, list[str]] = {}
        for name, file in self.files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            if not file.is_file():
                raise FileNotFoundError(
                    f"Cannot write back {len(names)} tensors ({names[0]}, ...) that this model was loaded with: their "
                    f"source file {file} is gone. Re-download the original checkpoint, or drop them with "
                    "`model.carried_tensors = None` before saving."
                )
            with safe_open(str(file), framework="pt") as handle:
                carried.update({name: handle.get_tensor(name) for name in names})
        shard = CARRIED_SHARD
        if not (directory / INDEX_NAME).is_file():
            # A lone model.safetensors would be loaded without the index: turn it into two named shards.
            first, shard = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
            (directory / SINGLE_NAME).rename(directory / first)
            saved = dict.fromkeys(saved, directory / first)
        save_file(carried, str(directory / shard), metadata={"format": "pt"})
        weight_map = {name: file.name for name, file in saved.items()}
        weight_map.update(dict.fromkeys(carried, shard))
        total = 0
        for shard in set(weight_map.values()):
            with safe_open(str(directory / shard), framework="pt") as handle:
                for name in handle.keys():
                    tensor_slice = handle.get_slice(name)
                    total += _nbytes(tensor_slice.get_shape(), tensor_slice.get_dtype())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def _write_composite_config(self, directory: Path, text_config) -> None:
        config = json.loads(json.dumps(self.composite_config))
        text = text_config.to_diff_dict() if hasattr(text_config, "to_diff_dict") else text_config.to_dict()
        text.pop("transformers_version", None)
        text.pop("architectures", None)
        config["text_config"] = {**config.get("text_config", {}), **text}
        config["tie_word_embeddings"] = bool(text_config.tie_word_embeddings)
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")


_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(shape, dtype: str) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * _DTYPE_BYTES.get(dtype, 2)


def read_checkpoint_json(name_or_path, filename: str, kwargs: dict) -> dict:
    """One JSON file of a checkpoint folder or Hub repo ({} when absent or unreachable), without loading anything."""
    from transformers.utils import cached_file

    hub = {
        key: kwargs[key] for key in ("cache_dir", "revision", "token", "local_files_only", "subfolder") if key in kwargs
    }
    quiet = dict(
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        _raise_exceptions_for_gated_repo=False,
    )
    try:
        path = cached_file(str(name_or_path), filename, **hub, **quiet)
        return json.loads(Path(path).read_text()) if path else {}
    except Exception:
        return {}
