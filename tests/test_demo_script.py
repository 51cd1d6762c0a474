"""launch/demo.sh: shell syntax, and every flag it passes exists in the program it runs.

The demo itself runs for about 16 minutes on the real model, so the suite does not run it. The
README records a full run from a fresh clone.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "launch" / "demo.sh"


def demo_commands() -> dict[str, list[str]]:
    """Map each launch program that demo.sh runs to the flag names on its command line."""
    text = DEMO.read_text().replace("\\\n", " ")
    commands = {}
    for match in re.finditer(r'"\$PYTHON" (launch/\w+\.py)([^\n]*)', text):
        commands[match.group(1)] = re.findall(r"--(\w+)=", match.group(2))
    return commands


def test_demo_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(DEMO)], check=True)


def test_demo_runs_train_evaluate_and_export():
    assert list(demo_commands()) == ["launch/train.py", "launch/evaluate.py", "launch/export.py"]


@pytest.mark.parametrize("program", ["launch/train.py", "launch/evaluate.py", "launch/export.py"])
def test_demo_flags_exist(program):
    result = subprocess.run(
        [sys.executable, str(ROOT / program), "--helpfull"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    defined = set(re.findall(r"^\s+--(?:\[no\])?(\w+)", result.stdout, flags=re.MULTILINE))
    used = demo_commands()[program]
    assert used, f"no flags found for {program} in {DEMO}"
    assert set(used) <= defined, f"{program} does not define {sorted(set(used) - defined)}"
