"""Read checkpoint tensors one at a time from safetensors or GGUF files.

Both readers expose the same small interface (`keys`, `shape`, `read`) under Hugging Face
key names, so the loader never needs the whole checkpoint in host memory: safetensors
files are memory-mapped, and GGUF tensors are dequantized only when read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from absl import logging
from safetensors import SafetensorError, safe_open

from mcd_jax.models.gguf_layout import read_gguf_layout
from mcd_jax.models.key_map import gguf_name_to_hf

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match the config."""


class SafetensorsCheckpoint:
    """The tensors of a folder with `model.safetensors` or a sharded index."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._file_of_key = _safetensors_layout(folder)
        self._handles = {}
        for filename in sorted(set(self._file_of_key.values())):
            self._handles[filename] = _open_safetensors(folder / filename)
        for key, filename in self._file_of_key.items():
            if key not in self._handles[filename].keys():
                raise CheckpointError(
                    f"{folder / SAFETENSORS_INDEX} lists tensor {key!r} in {filename}, but that "
                    "file has no such tensor; the download is incomplete or the index is stale. "
                    "Download the checkpoint again."
                )

    def keys(self) -> list[str]:
        """Return every tensor key."""
        return list(self._file_of_key)

    def location(self, key: str) -> str:
        """Return the file that contains `key`, for error messages."""
        return str(self.folder / self._file_of_key[key])

    def shape(self, key: str) -> tuple[int, ...]:
        """Return a tensor's shape without reading its data."""
        return tuple(self._handles[self._file_of_key[key]].get_slice(key).get_shape())

    def read(self, key: str) -> np.ndarray:
        """Read one tensor as a NumPy array in its stored dtype."""
        try:
            return self._handles[self._file_of_key[key]].get_tensor(key)
        except SafetensorError as error:
            raise CheckpointError(
                f"cannot read tensor {key!r} from {self.location(key)}: {error}. The file is "
                "corrupt; download the checkpoint again."
            ) from error


def _safetensors_layout(folder: Path) -> dict[str, str]:
    """Map each tensor key to its file name, from the index or the single file."""
    index_path = folder / SAFETENSORS_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"{index_path} is not a valid safetensors index (it needs a 'weight_map' "
                f"object): {error}. Download the checkpoint again."
            ) from error
        for filename in sorted(set(weight_map.values())):
            if not (folder / filename).is_file():
                raise CheckpointError(
                    f"{index_path} refers to {filename}, which is missing from {folder}. "
                    "Download the missing shard."
                )
        return dict(weight_map)

    single = folder / SAFETENSORS_FILE
    if not single.is_file():
        raise CheckpointError(
            f"no weights in {folder}: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}. "
            "Save the model with `save_pretrained(..., safe_serialization=True)` or point at "
            "a folder that contains them."
        )
    handle = _open_safetensors(single)
    return {key: SAFETENSORS_FILE for key in handle.keys()}


def _open_safetensors(path: Path):
    """Open a safetensors file, turning a bad header into a CheckpointError."""
    try:
        handle = safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({error}); it is truncated or "
            "corrupt. Download it again."
        ) from error
    return handle


class GGUFCheckpoint:
    """The tensors of a GGUF file, renamed to Hugging Face keys and dequantized on read."""

    def __init__(self, path: Path):
        import gguf  # imported here: only GGUF loading needs it.

        self.path = path
        try:
            reader = read_gguf_layout(path)
        except (ValueError, OSError, IndexError, KeyError) as error:
            raise CheckpointError(
                f"{path} is not a readable GGUF file ({type(error).__name__}: {error}); it is "
                "truncated or corrupt. Fetch it again."
            ) from error
        self._permuted_qk = False
        self._tensors = {}
        for tensor in reader.tensors:
            hf_key = gguf_name_to_hf(tensor.name)
            self._tensors[hf_key if hf_key is not None else tensor.name] = tensor
        self._gguf = gguf
        if "rope_freqs.weight" in self._tensors:
            # NOTE: transformers 5.25 also ignores these factors when it reads a GGUF config,
            # so both give default RoPE where the original Llama 3.1 scales low frequencies.
            logging.warning(
                "%s has Llama 3.1 RoPE frequency factors (rope_freqs.weight), which are not "
                "applied; load the original safetensors checkpoint for exact Llama 3.1 RoPE.",
                path,
            )

    def set_model_type(self, model_type: str) -> None:
        """Record the architecture, which decides whether q/k rows need unpermuting."""
        # llama.cpp's converter permutes the q/k rows of Llama-family models (Mistral is
        # converted as "llama") for its interleaved RoPE; Qwen2 is converted unpermuted.
        self._permuted_qk = model_type in ("llama", "mistral")

    def keys(self) -> list[str]:
        """Return every tensor key (Hugging Face names where llama.cpp's are known)."""
        return list(self._tensors)

    def location(self, key: str) -> str:
        """Return the file and GGUF tensor name of `key`, for error messages."""
        return f"{self.path} (GGUF tensor {self._tensors[key].name!r})"

    def shape(self, key: str) -> tuple[int, ...]:
        """Return the tensor's shape in PyTorch order (GGUF stores it reversed)."""
        return tuple(int(n) for n in reversed(self._tensors[key].shape))

    def read(self, key: str, num_heads: int = 0, num_kv_heads: int = 0) -> np.ndarray:
        """Dequantize one tensor to float32, undoing llama.cpp's q/k row permutation.

        Args:
          key: the Hugging Face key.
          num_heads: query heads, needed for q_proj of Llama-family models.
          num_kv_heads: key/value heads, needed for k_proj of Llama-family models.

        Returns:
          The float32 array in PyTorch layout.

        Raises:
          CheckpointError: the quantisation type is not supported.
        """
        tensor = self._tensors[key]
        quant = self._gguf.GGMLQuantizationType
        # gguf 0.19 lists the types it can dequantize only in the private `_type_traits`.
        supported = set(self._gguf.quants._type_traits) | {quant.F32, quant.F16, quant.BF16}
        if tensor.tensor_type not in supported:
            names = ", ".join(sorted(t.name for t in supported))
            raise CheckpointError(
                f"{self.location(key)} uses GGML quantisation type {tensor.tensor_type.name}, "
                f"which the gguf package cannot dequantize; supported types: {names}. Convert "
                "the model with a supported type, e.g. Q8_0 or F16."
            )
        array = self._gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        array = np.asarray(array, dtype=np.float32).reshape(self.shape(key))
        if self._permuted_qk and key.endswith("self_attn.q_proj.weight"):
            array = unpermute_rows(array, num_heads)
        elif self._permuted_qk and key.endswith("self_attn.k_proj.weight"):
            array = unpermute_rows(array, num_kv_heads)
        return array


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k projection rows.

    llama.cpp's converter reorders each head's rows from the half-split RoPE layout
    (first half, second half) to interleaved pairs. This restores the Hugging Face order.

    Args:
      weight: [num_heads * head_dim, d] rows as stored in the GGUF.
      num_heads: the heads these rows belong to (key/value heads for k_proj).

    Returns:
      The array in Hugging Face row order, same shape.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    grouped = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)
