"""The refusal-judge interface: one verdict per response, or an honest "unjudged".

MCD is measured by how often a model refuses, language by language, so every
judge says which languages it covers and returns `refused=None` for a response
it cannot judge, rather than counting it as compliance. A keyword judge and a
classifier judge (for example Llama Guard run through our own Flax model) both
implement `RefusalJudge`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence

from mcd_jax.data.languages import canonical_language


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A judge's decision on one response.

    Attributes:
      refused: True for a refusal, False for compliance, None when the judge
        could not judge the response (uncovered language or script).
      reason: why, for reports and debugging, e.g. 'matched "i can't assist" (en)',
        "numbered list", "language 'hi' not covered".
    """

    refused: bool | None
    reason: str


class RefusalJudge(abc.ABC):
    """Decides, for each model response, whether the model refused the request."""

    @property
    @abc.abstractmethod
    def covered_languages(self) -> frozenset[str]:
        """ISO 639-1 codes of the query languages this judge can judge."""

    @abc.abstractmethod
    def judge(self, responses: Sequence[str], languages: Sequence[str]) -> list[Verdict]:
        """Judge each response to a query written in the matching language.

        Args:
          responses: model outputs, [batch] strings.
          languages: the language code of each query, [batch], e.g. "ko".

        Returns:
          One `Verdict` per response, in order.

        Raises:
          ValueError: the two sequences differ in length, or a language code is invalid.
        """


def primary_languages(responses: Sequence[str], languages: Sequence[str]) -> list[str]:
    """Validate a batch and return the primary subtag of each language code.

    Args:
      responses: model outputs, [batch] strings.
      languages: language codes, [batch], e.g. "ko", "zh-TW", "EN".

    Returns:
      [batch] primary codes, e.g. "zh" for "zh-TW".

    Raises:
      ValueError: the lengths differ, a response is not a string, or a code is
        not a valid language code (the message names the code and close matches).
    """
    if isinstance(responses, str) or isinstance(languages, str):
        raise ValueError(
            "responses and languages must be sequences of strings, not a single string; "
            "wrap one response as [response] and its language as [language]"
        )
    if len(responses) != len(languages):
        raise ValueError(
            f"got {len(responses)} responses but {len(languages)} language codes; "
            "pass one query language per response"
        )

    primaries = []
    for index, (response, code) in enumerate(zip(responses, languages, strict=True)):
        if not isinstance(response, str):
            raise ValueError(
                f"response {index} is {type(response).__name__}, expected str; "
                "decode model outputs to text before judging"
            )
        primaries.append(canonical_language(code).partition("-")[0])
    return primaries
