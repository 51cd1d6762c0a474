"""The systems an evaluation compares: no system prompt, a text prompt, or a trained soft prompt.

A soft prompt is read from a `.npy` file, an exported `soft_prompt.safetensors` with
its JSON sidecar, or a training work directory (`final_soft_prompt.npy` with the
run's JSON files). Its metadata records which model it was trained for. A soft
prompt trained for another model produces fluent-looking nonsense rather than an
error, so every recorded property is checked against the loaded model before any
generation: hidden size, architecture, chat template sha256, and the weight file's
sha256 or the hub id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from mcd_jax.chat import PLACEMENTS
from mcd_jax.data.languages import canonical_language
from mcd_jax.models.loading import LoadedModel
from mcd_jax.prompts import DEFAULT_TEXT_PROMPT
from mcd_jax.soft_prompt import check_soft_prompt

BUILTIN_SYSTEMS = ("none", "default")
"""Names of the systems without a soft prompt: no system prompt, and `DEFAULT_TEXT_PROMPT`."""

WORKDIR_SOFT_PROMPT = "final_soft_prompt.npy"
EXPORTED_SOFT_PROMPT = "soft_prompt.safetensors"
EXPORT_SIDECAR = "soft_prompt.json"
SAFETENSORS_TENSOR_NAMES = ("soft_prompt", "prompt_embeddings")

# Metadata keys, as dotted paths into the JSON files. A key matches when a flattened
# path equals it or ends with "." plus it, so {"model": {"sha256": ...}} matches
# "model.sha256". The first key of each list that is present wins.
_METADATA_KEYS = {
    "hidden_size": ("hidden_size", "token_dim", "soft_prompt_shape.1"),
    "model_type": ("model_type", "architecture"),
    "chat_template_sha256": ("chat_template_sha256", "chat_template.sha256", "template_sha256"),
    "model_sha256": (
        "model_sha256",
        "model.sha256",
        "source.sha256",
        "base_model.sha256",
        "model_source.sha256",
    ),
    "hub_id": ("model.hub_id", "source.hub_id", "base_model.hub_id", "model_source.hub_id"),
    "placement": ("placement",),
    "languages": ("train_languages", "training_languages", "languages"),
}


class IncompatibleSoftPromptError(ValueError):
    """A soft prompt's metadata records a different model or chat template than the loaded one."""


@dataclasses.dataclass(frozen=True)
class EvaluatedSystem:
    """One column of the comparison: what goes in the system slot.

    Attributes:
      name: the display name, e.g. "none", "default", "MCD".
      kind: "none", "text_prompt" or "soft_prompt".
      text_prompt: the text prompt, for kind "text_prompt".
      soft_prompt: [P, d] float32, for kind "soft_prompt".
      placement: "system_slot" or "prefix", for a soft prompt.
      trained_languages: the soft prompt's training languages; empty otherwise.
      source: the file or folder the soft prompt was read from, for the report.
      metadata: the JSON metadata found next to the soft prompt.
    """

    name: str
    kind: str
    text_prompt: str | None = None
    soft_prompt: np.ndarray | None = None
    placement: str = "system_slot"
    trained_languages: tuple[str, ...] = ()
    source: str | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """Return what the report records about this system (no arrays)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "text_prompt": self.text_prompt,
            "soft_prompt_shape": None if self.soft_prompt is None else list(self.soft_prompt.shape),
            "placement": self.placement if self.kind == "soft_prompt" else None,
            "trained_languages": list(self.trained_languages),
            "source": self.source,
        }


def builtin_system(name: str, text_prompt: str = DEFAULT_TEXT_PROMPT) -> EvaluatedSystem:
    """Build "none" (empty system slot) or "default" (`text_prompt` in the system slot).

    Raises:
      ValueError: `name` is not one of `BUILTIN_SYSTEMS`.
    """
    if name == "none":
        return EvaluatedSystem(name="none", kind="none")
    if name == "default":
        return EvaluatedSystem(name="default", kind="text_prompt", text_prompt=text_prompt)
    raise ValueError(
        f"unknown system {name!r}: the systems without a soft prompt are {list(BUILTIN_SYSTEMS)}; "
        "add soft prompts as name=path pairs instead"
    )


def chat_template_sha256(tokenizer: Any) -> str:
    """Hash the tokenizer's chat template string (UTF-8) with sha256, as exports record it.

    Raises:
      ValueError: the tokenizer has no chat template.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the tokenizer has no chat template; evaluation needs a chat model")
    if not isinstance(template, str):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def load_soft_prompt_system(
    name: str,
    path: str | os.PathLike,
    loaded: LoadedModel,
    *,
    trained_languages: Sequence[str] | None = None,
    check_model_source: bool = True,
) -> EvaluatedSystem:
    """Read a soft prompt and its metadata, and check both against the loaded model.

    Args:
      name: the display name, e.g. "MCD".
      path: a `.npy` file, a `.safetensors` file, an export folder of
        `mcd_jax.export` (with `soft_prompt.json`), or a training work directory
        containing `final_soft_prompt.npy`.
      loaded: the model the soft prompt will be evaluated with.
      trained_languages: overrides the training languages in the metadata.
      check_model_source: compare the recorded weight-file sha256 and hub id too.
        Turn it off to evaluate on another copy or quantization of the same model;
        architecture, hidden size and chat template are compared either way.

    Returns:
      The soft-prompt system.

    Raises:
      FileNotFoundError: the path does not exist or contains no soft prompt.
      IncompatibleSoftPromptError: the metadata records another model or template.
      ValueError: the array is not [P, d] with the model's d, or has NaN or inf.
    """
    array, metadata, source = read_soft_prompt(path)
    check_compatible(name, source, metadata, loaded, check_model_source=check_model_source)
    check_soft_prompt(array, loaded.config.hidden_size)

    placement = _metadata_value(metadata, "placement") or "system_slot"
    if placement not in PLACEMENTS:
        raise ValueError(
            f"soft prompt {name!r} ({source}) records placement {placement!r}; "
            f"expected one of {list(PLACEMENTS)}"
        )
    recorded = _metadata_value(metadata, "languages")
    languages = _trained_languages(name, recorded, trained_languages)
    logging.info(
        "Soft prompt %s: shape %s from %s, placement %s, trained languages %s",
        name,
        array.shape,
        source,
        placement,
        ",".join(languages) or "unknown",
    )
    return EvaluatedSystem(
        name=name,
        kind="soft_prompt",
        soft_prompt=array,
        placement=placement,
        trained_languages=languages,
        source=source,
        metadata=metadata,
    )


