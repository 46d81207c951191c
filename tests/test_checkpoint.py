"""Checkpoints and exact resume: bit-for-bit equality with an uninterrupted run (the session's tiny_run)."""

import importlib
import json
import random
import signal
import sys

import numpy as np
import pytest
import torch

from fastcifar import reporting
from fastcifar.checkpoint import load_training_state, resume_config, rng_states, set_rng_states
from fastcifar.config import Config, ConfigError
from fastcifar.custom_resnet import CustomResNet
from fastcifar.errors import FastCifarError
from fastcifar.interrupt import TrainingInterrupted
from fastcifar.rundir import save_checkpoint
from fastcifar.runfiles import read_metrics
from fastcifar.schedule import one_cycle_lr
from fastcifar.training import main, train
from tests.conftest import LEVERS, signal_at, sigterm_after_first_epoch, tiny_cli_args, tiny_config

train_module = importlib.import_module("fastcifar.training")
loop_module = importlib.import_module("fastcifar.loop")
TIMINGS = {"train_s", "test_s", "epoch_s", "train_img_s", "test_img_s"}
QUIET = {"log": lambda _: None}


def _same_run(a_dir, b_dir) -> None:
    """Same final weights (bit for bit) and the same metrics apart from timings."""
    a = torch.load(a_dir / "model.pt", weights_only=True)["model"]
    b = torch.load(b_dir / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows = [[{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
             for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a_dir, b_dir)]
    assert rows[0] == rows[1]


def test_rng_states_round_trip_through_weights_only_load(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.save(rng_states(gen), tmp_path / "rng.pt")
    expected = (torch.rand(3, generator=gen), torch.rand(3), np.random.rand(3), random.random())
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True), gen)
    again = (torch.rand(3, generator=gen), torch.rand(3), np.random.rand(3), random.random())
    assert all(np.array_equal(x, y) for x, y in zip(expected, again, strict=True))


def test_interrupted_twice_then_resumed_equals_the_uninterrupted_run(tiny_run, synthetic, tmp_path, monkeypatch):
    cfg = tiny_config(synthetic, tmp_path)
    run_dir = tmp_path / "run"
    signal_at(monkeypatch, "train_step", 5)  # mid-epoch 1 (16 steps per epoch)
    stopped = r"SIGTERM in epoch 1, after step 5 of 16; checkpoint saved\. Continue with: python -m fastcifar train "
    with pytest.raises(TrainingInterrupted, match=stopped + r"--resume .*run") as info:
        train(cfg, **QUIET)
    assert info.value.exit_code == 128 + signal.SIGTERM
    state = load_training_state(run_dir)
    assert state["epoch"] == 0 and state["progress"]["step"] == 5 and not (run_dir / "results.json").exists()
    monkeypatch.undo()
    signal_at(monkeypatch, "test_pass", 2)  # during the test pass of epoch 2
    with pytest.raises(TrainingInterrupted, match="in epoch 2, after step 16 of 16"):
        train(cfg, resume=run_dir, **QUIET)
    monkeypatch.undo()
    result = train(cfg, resume=run_dir, **QUIET)
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3]
    _same_run(tiny_run.run_dir, run_dir)
    assert len(json.loads((run_dir / "env.json").read_text())["resumes"]) == 2


def test_a_run_with_every_lever_resumes_exactly(lever_run, synthetic, tmp_path, monkeypatch):
    """EMA state, alternating flips (epoch-dependent) and the BN parameter group survive an interruption."""
    cfg = tiny_config(synthetic, tmp_path, **LEVERS)
    signal_at(monkeypatch, "train_step", 21)  # epoch 2, step 5
    with pytest.raises(TrainingInterrupted, match="in epoch 2, after step 5 of 16"):
        train(cfg, **QUIET)
    monkeypatch.undo()
    train(cfg, resume=tmp_path / "run", **QUIET)
    _same_run(lever_run.run_dir, tmp_path / "run")


def test_the_resident_loader_resumes_mid_epoch_exactly(synthetic, tmp_path, monkeypatch):
    cfg = tiny_config(synthetic, tmp_path, **{"data.loader": "resident", "run.name": "whole"})
    train(cfg, **QUIET)
    stopped = cfg.override({"run.name": "stopped"})
    signal_at(monkeypatch, "train_step", 21)  # epoch 2, step 5
    with pytest.raises(TrainingInterrupted, match="in epoch 2, after step 5 of 16"):
        train(stopped, **QUIET)
    monkeypatch.undo()
    train(stopped, resume=tmp_path / "stopped", **QUIET)
    _same_run(tmp_path / "whole", tmp_path / "stopped")


