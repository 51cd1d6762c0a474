"""The DRO/MCD method as pure functions of arrays: transform, probes, objective, schedule."""

from mcd_jax.method.objective import (
    BaseTargets,
    ObjectiveConfig,
    TextPromptCache,
    base_targets_from_states,
    mcd_objective,
    objective_from_targets,
    parallel_objective,
    precompute_text_prompt_cache,
    soft_prompt_consistency_targets,
)
from mcd_jax.method.probes import LinearProbe, ProbeFit, ProbeTrainingConfig, fit_probe
from mcd_jax.method.schedule import (
    CollaborativeSchedule,
    ParallelSchedule,
    SchedulePosition,
    ScheduleStep,
    collaborative_schedule,
    dro_schedule,
    parallel_schedule,
)
from mcd_jax.method.transform import Transform, apply_transform, fit_transform

__all__ = [
    "BaseTargets",
    "CollaborativeSchedule",
    "LinearProbe",
    "ObjectiveConfig",
    "ParallelSchedule",
    "ProbeFit",
    "ProbeTrainingConfig",
    "SchedulePosition",
    "ScheduleStep",
    "TextPromptCache",
    "Transform",
    "apply_transform",
    "base_targets_from_states",
    "collaborative_schedule",
    "dro_schedule",
    "fit_probe",
    "fit_transform",
    "mcd_objective",
    "objective_from_targets",
    "parallel_objective",
    "parallel_schedule",
    "precompute_text_prompt_cache",
    "soft_prompt_consistency_targets",
]
