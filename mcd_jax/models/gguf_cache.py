"""A per-file cache of the config and tokenizer transformers derives from a GGUF file.

transformers (5.25) builds a config and a tokenizer from GGUF metadata by parsing
the whole file with `gguf.GGUFReader`, once for each. On Qwen2.5's 151k-token
vocabulary that costs about 20 s apiece on a 2-core CPU. The result depends only
on the file's bytes, so it is saved once under the cache folder, keyed by the
file's sha256, and later loads read the saved folder in well under a second.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from absl import logging

from mcd_jax.models.packaged import default_cache_dir

_COMPLETE_MARKER = "complete"


def gguf_config_and_tokenizer(path: Path, sha256: str) -> tuple[dict[str, Any], Any]:
    """Return the Hugging Face config dict and tokenizer of a GGUF file.

    Args:
      path: the GGUF file.
      sha256: its hash, which names the cache entry.

    Returns:
      (config as a dict, transformers tokenizer with the file's chat template).
    """
    from transformers import AutoConfig, AutoTokenizer

    entry = default_cache_dir() / "gguf" / sha256
    if (entry / _COMPLETE_MARKER).exists():
        try:
            config = AutoConfig.from_pretrained(str(entry)).to_dict()
            return config, AutoTokenizer.from_pretrained(str(entry))
        except (OSError, ValueError) as error:
            logging.warning(
                "Cached GGUF metadata in %s is unreadable (%s); rebuilding.", entry, error
            )

    logging.info("Reading the config and tokenizer of %s (cached for later loads)", path)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _save_entry(entry, config, tokenizer)
    return config.to_dict(), tokenizer


def _save_entry(entry: Path, config: Any, tokenizer: Any) -> None:
    """Write the entry to a temporary folder and rename it, so a crash leaves no partial entry."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=entry.name + ".tmp"))
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text("")
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(staging, entry)
    except OSError as error:
        # The cache is an optimisation: a read-only home folder must not stop loading.
        logging.warning("Could not cache GGUF metadata in %s: %s", entry, error)
