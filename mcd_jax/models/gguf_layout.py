"""A fast reader for the layout of a GGUF file: metadata scalars and tensor locations.

`gguf.GGUFReader` (gguf 0.19) builds a NumPy view for every metadata item, which
takes about 40 s on Qwen2.5's 151k-token vocabulary on a 2-core CPU. Loading
weights needs only the tensor table and a few scalars, so this module walks the
header with `struct` and skips long arrays without materialising them. Tensor
bytes stay in a read-only memory map and are dequantized one tensor at a time.

Format reference: the GGUF specification in the ggml repository (docs/gguf.md),
versions 2 and 3 (little-endian).
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# Arrays longer than this (vocabularies, merges) are skipped, not stored.
_MAX_STORED_ARRAY = 1024

# GGUF metadata value types -> struct format of one scalar (None: variable length).
_SCALAR_FORMATS = {
    0: "B",  # uint8
    1: "b",  # int8
    2: "H",  # uint16
    3: "h",  # int16
    4: "I",  # uint32
    5: "i",  # int32
    6: "f",  # float32
    7: "?",  # bool
    10: "Q",  # uint64
    11: "q",  # int64
    12: "d",  # float64
}
_STRING = 8
_ARRAY = 9


class GGUFFormatError(ValueError):
    """The file is not a well-formed GGUF file (bad magic, truncated, or inconsistent)."""


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file.

    Attributes:
      name: the llama.cpp tensor name, e.g. "blk.0.attn_q.weight".
      shape: dimensions in ggml order (fastest-varying first), as stored.
      tensor_type: the `gguf.GGMLQuantizationType`.
      data: the raw data as `gguf.quants.dequantize` expects it: float arrays for
        F32/F16/BF16-like types, uint8 [..., bytes per row] for quantized ones.
    """

    name: str
    shape: tuple[int, ...]
    tensor_type: Any
    data: np.ndarray


@dataclasses.dataclass(frozen=True)
class GGUFLayout:
    """Metadata scalars (and short arrays) and the tensors of a GGUF file."""

    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


class _Cursor:
    """Sequential little-endian reads from a memory-mapped file, with bounds checks."""

    def __init__(self, buffer: memoryview, path: Path):
        self.buffer = buffer
        self.offset = 0
        self.path = path

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.offset + size > len(self.buffer):
            raise GGUFFormatError(
                f"{self.path} ends at byte {len(self.buffer)} inside its header (reading "
                f"{size} bytes at offset {self.offset}); the file is truncated."
            )
        value = struct.unpack_from("<" + fmt, self.buffer, self.offset)[0]
        self.offset += size
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        if self.offset + length > len(self.buffer):
            raise GGUFFormatError(
                f"{self.path}: a string of {length} bytes at offset {self.offset} runs past the "
                "end of the file; the file is truncated or corrupt."
            )
        raw = bytes(self.buffer[self.offset : self.offset + length])
        self.offset += length
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            length = self.unpack("Q")
            self.offset += length
        if self.offset > len(self.buffer):
            raise GGUFFormatError(f"{self.path}: a string array runs past the end of the file.")

    def value(self, value_type: int) -> Any:
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array()
        raise GGUFFormatError(
            f"{self.path}: unknown metadata value type {value_type} at offset {self.offset}; "
            "the file is corrupt or uses a newer GGUF version."
        )

    def array(self) -> Any:
        item_type = self.unpack("I")
        count = self.unpack("Q")
        if count > _MAX_STORED_ARRAY:
            if item_type == _STRING:
                self.skip_strings(count)
            elif item_type in _SCALAR_FORMATS:
                self.offset += count * struct.calcsize("<" + _SCALAR_FORMATS[item_type])
            else:
                for _ in range(count):
                    self.value(item_type)
            return _SkippedArray(count)
        return [self.value(item_type) for _ in range(count)]


@dataclasses.dataclass(frozen=True)
class _SkippedArray:
    """A long metadata array that was skipped; only its length is kept."""

    length: int


def read_gguf_layout(path: str | Path) -> GGUFLayout:
    """Read a GGUF file's metadata and tensor table; map the tensor data lazily.

    Args:
      path: the .gguf file.

    Returns:
      The layout, with tensor data as read-only views into a memory map.

    Raises:
      GGUFFormatError: bad magic, an unsupported version, or a header or tensor
        that runs past the end of the file.
    """
    import gguf  # imported here: only GGUF loading needs it.

    path = Path(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(mapped), path)
    if bytes(mapped[:4]) != _MAGIC:
        raise GGUFFormatError(f"{path} does not start with the GGUF magic bytes; it is not GGUF.")
    cursor.offset = 4
    version = cursor.unpack("I")
    if version not in (2, 3):
        raise GGUFFormatError(f"{path} is GGUF version {version}; versions 2 and 3 are supported.")
    tensor_count = cursor.unpack("Q")
    metadata_count = cursor.unpack("Q")

    metadata = {}
    for _ in range(metadata_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("I"))

    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        num_dims = cursor.unpack("I")
        shape = tuple(cursor.unpack("Q") for _ in range(num_dims))
        tensor_type = gguf.GGMLQuantizationType(cursor.unpack("I"))
        infos.append((name, shape, tensor_type, cursor.unpack("Q")))

    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-cursor.offset // alignment) * alignment
    tensors = [_tensor_view(mapped, path, data_start, *info) for info in infos]
    return GGUFLayout(version=version, metadata=metadata, tensors=tensors)


def _tensor_view(
    mapped: np.memmap, path: Path, data_start: int, name: str, shape, tensor_type, offset: int
) -> GGUFTensor:
    """Slice one tensor's bytes out of the map, shaped as `gguf.quants.dequantize` expects."""
    import gguf

    block_size, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
    num_elements = int(np.prod(shape, dtype=np.int64))
    num_bytes = num_elements // block_size * type_size
    start = data_start + offset
    if start + num_bytes > mapped.shape[0]:
        raise GGUFFormatError(
            f"{path}: tensor {name!r} needs bytes {start}..{start + num_bytes} but the file has "
            f"{mapped.shape[0]}; the file is truncated."
        )
    numpy_shape = tuple(reversed(shape))
    raw = mapped[start : start + num_bytes]
    plain_types = {
        gguf.GGMLQuantizationType.F32: np.float32,
        gguf.GGMLQuantizationType.F16: np.float16,
    }
    if tensor_type in plain_types:
        data = raw.view(plain_types[tensor_type]).reshape(numpy_shape)
    else:
        data = raw.reshape(gguf.quant_shape_to_byte_shape(numpy_shape, tensor_type))
    return GGUFTensor(name=name, shape=tuple(shape), tensor_type=tensor_type, data=data)
