"""Print the keyword judge's per-language precision and recall on a labelled fixture.

Usage: python -m mcd_jax.judge tests/fixtures/judge_responses.jsonl
"""

import sys

from mcd_jax.judge.accuracy import format_markdown_table, load_labelled_rows, score_by_language
from mcd_jax.judge.keyword import KeywordRefusalJudge


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: python -m mcd_jax.judge FIXTURE.jsonl\n")
        return 2
    rows = load_labelled_rows(argv[1])
    print(format_markdown_table(score_by_language(KeywordRefusalJudge(), rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
