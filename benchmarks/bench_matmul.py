"""Time bfloat16 x bfloat16 -> float32 matmuls of the training step's shapes, in JAX and PyTorch.

Each shape is timed as the forward pass uses it (`x @ W`) and as the backward pass to the input
uses it (`dy @ W.T`), jitted, best of 5 calls after one warm-up call. XLA options come from
the XLA_FLAGS environment variable, so CPU backends can be compared:

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_matmul.py
    XLA_FLAGS=--xla_cpu_use_onednn=true JAX_PLATFORMS=cpu \
        .venv/bin/python benchmarks/bench_matmul.py

The shapes are Qwen2.5-Coder-0.5B's projections for 4 rows of 160 tokens, and a 2048^3 matmul.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = ((640, 896, 4864), (640, 4864, 896), (640, 896, 896), (2048, 2048, 2048))
REPEATS = 5


def _best_seconds(call) -> float:
    call()
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def jax_rates(m: int, k: int, n: int) -> dict[str, float]:
    """Return GFLOP/s of `x @ W` and of `dy @ W.T` for x [m, k] and W [k, n]."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((m, k)), jnp.bfloat16)
    weight = jnp.asarray(rng.random((k, n)), jnp.bfloat16)
    cotangent = jnp.asarray(rng.random((m, n)), jnp.bfloat16)
    forward = jax.jit(
        lambda a, b: jnp.einsum("mk,kn->mn", a, b, preferred_element_type=jnp.float32)
    )
    backward = jax.jit(
        lambda c, b: jnp.einsum("mn,kn->mk", c, b, preferred_element_type=jnp.float32)
    )
    flops = 2 * m * k * n
    return {
        "forward": flops / _best_seconds(lambda: forward(x, weight).block_until_ready()) / 1e9,
        "backward": flops
        / _best_seconds(lambda: backward(cotangent, weight).block_until_ready())
        / 1e9,
    }


def torch_rate(m: int, k: int, n: int) -> float:
    """Return GFLOP/s of a PyTorch bfloat16 `x @ W` with 2 threads, or NaN without torch."""
    try:
        import torch
    except ImportError:
        return float("nan")
    torch.set_num_threads(2)
    x = torch.rand(m, k).bfloat16()
    weight = torch.rand(k, n).bfloat16()
    return 2 * m * k * n / _best_seconds(lambda: x @ weight) / 1e9


def main() -> None:
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print("| m x k x n | JAX x @ W, GFLOP/s | JAX dy @ W.T, GFLOP/s | PyTorch x @ W, GFLOP/s |")
    print("|---|---|---|---|")
    for m, k, n in SHAPES:
        rates = jax_rates(m, k, n)
        print(
            f"| {m} x {k} x {n} | {rates['forward']:.0f} | {rates['backward']:.0f} | "
            f"{torch_rate(m, k, n):.0f} |"
        )


if __name__ == "__main__":
    main()