def test_a_checkpoint_is_not_resumed_on_another_kind_of_device(synthetic, tmp_path, monkeypatch):
    cfg = tiny_config(synthetic, tmp_path)
    signal_at(monkeypatch, "train_step", 3)
    with pytest.raises(TrainingInterrupted):
        train(cfg, **QUIET)
    monkeypatch.undo()
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["device"] == "cpu"
    monkeypatch.setattr(train_module, "resolve_device", lambda _: torch.device("cuda"))  # as auto on a GPU host
    with pytest.raises(FastCifarError, match=r"saved on cpu and would resume on cuda.*--device cpu"):
        train(cfg, resume=tmp_path / "run", **QUIET)


def test_a_non_finite_test_loss_or_bn_statistic_stops_the_run_and_keeps_the_last_good_checkpoint(
        synthetic, tmp_path, monkeypatch):
    from fastcifar.loop import PassStats

    calls = []
    original = train_module.test_pass

    def nan_in_epoch_2(*args, **kwargs):
        calls.append(1)
        stats = original(*args, **kwargs)
        return PassStats(float("nan"), stats.accuracy, stats.images, stats.seconds) if len(calls) == 2 else stats

    monkeypatch.setattr(train_module, "test_pass", nan_in_epoch_2)
    with pytest.raises(train_module.NonFiniteLoss, match=r"epoch 2: the test loss became NaN/inf.*intact"):
        train(tiny_config(synthetic, tmp_path), **QUIET)
    state = load_training_state(tmp_path / "run")
    assert state["epoch"] == 1  # the checkpoint of epoch 1, not a diverged one
    # the diverged epoch left no row: the file ends with the checkpointed epoch (a NaN would be written as null)
    assert [row["epoch"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]
    monkeypatch.undo()
    with torch.no_grad():  # a model whose BatchNorm statistics went NaN is never saved as "intact"
        from fastcifar.checkpoint import non_finite_state
        from fastcifar.custom_resnet import CustomResNet
        model = CustomResNet(tiny_config(synthetic, tmp_path).model)
        model.prep[1].running_var[0] = float("nan")
        assert non_finite_state(model) == "prep.1.running_var"


def test_every_epoch_writes_a_resumable_checkpoint_and_the_best_weights(tiny_run):
    with pytest.raises(FastCifarError, match="finished run; nothing to resume"):
        load_training_state(tiny_run.run_dir)
    raw = torch.load(tiny_run.run_dir / "checkpoint.pt", weights_only=True)
    assert raw["kind"] == "training-state" and raw["epoch"] == 3 and raw["progress"] is None
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "metrics", "config"} <= raw.keys()
    best = torch.load(tiny_run.run_dir / "best.pt", weights_only=True)
    assert best["test_acc"] == max(m["test_acc"] for m in tiny_run.metrics)


def test_resume_refuses_another_recipe_naming_the_setting(tiny_run):
    saved = tiny_run.config
    with pytest.raises(ConfigError, match=r"data.batch_size 64 -> 32.*model.widths"):
        resume_config(saved, saved.override({"data.batch_size": 32, "model.widths": "8,8,8,8"}))
    moved = saved.override({"data.data_dir": "/elsewhere", "run.progress": "on", "data.num_workers": 2})
    assert resume_config(saved, moved) is moved


