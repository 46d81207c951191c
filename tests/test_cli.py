"""The command line and the config loader, tried with generated input (Hypothesis): whatever a user types, and
whatever a config file holds, a command either starts (a training, here a stand-in that records the config; a few
real tiny trainings in a subprocess) or exits non-zero with one line. Never a traceback, never a hang."""

import json
import math
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcifar import training
from fastcifar.config import SHORT_FLAGS, Config, ConfigError, all_keys, read_config_file
from tests.conftest import REPO, tiny_cli_args

TRAINING_KEYS = [key for key in all_keys() if not key.startswith("lr_finder.")]
FLAGS = [f"--{key}" for key in TRAINING_KEYS] + list(SHORT_FLAGS)
# Where a real run writes or reads: not generated for real runs (a value like ../.. would write outside the test)
PATHS = {"--data.data_dir", "--run.out_dir", "--run.name", "--schedule.lr_from", "--data-dir", "--out-dir", "--name",
         "--lr-from"}

# Values as a user types them: numbers of every size and sign, special floats, words, lists, nothing.
TYPED = st.one_of(
    st.integers(-10**30, 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "true", "false", "on", "auto", "cpu", "cuda:7", "tpu", "nan", "inf", "-1", "0", "1e308",
                     "1e-308", "8,16,32,64", "1,2,3", "a,b", "0.5", "reference", "../..", "x" * 300]),
    st.text(max_size=12),
)
TRUE_WORDS = {"1", "true", "yes", "on"}  # the words README and --help give for a true flag


def holds(held, typed: str) -> bool:
    """Whether the config holds what the user typed, read by a parser of its own here (not the config's): a number
    as Python reads it, a list of numbers split at commas, a flag by its words, text as it is (run.channels_last
    also takes the yes/no words of its earlier boolean form)."""
    if isinstance(held, bool):
        return held == (typed.strip().lower() in TRUE_WORDS)
    if isinstance(held, int | float):
        return math.isfinite(held) and float(typed) == held
    if isinstance(held, tuple):
        return tuple(float(part) for part in typed.split(",")) == held
    return held == typed or held in ("on", "off") and held == ("on" if typed.strip().lower() in TRUE_WORDS else "off")


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def started(monkeypatch):
    """Replaces the training itself: the commands' parsing and checks run for real, and what would train is kept."""
    configs = []
    monkeypatch.setattr(training, "train", lambda cfg, **kwargs: configs.append(cfg))
    return configs


def _outcome(argv, capsys) -> tuple[int, str]:
    try:
        code = training.main(argv)
    except SystemExit as done:  # argparse's usage errors leave from parse_args
        code = done.code
    return code, capsys.readouterr().err


@FAST
@given(pairs=st.lists(st.tuples(st.sampled_from(FLAGS), TYPED), max_size=4))
def test_any_flags_and_values_start_a_training_or_fail_in_one_line(pairs, started, capsys):
    argv = [part for flag, value in pairs for part in (flag, value)]
    before = len(started)
    code, err = _outcome(argv, capsys)
    if code == 0:
        assert len(started) == before + 1 and isinstance(started[-1], Config) and err == ""
        cfg = started[-1]
        given = {SHORT_FLAGS.get(flag, flag[2:]): value for flag, value in pairs}  # the last of a repeated flag wins
        for key, value in given.items():
            section, name = key.split(".")
            assert holds(getattr(getattr(cfg, section), name), value), (key, value, cfg)
        # what would train is what its config.json gives back (a resume reads it from there)
        assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    else:
        assert code == 2 and len(started) == before, (argv, err)
        assert err.count("\n") == 1 and err.startswith("error: "), (argv, err)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
SECTION_FIELDS = {key.split(".")[0]: [] for key in all_keys()}
for _key in all_keys():
    SECTION_FIELDS[_key.split(".")[0]].append(_key.split(".")[1])
CONFIG_LIKE = st.dictionaries(
    st.sampled_from([*SECTION_FIELDS, "preset", "colour"]),
    st.one_of(JSON, st.dictionaries(st.sampled_from(sum(SECTION_FIELDS.values(), [])), JSON, max_size=4)),
    max_size=4)


@FAST
@given(content=st.one_of(JSON, CONFIG_LIKE))
def test_any_json_as_a_config_file_is_a_config_or_one_error(content, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(content))
    try:
        cfg = read_config_file(path)
    except ConfigError as err:
        assert "\n" not in str(err) and str(path) in str(err)
    else:
        assert cfg.validated() is cfg


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_any_bytes_as_a_config_file_are_a_config_or_one_error(raw, tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "config.json"
    path.write_bytes(raw)
    try:
        read_config_file(path)
    except ConfigError as err:
        assert "\n" not in str(err)


@pytest.mark.slow
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(st.sampled_from(sorted(set(FLAGS) - PATHS)), TYPED), max_size=2))
def test_real_tiny_runs_with_generated_flags_train_or_fail_in_one_line(pairs, synthetic, tmp_path_factory):
    """The whole command in its own process, on the synthetic data: it trains (exit 0) or says why in one line."""
    out = tmp_path_factory.mktemp("cli")
    argv = [*tiny_cli_args(synthetic, out, **{"schedule.epochs": 1, "schedule.peak_epoch": 0.5}),
            *[part for flag, value in pairs for part in (flag, value)]]
    proc = subprocess.run([sys.executable, "-m", "fastcifar.train", *argv], capture_output=True, text=True,
                          timeout=240, cwd=REPO)
    assert "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: ") and len(lines) == 1, (argv, proc.stderr)
