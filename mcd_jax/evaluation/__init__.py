"""The per-language safety evaluation: refusal and false-refusal rates of several systems.

`run_evaluation(EvaluationConfig(...))` compares no system prompt, the default text
prompt and any number of trained soft prompts on harmful and harmless queries in
many languages. It writes report.json (every response and verdict), report.md
(one table per system, with the mean and variance across languages) and report.png.
`evaluate` is the same on a loaded model and examples, without files.
"""

from mcd_jax.evaluation.data import BUILTIN_DATASET, load_evaluation_examples
from mcd_jax.evaluation.job import (
    EvaluationConfig,
    build_systems,
    parse_soft_prompts,
    run_evaluation,
)
from mcd_jax.evaluation.metrics import (
    RATE_NAMES,
    LanguageMetrics,
    QueryOutcome,
    ResponseRecord,
    count_lines,
    language_metrics,
    query_outcome,
    summarize_languages,
)
from mcd_jax.evaluation.protocol import (
    DECODINGS,
    DecodingProtocol,
    greedy_protocol,
    kept_sample_mask,
    sampled_protocol,
)
from mcd_jax.evaluation.report import (
    REPORT_JSON,
    REPORT_MARKDOWN,
    REPORT_PLOT,
    ReportExistsError,
    check_output_dir,
    markdown_report,
    report_payload,
    write_report,
)
from mcd_jax.evaluation.runner import (
    EvaluationResult,
    SystemResult,
    evaluate,
    language_groups_summary,
)
from mcd_jax.evaluation.systems import (
    BUILTIN_SYSTEMS,
    DEFAULT_TEXT_PROMPT,
    EvaluatedSystem,
    IncompatibleSoftPromptError,
    builtin_system,
    chat_template_sha256,
    load_soft_prompt_system,
    read_soft_prompt,
)

__all__ = [
    "BUILTIN_DATASET",
    "BUILTIN_SYSTEMS",
    "DECODINGS",
    "DEFAULT_TEXT_PROMPT",
    "RATE_NAMES",
    "REPORT_JSON",
    "REPORT_MARKDOWN",
    "REPORT_PLOT",
    "DecodingProtocol",
    "EvaluatedSystem",
    "EvaluationConfig",
    "EvaluationResult",
    "IncompatibleSoftPromptError",
    "LanguageMetrics",
    "QueryOutcome",
    "ReportExistsError",
    "ResponseRecord",
    "SystemResult",
    "build_systems",
    "builtin_system",
    "chat_template_sha256",
    "check_output_dir",
    "count_lines",
    "evaluate",
    "greedy_protocol",
    "kept_sample_mask",
    "language_groups_summary",
    "language_metrics",
    "load_evaluation_examples",
    "load_soft_prompt_system",
    "markdown_report",
    "parse_soft_prompts",
    "query_outcome",
    "read_soft_prompt",
    "report_payload",
    "run_evaluation",
    "sampled_protocol",
    "summarize_languages",
    "write_report",
]