@pytest.mark.parametrize(("setup", "fragment"), [
    ("missing", "no such run directory"),
    ("empty", "has no checkpoint.pt"),
    ("weights", "weights only, not a training state"),
    ("garbage", "is not a checkpoint \\(not a file written by torch.save\\)"),
    ("future", "checkpoint format 99"),
    ("unchecked", "has no checksum: it was not written by fastcifar"),
    ("partial", "not a complete training state \\(no 'model'\\)"),
    ("other-network", "not a complete training state \\(its weights are not those of the network"),
    ("bad-config", "not a complete training state \\(its config: data.batch_size: cannot read 'many'"),
])
def test_unresumable_directories_are_refused(tmp_path, setup, fragment):
    run_dir = tmp_path / "run"
    if setup != "missing":
        run_dir.mkdir()
    if setup == "weights":
        save_checkpoint(run_dir / "checkpoint.pt", {"model": {}, "config": {}})
    elif setup == "unchecked":
        torch.save({"format": 1, "kind": "training-state"}, run_dir / "checkpoint.pt")
    elif setup in ("partial", "other-network", "bad-config"):
        state = {"kind": "training-state", "config": Config.from_preset("smoke").to_dict(), "optimizer": {},
                 "scheduler": {}, "scaler": {}, "epoch": 0, "progress": None, "metrics": [], "compile_seconds": 0.0,
                 "rng": {}, "world_size": 1}
        if setup == "other-network":
            state["model"] = CustomResNet(Config().model).state_dict()  # the full widths, not smoke's
        if setup == "bad-config":
            state |= {"model": {}, "config": {"data": {"batch_size": "many"}}}
        save_checkpoint(run_dir / "checkpoint.pt", state)
    elif setup == "garbage":
        (run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    elif setup == "future":
        torch.save({"format": 99, "kind": "training-state"}, run_dir / "checkpoint.pt")
    with pytest.raises(FastCifarError, match=fragment):
        load_training_state(run_dir)


def _nan_loss_at(monkeypatch: pytest.MonkeyPatch, step: int) -> list:
    """Make the `step`-th training step (counted over the whole run) return a NaN loss; returns the list that
    counts the steps taken."""
    original, calls = loop_module.train_step, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss, logits = original(*args, **kwargs)
        return (loss * float("nan"), logits) if len(calls) == step else (loss, logits)

    monkeypatch.setattr(loop_module, "train_step", poisoned)
    return calls


def test_divergence_stops_at_once_naming_epoch_step_lr_and_keeps_the_checkpoint(synthetic, tmp_path, monkeypatch):
    calls = _nan_loss_at(monkeypatch, 20)  # epoch 2, step 4 (16 steps per epoch)
    cfg = tiny_config(synthetic, tmp_path)
    with pytest.raises(train_module.NonFiniteLoss, match=r"epoch 2: .*step 4 of 16.*lr 0\.0[0-9]+.*intact.*--max-lr"):
        train(cfg, **QUIET)
    assert len(calls) == 20  # stopped at the bad step, not later
    state = load_training_state(tmp_path / "run")
    assert state["epoch"] == 1 and state["progress"] is None


def test_a_diverged_run_continues_from_its_last_good_checkpoint_with_a_lower_lr(synthetic, tmp_path, monkeypatch,
                                                                               capsys):
    original = loop_module.train_step
    _nan_loss_at(monkeypatch, 20)  # epoch 2, step 4 (as above); the checkpoint is epoch 1's
    with pytest.raises(train_module.NonFiniteLoss, match=r"--resume .*run --lower-lr --max-lr 0\.025"):
        train(tiny_config(synthetic, tmp_path), **QUIET)
    monkeypatch.setattr(loop_module, "train_step", original)
    run = str(tmp_path / "run")
    assert main(["--resume", run, "--max-lr", "0.02"]) == 2  # a changed LR needs the explicit option
    assert "add --lower-lr" in capsys.readouterr().err
    assert main(["--resume", run, "--lower-lr", "--max-lr", "0.1"]) == 2
    assert "only lowers learning rates: schedule.max_lr 0.05 -> 0.1" in capsys.readouterr().err
    assert main(["--resume", run, "--lower-lr"]) == 2
    assert "needs a lower learning rate" in capsys.readouterr().err
    assert main(["--resume", run, "--lower-lr", "--max-lr", "0.02", "--batch-size", "32"]) == 2  # the rest stays
    assert "data.batch_size 64 -> 32" in capsys.readouterr().err
    assert main(["--lower-lr", *tiny_cli_args(synthetic, tmp_path, **{"run.name": "new"})]) == 2
    assert "use it with --resume" in capsys.readouterr().err

    assert main(["--resume", run, "--lower-lr", "--max-lr", "0.02", "--min-lr", "0.002"]) == 0
    assert "LR levels lowered to max 0.02 / min 0.002" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["lr_end"] == pytest.approx(one_cycle_lr(16, 16, 3, 1, 0.005, 0.05))  # before: the old levels
    for r in rows[1:]:  # after: the schedule of the new levels, from the checkpoint's step on
        assert r["lr_end"] == pytest.approx(one_cycle_lr(16 * r["epoch"], 16, 3, 1, 0.002, 0.02))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["schedule"]["max_lr"] == 0.02
    assert (tmp_path / "run" / "results.json").exists()


def test_a_real_divergence_is_caught(synthetic, tmp_path):
    cfg = tiny_config(synthetic, tmp_path, **{"schedule.epochs": 1, "schedule.min_lr": 1e5, "schedule.max_lr": 1e5})
    with pytest.raises(train_module.NonFiniteLoss, match="epoch 1: the loss became NaN/inf at step"):
        train(cfg, **QUIET)


def test_sigterm_to_a_training_process_then_resume_matches_an_uninterrupted_run(synthetic, tmp_path):
    # same threads: same rounding; SIGTERM comes after the first of 4 epochs, and the other three (~2 s here) leave
    # it time to land mid-run (the exit status below fails the test where it does not)
    overrides = {"schedule.epochs": 4, "run.name": "killed", "run.threads": 1}
    args = tiny_cli_args(synthetic, tmp_path, **overrides)
    code, _, err = sigterm_after_first_epoch([sys.executable, "-m", "fastcifar.train", *args],
                                             tmp_path / "killed" / "metrics.jsonl")
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err and "terminate called" not in err
    assert main(["--resume", str(tmp_path / "killed"), "--run.progress", "off"]) == 0
    full = train(tiny_config(synthetic, tmp_path, **{"schedule.epochs": 4, "run.name": "full", "run.threads": 1}),
                 **QUIET)
    _same_run(full.run_dir, tmp_path / "killed")


def test_cli_resume_rejects_a_changed_recipe(tmp_path, synthetic, monkeypatch, capsys):
    signal_at(monkeypatch, "train_step", 3)
    with pytest.raises(TrainingInterrupted):
        train(tiny_config(synthetic, tmp_path), **QUIET)
    assert main(["--resume", str(tmp_path / "run"), "--batch-size", "32"]) == 2
    assert "data.batch_size 64 -> 32" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "run"), "--preset", "smoke"]) == 2