def _trained_languages(name: str, recorded: Any, override: Sequence[str] | None) -> tuple[str, ...]:
    recorded_codes = (
        tuple(canonical_language(code) for code in recorded)
        if isinstance(recorded, list | tuple)
        else ()
    )
    if override is None:
        return recorded_codes
    codes = tuple(canonical_language(code) for code in override)
    if recorded_codes and set(recorded_codes) != set(codes):
        logging.warning(
            "Soft prompt %s records training languages %s; using %s as requested",
            name,
            ",".join(recorded_codes),
            ",".join(codes),
        )
    return codes


def read_soft_prompt(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any], str]:
    """Read a soft prompt array and the JSON metadata found next to it.

    An export of `mcd_jax.export` is a folder with the sidecar `soft_prompt.json`.
    It is read with `mcd_jax.export.load_export`, which also checks the SHA-256 of
    every exported file, and the sidecar is the metadata. Otherwise the
    metadata files are merged in this order, later files winning on equal keys:
    for a work directory `config.json`, `fingerprint.json` and `model.json`; a
    safetensors file's own header; then `<stem>.json` and `<name>.json` beside
    the file (a work directory's `final_soft_prompt.json`).

    Args:
      path: see `load_soft_prompt_system`.

    Returns:
      ([P, d] float32 array, merged metadata, the file or folder read).

    Raises:
      FileNotFoundError: nothing at `path`, or a folder without a soft prompt file.
      ValueError: a file in an unsupported format or without a soft-prompt tensor,
        or an export whose files were modified (`mcd_jax.export.ExportError`).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"soft prompt path {os.fspath(path)!r} does not exist")
    folder = path if path.is_dir() else path.parent
    if _is_export_sidecar(folder / EXPORT_SIDECAR):
        return _read_export(folder)

    metadata: dict[str, Any] = {}
    if path.is_dir():
        file = _soft_prompt_file_in(path)
        if file.name == WORKDIR_SOFT_PROMPT:
            for name in ("config.json", "fingerprint.json", "model.json"):
                metadata.update(_read_json(path / name))
    else:
        file = path

    if file.suffix == ".npy":
        array = np.load(file, allow_pickle=False)
    elif file.suffix == ".safetensors":
        array, header = _read_safetensors(file)
        metadata.update(header)
    else:
        raise ValueError(
            f"soft prompt file {os.fspath(file)!r} has an unsupported suffix; pass a .npy or "
            ".safetensors file, an export folder or a training work directory"
        )
    for sidecar in (file.with_suffix(".json"), file.with_name(file.name + ".json")):
        metadata.update(_read_json(sidecar))
    return np.asarray(array, np.float32), metadata, os.fspath(file)


def _is_export_sidecar(path: Path) -> bool:
    from mcd_jax.export import METADATA_FORMAT

    return path.is_file() and _read_json(path).get("format") == METADATA_FORMAT


def _read_export(folder: Path) -> tuple[np.ndarray, dict[str, Any], str]:
    from mcd_jax.export import load_export

    exported = load_export(folder)
    metadata = _read_json(folder / EXPORT_SIDECAR)
    return np.asarray(exported.soft_prompt, np.float32), metadata, os.fspath(folder)


def _soft_prompt_file_in(folder: Path) -> Path:
    for name in (EXPORTED_SOFT_PROMPT, WORKDIR_SOFT_PROMPT):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"folder {os.fspath(folder)!r} contains neither {EXPORTED_SOFT_PROMPT} (an export) nor "
        f"{WORKDIR_SOFT_PROMPT} (a finished training run); pass the soft prompt file itself"
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"soft prompt metadata {os.fspath(path)!r} is not valid JSON: {error}"
        ) from error
    if not isinstance(payload, dict):
        raise ValueError(
            f"soft prompt metadata {os.fspath(path)!r} contains a {type(payload).__name__}; "
            "expected a JSON object"
        )
    return payload


def _read_safetensors(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="numpy") as file:
        names = list(file.keys())
        header = dict(file.metadata() or {})
        chosen = next((name for name in SAFETENSORS_TENSOR_NAMES if name in names), None)
        if chosen is None and len(names) == 1:
            chosen = names[0]
        if chosen is None:
            raise ValueError(
                f"{os.fspath(path)!r} has the tensors {names}; expected one tensor or one named "
                f"one of {list(SAFETENSORS_TENSOR_NAMES)}"
            )
        array = file.get_tensor(chosen)

    # Header metadata values are strings; JSON-encoded ones are decoded.
    for key, value in header.items():
        try:
            header[key] = json.loads(value)
        except (TypeError, json.JSONDecodeError):
            pass
    return array, header


def _flatten(payload: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(payload, Mapping):
        flat: dict[str, Any] = {}
        for key, value in payload.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(payload, list) and prefix.endswith("shape."):
        return {f"{prefix}{index}": value for index, value in enumerate(payload)}
    return {prefix[:-1]: payload}


def _metadata_value(metadata: Mapping[str, Any], field: str) -> Any:
    """Return the first value found for one of `_METADATA_KEYS[field]`, or None."""
    flat = _flatten(metadata)
    for key in _METADATA_KEYS[field]:
        for path, value in flat.items():
            if value is not None and (path == key or path.endswith("." + key)):
                return value
    return None


def _normalized(field: str, value: Any) -> str:
    text = str(value)
    if field == "model_type":
        # Exports may record the transformers class name, e.g. "Qwen2ForCausalLM" for "qwen2".
        return text.removesuffix("ForCausalLM").lower()
    return text


def check_compatible(
    name: str,
    source: str,
    metadata: Mapping[str, Any],
    loaded: LoadedModel,
    *,
    check_model_source: bool = True,
) -> None:
    """Compare a soft prompt's recorded model properties with the loaded model.

    A property missing on either side is not compared, and a warning is logged when
    none can be compared. With `check_model_source=False` only the architecture,
    hidden size and chat template are compared, not the weights' sha256 or hub id.

    Raises:
      IncompatibleSoftPromptError: one or more properties differ; the message
        lists each with both values.
    """
    current = {
        "hidden_size": loaded.config.hidden_size,
        "model_type": loaded.config.model_type,
        "chat_template_sha256": chat_template_sha256(loaded.tokenizer),
    }
    if check_model_source:
        current["model_sha256"] = loaded.source.get("sha256")
        current["hub_id"] = loaded.source.get("hub_id")
    compared, differences = 0, []
    for field, value in current.items():
        recorded = _metadata_value(metadata, field)
        if recorded is None or value is None:
            continue
        compared += 1
        if _normalized(field, recorded) != _normalized(field, value):
            differences.append(f"{field}: soft prompt {recorded!r}, model {value!r}")

    if differences:
        hint = ""
        if all(line.startswith(("model_sha256", "hub_id")) for line in differences):
            hint = (
                " If this is another copy or quantization of the same model, pass "
                "check_model_source=False (--ignore_model_source)."
            )
        raise IncompatibleSoftPromptError(
            f"soft prompt {name!r} ({source}) was trained for another model or chat template:\n  "
            + "\n  ".join(differences)
            + "\nEvaluate it with the model it was trained for, or pass the soft prompt "
            "trained for this model." + hint
        )
    if compared == 0:
        logging.warning(
            "Soft prompt %s (%s) records no model properties; only its width is checked "
            "against the model's hidden size",
            name,
            source,
        )
