"""The training job: configuration, checkpoints, preemption, metrics (and the trainer).

Submodules are imported where they are used: `config` has no JAX dependency, so flag parsing
stays fast, while `checkpointing` imports orbax.
"""
