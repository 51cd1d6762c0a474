"""Refusal judges: decide whether a model response refused its request.

`KeywordRefusalJudge` covers 18 languages with hand-written refusal phrases
and leaves responses in other languages or scripts unjudged. `RefusalJudge`
is the interface a classifier judge implements.
"""

from mcd_jax.judge.base import RefusalJudge, Verdict
from mcd_jax.judge.keyword import KeywordRefusalJudge, normalize_text

__all__ = ["KeywordRefusalJudge", "RefusalJudge", "Verdict", "normalize_text"]
