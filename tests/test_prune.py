"""Skipping easy examples (fastcifar.prune): which examples a pruned epoch keeps, their loss weights, the loader's
batches, the LR schedule's walk, the saved state, and a pruned run that resumes exactly."""

import importlib
import json

import pytest
import torch

from fastcifar.config import Config, ConfigError
from fastcifar.data import ResidentLoader
from fastcifar.interrupt import TrainingInterrupted
from fastcifar.prune import EasyPruner, PrunedLoader
from fastcifar.training import train
from tests.conftest import signal_at, tiny_config

QUIET = {"log": lambda _: None}
PRUNE = {"data.prune_fraction": 0.5, "data.prune_epochs": 1}  # the 2nd of the tiny runs' 3 epochs is pruned
CPU = torch.device("cpu")


def pruner_with_scores(scores: torch.Tensor, fraction: float = 0.5, epochs: int = 2, seed: int = 0) -> EasyPruner:
    pruner = EasyPruner(len(scores), fraction, epochs, seed, CPU)
    pruner.scores = scores.clone()
    return pruner


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.8])
def test_a_pruned_epoch_drops_only_easy_examples_and_scales_the_kept_easy_ones(fraction):
    scores = torch.rand(20_000, generator=torch.Generator().manual_seed(1)) ** 2  # skewed: most below the mean
    pruner = pruner_with_scores(scores, fraction)
    pruner.plan(1)
    easy = scores < scores.mean()
    assert pruner.keep[~easy].all()  # every hard example trains
    dropped = (~pruner.keep).sum().item()
    assert dropped == pytest.approx(fraction * easy.sum().item(), rel=0.05)
    assert pruner.kept() == len(scores) - dropped
    kept_easy = easy & pruner.keep
    assert torch.allclose(pruner.weights[kept_easy], torch.tensor(1 / (1 - fraction)))
    assert (pruner.weights[~easy] == 1).all()
    # the expected loss is the full one's: each easy example survives with 1 - fraction, weighted 1 / (1 - fraction)
    estimate = (scores * pruner.weights * pruner.keep).sum() / scores.sum()
    assert estimate.item() == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize(("index", "pruned"), [(0, False), (1, True), (2, True), (3, False), (7, False)])
def test_only_the_epochs_after_the_first_and_up_to_prune_epochs_are_pruned(index, pruned):
    pruner = pruner_with_scores(torch.arange(100.0), epochs=2)
    pruner.plan(index)
    assert pruner.prunes(index) is pruned
    assert (pruner.kept() < 100) is pruned


def test_the_plan_is_a_function_of_seed_epoch_and_scores_and_is_kept_while_the_epoch_runs():
    scores = torch.rand(1000, generator=torch.Generator().manual_seed(2))
    a, b, other_seed = pruner_with_scores(scores), pruner_with_scores(scores), pruner_with_scores(scores, seed=1)
    for p in (a, b, other_seed):
        p.plan(1)
    assert torch.equal(a.keep, b.keep) and not torch.equal(a.keep, other_seed.keep)
    keep = a.keep.clone()
    a.scores.fill_(5.0)  # losses recorded during the epoch do not change the epoch's set
    a.plan(1)
    assert torch.equal(a.keep, keep)
    a.plan(2)
    assert not torch.equal(a.keep, keep)


def test_record_stores_plain_cross_entropy_at_the_examples_indices():
    pruner = EasyPruner(10, 0.5, 1, 0, CPU)
    logits, labels = torch.randn(3, 10), torch.tensor([1, 2, 3])
    pruner.record(torch.tensor([7, 0, 4]), logits, labels)
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(pruner.scores[[7, 0, 4]], expected)
    assert (pruner.scores[[1, 2, 3, 5, 6, 8, 9]] == 0).all()


def test_state_round_trip_and_a_state_of_another_size_is_refused():
    pruner = pruner_with_scores(torch.rand(50))
    pruner.plan(1)
    fresh = EasyPruner(50, 0.5, 2, 0, CPU)
    fresh.load_state_dict(pruner.state_dict())
    assert fresh.planned == 1 and torch.equal(fresh.keep, pruner.keep) and torch.equal(fresh.scores, pruner.scores)
    with pytest.raises(ValueError, match="scores is not a tensor of 60 values"):
        EasyPruner(60, 0.5, 2, 0, CPU).load_state_dict(pruner.state_dict())


def _loader(n: int = 100, batch: int = 16) -> tuple[ResidentLoader, torch.Tensor]:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 32, 32, 3).contiguous()
    labels = torch.arange(n) % 10
    return ResidentLoader(images, labels, batch, train=True, seed=3), labels