def test_config_of_a_run_loads_back(tiny_run):
    assert Config.from_dict(json.loads((tiny_run.run_dir / "config.json").read_text())) == tiny_run.config


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_ends_bit_identical(tiny_run, synthetic, tmp_path):
    """A fault-injection run: SIGKILL (no handler, no checkpoint on the way out) at seeded random moments, each
    followed by --resume (or a fresh start when no checkpoint was written yet); the end must be bit for bit
    the uninterrupted run, with nothing of the killed attempts mixed in."""
    import subprocess
    import time

    rng = random.Random(20261202)
    run_dir = tmp_path / "killed"
    fresh = [sys.executable, "-m", "fastcifar.train", *tiny_cli_args(synthetic, tmp_path, **{"run.name": "killed"}),
             "--overwrite"]
    resume = [sys.executable, "-m", "fastcifar.train", "--resume", str(run_dir)]
    def next_command() -> list[str]:  # --resume once the run has written anything to continue from
        started = (run_dir / "checkpoint.pt").exists() or (run_dir / "results.json").exists()
        return resume if started else fresh

    kills, finisher = 0, None  # finisher: the command of the attempt that wrote results.json
    for _ in range(8):
        if (run_dir / "results.json").exists() or kills == 4:
            break
        command = next_command()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 15.0))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait(timeout=60)
        if finisher is None and (run_dir / "results.json").exists():
            finisher = command
    # What a user does next: --resume, which trains on, or finishes a report that a kill after results.json cut
    # short; a complete run answers "nothing to resume" (exit 1).
    if not all((run_dir / name).exists() for name in ("results.json", *reporting.FILES)):
        command = next_command()
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        finisher = finisher or command
    assert kills >= 1
    # A run finished by --resume continued from a checkpoint the killed attempts wrote: its env.json records it.
    resumes = json.loads((run_dir / "env.json").read_text()).get("resumes", [])
    if finisher is resume:  # (else every kill came before the first checkpoint, and a fresh start finished it)
        assert len(resumes) >= 1
    _same_run(tiny_run.run_dir, run_dir)
    assert all((run_dir / name).is_file() for name in reporting.FILES)
    assert not list(run_dir.glob(".*.tmp"))
