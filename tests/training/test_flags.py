"""Command-line behaviour of the training flags, through a real absl program in subprocesses.

All command lines start at once in a module fixture, so the suite waits for the slowest one
only (each process spends about 2 s importing `mcd_jax.data`). Other invalid flags are checked
in-process on a fresh `FlagValues`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import app, flags

from mcd_jax import flags as mcd_flags
from mcd_jax.training import config as config_lib

PROGRAM = Path(__file__).with_name("flags_program.py")
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

FLAGFILE = f"""\
# Comments and blank lines are allowed in a flagfile.
--model={MODEL}
--train_languages=en,da,ko

--batch_size=4
--weight_consistency=0.002
--noresume
--label_decoding=greedy
--label_samples=1
--label_keep_longest=1
"""


def command_lines(root: Path) -> dict[str, list[str]]:
    blocker = root / "a_file"
    blocker.write_text("")
    (root / "run.cfg").write_text(FLAGFILE)
    workdir = f"--workdir={root / 'work'}"
    return {
        "flagfile": [f"--flagfile={root / 'run.cfg'}"],
        "unknown": [f"--model={MODEL}", "--bogus_flag=1", workdir],
        "out_of_range": [f"--model={MODEL}", "--batch_size=0", workdir],
        "bad_enum": [f"--model={MODEL}", "--mode=sft", workdir],
        "missing_flagfile": [f"--flagfile={root / 'absent.cfg'}"],
        "unwritable_workdir": [f"--model={MODEL}", f"--workdir={blocker / 'run'}"],
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("flags")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    running = {
        name: subprocess.Popen(
            [sys.executable, str(PROGRAM), *args],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in command_lines(root).items()
    }
    finished = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=120)
        finished[name] = subprocess.CompletedProcess(
            process.args, process.returncode, stdout, stderr
        )
    finished["root"] = root
    return finished


def test_flagfile_resolves_config(results):
    result = results["flagfile"]
    assert result.returncode == 0, result.stderr[-2000:]

    config_path = Path(result.stdout.strip())
    expected_workdir = results["root"] / "checkpoints" / "SmolLM2-135M-Instruct-mcd-collaborative"
    assert config_path == expected_workdir / "config.json"
    written = json.loads(config_path.read_text())
    assert written["model"]["ref"] == MODEL
    assert written["data"]["train_languages"] == ["en", "da", "ko"]
    assert written["schedule"]["batch_size"] == 4
    assert written["method"]["weight_consistency"] == 0.002
    assert written["checkpoint"]["resume"] is False
    # Flags the flagfile does not set keep their defaults.
    assert written["method"]["weight_harmfulness"] == 0.01
    assert written["schedule"]["learning_rate"] == 1e-3
    assert written["checkpoint"]["workdir"] == str(expected_workdir)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown", "Unknown command line flag 'bogus_flag'"),
        ("out_of_range", "--batch_size=0"),
        ("out_of_range", "0 is not a positive integer"),
        ("bad_enum", "value should be one of <mcd|dro>"),
        ("missing_flagfile", "absent.cfg"),
        ("unwritable_workdir", "is not writable"),
    ],
)
def test_bad_command_line_fails(results, case, expected):
    result = results[case]
    assert result.returncode == 1, result.stderr[-2000:]
    assert expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_bad_command_line_writes_nothing(results):
    assert not (results["root"] / "work").exists()


def parse(argv: list[str]) -> flags.FlagValues:
    flag_values = flags.FlagValues()
    mcd_flags.define_flags(flag_values)
    flag_values(["program", *argv])
    return flag_values


def test_defaults_match_reference(tmp_path):
    config = mcd_flags.config_from_flags(
        parse([f"--model={MODEL}", f"--workdir={tmp_path}"]), check_workdir=False
    )

    assert config.data.train_languages == ("en", "da", "ko", "el", "ga")
    assert config.data.anchor_languages == ("en",)
    assert config.method.num_components == 4
    assert config.method.probe_folds == 10
    assert config.method.weight_refusal == 1.0
    assert config.method.weight_harmfulness == 0.01
    assert config.method.weight_complement == 0.001
    assert config.method.weight_consistency == 0.001
    assert config.method.consistency_target == "text_prompt"
    assert config.method.placement == "system_slot"
    assert config.schedule.schedule == "collaborative"
    assert config.schedule.batch_size == 10
    assert config.schedule.epochs_per_language == 5
    assert config.schedule.learning_rate == 1e-3
    assert config.schedule.weight_decay == 0.01
    assert config.schedule.grad_clip == 1.0
    assert config.schedule.seed == 42
    assert config.checkpoint.resume is True
    assert config.checkpoint.workdir == str(tmp_path)


def test_dro_defaults_to_english(tmp_path):
    config = mcd_flags.config_from_flags(
        parse([f"--model={MODEL}", "--mode=dro", f"--workdir={tmp_path}"]), check_workdir=False
    )
    assert config.data.train_languages == ("en",)


def test_deprecated_language_codes_canonicalised(tmp_path):
    config = mcd_flags.config_from_flags(
        parse([f"--model={MODEL}", "--train_languages=en,iw", f"--workdir={tmp_path}"]),
        check_workdir=False,
    )
    assert config.data.train_languages == ("en", "he")


def test_negative_weight_rejected():
    with pytest.raises(flags.IllegalFlagValueError, match="-1.0 is not a non-negative number"):
        parse(["--weight_refusal=-1"])


def test_dro_with_other_languages_rejected():
    with pytest.raises(flags.IllegalFlagValueError, match="--mode=dro trains on English only"):
        parse(["--mode=dro", "--train_languages=en,da"])


def test_unknown_language_rejected():
    with pytest.raises(flags.IllegalFlagValueError, match="unknown language code 'xx'"):
        parse(["--train_languages=en,xx"])


def test_missing_model_rejected(tmp_path):
    with pytest.raises(app.UsageError, match="--model is required"):
        mcd_flags.config_from_flags(parse([f"--workdir={tmp_path}"]))


def test_required_model_fails_parsing():
    flag_values = flags.FlagValues()
    mcd_flags.define_flags(flag_values)
    mcd_flags.mark_required_train_flags(flag_values)
    with pytest.raises(flags.IllegalFlagValueError, match="--model"):
        flag_values(["program"])


def test_greedy_labels_with_many_samples_rejected():
    with pytest.raises(flags.IllegalFlagValueError, match="--label_decoding=greedy"):
        parse([f"--model={MODEL}", "--label_decoding=greedy"])


def test_process_id_beyond_processes_rejected():
    with pytest.raises(flags.IllegalFlagValueError, match="--process_id=2 must be below"):
        parse([f"--model={MODEL}", "--num_processes=2", "--process_id=2"])


def test_every_flag_has_help():
    flag_values = flags.FlagValues()
    mcd_flags.define_flags(flag_values)
    for name in flag_values:
        flag = flag_values[name]
        assert len(flag.help) > 20, name
        assert flag.help.endswith("."), name


def test_every_config_field_has_a_flag():
    covered = set(mcd_flags.FLAG_FIELDS.values()) | {
        ("data", "train_languages"),
        ("checkpoint", "workdir"),
    }
    for section, section_cls in config_lib._SECTION_TYPES.items():
        for field in section_cls.__dataclass_fields__:
            assert (section, field) in covered, f"{section}.{field}"


def test_anchors_per_label_reaches_estimation(tmp_path):
    from mcd_jax.method.estimation import EstimationSettings

    config = mcd_flags.config_from_flags(
        parse([f"--model={MODEL}", "--anchors_per_label=25", f"--workdir={tmp_path}"]),
        check_workdir=False,
    )
    default = mcd_flags.config_from_flags(
        parse([f"--model={MODEL}", f"--workdir={tmp_path}"]), check_workdir=False
    )

    assert config.data.anchors_per_label == 25
    assert EstimationSettings.from_train_config(config).anchors_per_label == 25
    assert default.data.anchors_per_label is None


def test_anchors_per_label_zero_rejected():
    with pytest.raises(flags.IllegalFlagValueError, match="0 is not a positive integer"):
        parse(["--anchors_per_label=0"])


@pytest.mark.parametrize(
    "flagfile", sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.cfg")), ids=str
)
def test_shipped_flagfiles_parse(flagfile, tmp_path):
    extra = []
    if flagfile.name == "tiny_test.cfg":  # it needs a model and a dataset from the caller
        extra = [f"--model={MODEL}", "--dataset=builtin"]
    config = mcd_flags.config_from_flags(
        parse([f"--flagfile={flagfile}", *extra, f"--workdir={tmp_path}"]), check_workdir=False
    )
    assert config.model.ref