def test_the_loader_yields_the_kept_examples_once_each_with_their_indices():
    base, labels = _loader()
    pruner = pruner_with_scores(torch.linspace(0, 1, 100) ** 3)
    loader = PrunedLoader(base, pruner)
    with loader.epoch(1) as batches:
        seen = []
        for images, batch_labels, index in batches:
            assert torch.equal(images[:, 0, 0, 0].long(), index) and torch.equal(batch_labels, labels[index])
            seen.append(index)
    seen = torch.cat(seen)
    assert len(loader) == -(-pruner.kept() // 16)
    assert sorted(seen.tolist()) == torch.nonzero(pruner.keep).flatten().tolist()
    with loader.epoch(1, skip=2) as batches:  # a resumed epoch: the same batches from the 3rd on
        assert torch.equal(torch.cat([i for _, _, i in batches]), seen[32:])


def test_a_full_epoch_has_the_base_loaders_batches():
    base, _ = _loader()
    loader = PrunedLoader(base, EasyPruner(100, 0.5, 1, 0, CPU))
    with loader.epoch(0) as pruned, base.epoch(0) as plain:
        for (a, la, _), (b, lb) in zip(pruned, plain, strict=True):
            assert torch.equal(a, b) and torch.equal(la, lb)
    assert len(loader) == len(base) == 7


@pytest.mark.parametrize(("overrides", "message"), [
    ({"data.prune_epochs": 3}, "data.prune_epochs must be below schedule.epochs=3"),
    ({"data.loader": "ffcv"}, "data.prune_fraction needs --data.loader resident or auto"),
    ({"data.prune_fraction": 0.95}, "data.prune_fraction must be in"),
])
def test_config_refuses_what_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"schedule": {"epochs": 3, "peak_epoch": 1}}).override(PRUNE | overrides).validated()


@pytest.fixture(scope="module")
def pruned_run(synthetic, tmp_path_factory):
    return train(tiny_config(synthetic, tmp_path_factory.mktemp("pruned"), **PRUNE), **QUIET)


def test_a_pruned_run_trains_fewer_images_and_walks_the_whole_schedule(pruned_run, synthetic, tmp_path):
    full = train(tiny_config(synthetic, tmp_path, **{"data.loader": "resident"}), **QUIET)
    images = [round(m["train_img_s"] * m["train_s"]) for m in pruned_run.metrics]
    assert images[0] == images[2] == 1000 and 500 < images[1] < 1000
    assert pruned_run.summary["train_images"] == sum(images)
    # the LR at each epoch's start and end is the unpruned run's: a pruned epoch covers the same stretch
    for a, b in zip(pruned_run.metrics, full.metrics, strict=True):
        assert a["lr"] == pytest.approx(b["lr"]) and a["lr_end"] == pytest.approx(b["lr_end"], abs=1e-12)
    assert json.loads((pruned_run.run_dir / "env.json").read_text())["loader"] == "resident"


def test_a_run_stopped_in_a_pruned_epoch_resumes_exactly(pruned_run, synthetic, tmp_path, monkeypatch):
    cfg = tiny_config(synthetic, tmp_path, **PRUNE)
    signal_at(monkeypatch, "train_step", 20)  # epoch 2 (pruned), step 4
    with pytest.raises(TrainingInterrupted, match="in epoch 2, after step 4 of 1[0-5];"):  # of the pruned epoch's
        train(cfg, **QUIET)
    monkeypatch.undo()
    train(cfg, resume=tmp_path / "run", **QUIET)
    a = torch.load(pruned_run.run_dir / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["train_loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (pruned_run.run_dir, tmp_path / "run")]
    assert losses[0] == losses[1]


def test_unit_weights_give_the_plain_loss(synthetic, tmp_path):
    """train_step's weighted path is the mean loss when every weight is 1 (the unpruned epochs' numbers)."""
    loop = importlib.import_module("fastcifar.loop")
    from fastcifar.session import Session

    session = Session.open(tiny_config(synthetic, tmp_path, **{"optim.label_smoothing": 0.2}), QUIET["log"])
    t = session.trainer
    for g in t.optimizer.param_groups:
        g["lr"] = 0.0
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(8)
    state = t.augment.generator.get_state()
    plain, _ = loop.train_step(t, images, labels)
    t.augment.generator.set_state(state)
    weighted, _ = loop.train_step(t, images, labels, torch.ones(8))
    assert weighted.item() == pytest.approx(plain.item(), rel=1e-6)
