"""report.png: per-language bars of harmful refusal and false refusal rates, one bar per system."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

_PANELS = (
    ("harmful_refusal_rate", "harmful refusal rate (%)"),
    ("false_refusal_rate", "harmless false-refusal rate (%)"),
)
_TRAINED_HATCH = "//"


def plot_report(payload: Mapping[str, Any]) -> bytes:
    """Draw the report's per-language rates as grouped bars and return the PNG bytes.

    A hatched bar marks a language the system's soft prompt was trained on. A rate
    that is undefined (no judged query) gets an "n/a" label instead of a bar.
    """
    languages = payload["data"]["languages"]
    systems = payload["systems"]
    width = 0.8 / len(systems)
    figure, axes = plt.subplots(
        len(_PANELS), 1, figsize=(max(6.0, 0.9 * len(languages) + 2), 7.5), squeeze=False
    )
    colors = plt.get_cmap("tab10").colors

    for axis, (rate, title) in zip(axes[:, 0], _PANELS, strict=True):
        for number, system in enumerate(systems):
            rows = payload["metrics"][system["name"]]["languages"]
            for position, language in enumerate(languages):
                value = rows[language][rate]
                center = position - 0.4 + (number + 0.5) * width
                if value is None:
                    axis.text(center, 1, "n/a", ha="center", fontsize=6, rotation=90)
                    continue
                axis.bar(
                    center,
                    value,
                    width,
                    color=colors[number % len(colors)],
                    hatch=_TRAINED_HATCH if rows[language]["trained"] else None,
                    edgecolor="black",
                    linewidth=0.4,
                )
        axis.set_title(title)
        axis.set_ylim(0, 105)
        axis.set_xticks(range(len(languages)), _language_labels(languages, systems))
        axis.grid(axis="y", alpha=0.3)

    handles = [
        Patch(facecolor=colors[number % len(colors)], label=system["name"])
        for number, system in enumerate(systems)
    ]
    if any(system["trained_languages"] for system in systems):
        handles.append(
            Patch(
                facecolor="white", edgecolor="black", hatch=_TRAINED_HATCH, label="trained language"
            )
        )
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    figure.tight_layout(rect=(0, 0.06, 1, 1))

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def _language_labels(languages: list[str], systems: list[Mapping[str, Any]]) -> list[str]:
    """Mark a language trained by any soft prompt with '*'."""
    trained = {code for system in systems for code in system["trained_languages"]}
    return [f"{code}*" if code in trained else code for code in languages]
