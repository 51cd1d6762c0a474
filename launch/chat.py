"""Chat once with a model: load it, format the message with its chat template, generate.

Example:
  python launch/chat.py --model=packaged:qwen2.5-coder-0.5b-instruct --prompt="Hello!"
"""

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "model",
    "packaged:qwen2.5-coder-0.5b-instruct",
    "Model reference: a folder with config.json and safetensors, a .gguf file, a Hugging Face "
    "hub id, or packaged:<name>.",
)
flags.DEFINE_multi_string("prompt", ["Hello! Who are you?"], "User message; repeat for a batch.")
flags.DEFINE_string("system_prompt", None, "Text prompt for the system slot (default: none).")
flags.DEFINE_integer("max_new_tokens", 64, "Maximum number of generated tokens.", lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 decodes greedily.", lower_bound=0)
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling threshold, in (0, 1].")
flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens; 0 keeps all.", lower_bound=0)
flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Storage dtype of the weights.")


def main(argv: list[str]) -> None:
    del argv
    import jax.numpy as jnp

    from mcd_jax.generation import default_stop_token_ids, generate
    from mcd_jax.models import load_model
    from mcd_jax.sampling import SamplingConfig

    loaded = load_model(FLAGS.model, dtype=jnp.dtype(FLAGS.dtype))
    sampling = SamplingConfig(
        max_new_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature,
        top_p=FLAGS.top_p,
        top_k=FLAGS.top_k,
        seed=FLAGS.seed,
        stop_token_ids=default_stop_token_ids(loaded.tokenizer),
    )
    logging.info("Generating %d response(s) with %s", len(FLAGS.prompt), FLAGS.model)
    result = generate(
        loaded.model,
        loaded.tokenizer,
        FLAGS.prompt,
        sampling=sampling,
        text_prompt=FLAGS.system_prompt,
        batch_size=len(FLAGS.prompt),
    )
    for prompt, text in zip(FLAGS.prompt, result.texts, strict=True):
        print(f"user: {prompt}\nassistant: {text}\n")


if __name__ == "__main__":
    app.run(main)
