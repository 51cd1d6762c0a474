"""Split one training step's time: the forward loss, its gradient, and the whole `TrainStep`.

Same batch as `bench_train_step.py` (4 chat-formatted queries padded to 160 tokens, the default
text prompt as the soft prompt, random transform and probes), bfloat16 weights, one process.
Each figure is the median of 3 calls after one warm-up call.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_step_parts.py [packaged model name]
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step as bench  # noqa: E402

from mcd_jax.method.objective import ObjectiveConfig  # noqa: E402
from mcd_jax.models import load_model  # noqa: E402
from mcd_jax.prompts import BUILTIN_TEXT_PROMPTS  # noqa: E402
from mcd_jax.soft_prompt import init_soft_prompt, text_prompt_token_ids  # noqa: E402
from mcd_jax.training.step import StepConfig, TrainStep, batch_loss, make_optimizer  # noqa: E402


def median_seconds(call, repeats: int = 3) -> float:
    jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    flags.FLAGS(sys.argv[:1])  # bench_train_step defines absl flags; keep their defaults
    name = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-0.5b-instruct"
    loaded = load_model(f"packaged:{name}", dtype=jnp.bfloat16)
    config = loaded.config
    token_ids = text_prompt_token_ids(loaded.tokenizer, BUILTIN_TEXT_PROMPTS["default"])
    prompt = init_soft_prompt(np.asarray(loaded.model.embed_tokens[...]), token_ids)
    method = bench.random_method(config.hidden_size)
    host = bench.host_batch(loaded.tokenizer, 4, ("en",), config.hidden_size, len(token_ids))
    batch = {key: jnp.asarray(value) for key, value in host.items()}
    graphdef, model_state = nnx.split(loaded.model)
    step_config = StepConfig(ObjectiveConfig())
    loss = functools.partial(batch_loss, graphdef=graphdef, config=step_config)

    forward = jax.jit(lambda p, s, m, b: loss(p, s, m, b)[0])
    gradient = jax.jit(lambda p, s, m, b: jax.value_and_grad(lambda q: loss(q, s, m, b)[0])(p))
    optimizer = make_optimizer()
    step = TrainStep(graphdef, model_state, optimizer, step_config)
    state = {"prompt": jnp.copy(prompt), "opt": optimizer.init(prompt)}

    def run_step():
        new_prompt, opt_state, _ = step(state["prompt"], state["opt"], model_state, method, batch)
        state.update(prompt=new_prompt, opt=opt_state)
        return new_prompt

    rows, seq = batch["input_ids"].shape
    step_flops = bench.step_flops(config, rows, seq)
    seconds = {
        "forward loss": median_seconds(lambda: forward(prompt, model_state, method, batch)),
        "value_and_grad": median_seconds(lambda: gradient(prompt, model_state, method, batch)),
        "TrainStep": median_seconds(run_step),
    }
    print(f"{name}: {rows} x {seq} tokens, {step_flops / 1e9:.0f} GFLOP per step")
    for part, value in seconds.items():
        print(f"  {part}: {value:.2f} s")


if __name__ == "__main__":
    main()
