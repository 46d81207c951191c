"""Training: `train(cfg)` and the command `python -m fastcifar.train [--preset NAME] [--section.field VALUE ...]`.

`train` reads top to bottom: open a session (fastcifar/session.py: data, model, optimizer, schedule...), warm up
the compiled model, restore a checkpoint when resuming, then for each epoch `run_epoch` (the steps, the schedule,
the weight averages and the stop checks, then the test pass and the row), log the row, checkpoint; then save the
final weights, predictions, results.json and the report. A signal stops it cleanly after the current step with a
checkpoint; a NaN/inf loss stops it naming the step.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastcifar import loop, reporting, rundir
from fastcifar.checkpoint import (
    Checkpointer,
    EpochProgress,
    load_training_state,
    non_finite_state,
    restore_state,
    resume_config,
)
from fastcifar.cli import Parser, add_config_arguments, config_from_args, path_arg
from fastcifar.config import Config, ConfigError
from fastcifar.custom_resnet import count_parameters
from fastcifar.data import BatchLoader, open_split
from fastcifar.distributed import AgreedStop, Dist, all_max, all_sum, broadcast, from_env, gather, keep_until_exit
from fastcifar.distributed import stop as stop_group
from fastcifar.errors import FastCifarError, run_cli
from fastcifar.inference import Predictions, predict
from fastcifar.interrupt import StopSignals
from fastcifar.loop import (
    CHECK_EVERY_GPU,
    PROGRESS_EVERY,
    EpochTotals,
    NonFiniteLoss,
    PassStats,
    StopRequested,
    Trainer,
    check_finite,
    plain_module,
    progress_bar,
    progress_enabled,
    scale_before,
    test_pass,
)
from fastcifar.runtime import resolve_device, sync
from fastcifar.session import Session, quiet


@dataclass
class TrainResult:
    """What `train` returns: the run directory, one dict per epoch, the trained model (on its device, in
    eval mode after the final test pass; with optim.ema_decay, the averaged weights: the ones tested and
    saved as model.pt), the resolved config and the results.json summary."""

    run_dir: Path
    metrics: list[dict]
    model: nn.Module
    config: Config
    summary: dict

    def predictions(self) -> Predictions:
        """The final test-set predictions (from predictions.npz), e.g. for `plot_misclassified`."""
        return Predictions.load(self.run_dir / "predictions.npz")


class EpochTable:
    """The aligned per-epoch table printed during training."""

    COLUMNS = [("epoch", "{:>5d}"), ("lr", "{:>9.5f}"), ("train_loss", "{:>10.4f}"), ("train_acc", "{:>9.2%}"),
               ("test_loss", "{:>9.4f}"), ("test_acc", "{:>8.2%}"), ("epoch_s", "{:>7.1f}"),
               ("train_img_s", "{:>11.0f}")]

    WIDTHS = [len(fmt.format(0.0 if "d" not in fmt else 0)) for _, fmt in COLUMNS]  # each column's formatted width

    def header(self) -> str:
        return "  ".join(name.rjust(w) for (name, _), w in zip(self.COLUMNS, self.WIDTHS, strict=True))

    def row(self, metrics: dict) -> str:
        """One epoch's row; a value the epoch did not measure (no test pass, run.test_every) shows as "-"."""
        return "  ".join("-".rjust(w) if metrics[name] is None else fmt.format(metrics[name])
                         for (name, fmt), w in zip(self.COLUMNS, self.WIDTHS, strict=True))


def train(cfg: Config, log: Callable[[str], None] = print, resume: str | Path | None = None,
          lower_lr: bool = False) -> TrainResult:
    """Train the network as `cfg` says, writing the run directory; returns metrics and the model.

    `resume`: a run directory whose checkpoint.pt to continue from (exactly: same batches, same random
    draws); `cfg` may then differ from that run's config only in RESUMABLE_CHANGES (paths, speed settings).
    `lower_lr` (with `resume`): also lower the LR levels, e.g. to continue a diverged run from its last good
    checkpoint; the schedule then follows the new levels from the checkpoint's step on.
    """
    if lower_lr and resume is None:
        raise ConfigError("--lower-lr continues a run: use it with --resume RUN_DIR")
    began = time.perf_counter()  # the set-up (data onto the device, whitening, run directory) counts too
    state = None
    if resume is not None:
        state = load_training_state(resume)
        run_dir = Path(resume)
        cfg = resume_config(Config.from_dict(state["config"]),
                            cfg.override({"run.out_dir": str(run_dir.parent), "run.name": run_dir.name}), lower_lr)
        saved_on, now_on = state.get("device") or "", resolve_device(cfg.run.device).type
        if saved_on and saved_on != now_on:
            raise FastCifarError(f"{run_dir} was saved on {saved_on} and would resume on {now_on}: its random "
                                 f"generator states belong to {saved_on}; resume it with --device {saved_on}")
    session = Session.open(cfg, log, resume=state is not None)
    if session.dist.enabled:
        keep_until_exit(session.trainer.model)  # its destructor can deadlock gloo at the end: see distributed._KEPT
    try:
        result = _train(session, state, log if session.dist.is_main else quiet, began, lower_lr)
    except BaseException:
        stop_group(wait=False)  # the other ranks may be anywhere: do not wait for them
        raise
    finally:
        rundir.release_run_dir(session.run_dir)
    stop_group()
    return result


def _train(session: Session, state: dict | None, log: Callable[[str], None], began: float,
           lower_lr: bool = False) -> TrainResult:
    run_dir, s, trainer = session.run_dir, session.cfg.schedule, session.trainer
    compile_seconds = session.warm_up()  # results.json's compile_seconds: all of the warm-up
    log(f"warm-up ({'loaders, torch.compile' if session.compiled else 'loaders'}): {compile_seconds:.1f} s "
        f"(not counted in epoch times; counted in the times to an accuracy)")
    setup_seconds = time.perf_counter() - began - compile_seconds
    metrics: list[dict] = []
    progress: EpochProgress | None = None
    if state is not None:  # after the warm-up, which puts back what it changed
        metrics, progress = restore_state(trainer, state, session.dist, new_lr=lower_lr)
        compile_seconds += state["compile_seconds"]
        setup_seconds += state.get("setup_seconds", 0.0)  # 0 for checkpoints from before it was kept
        if session.dist.is_main:
            rundir.write_jsonl(run_dir / "metrics.jsonl", metrics)  # drops rows logged after the checkpoint
        log(f"resumed {run_dir} after epoch {len(metrics)}"
            + (f", step {progress.step} of epoch {len(metrics) + 1}" if progress else "")
            + (f", with the LR levels lowered to max {s.max_lr:g} / min {s.min_lr:g}" if lower_lr else ""))

    ckpt = Checkpointer(trainer, session.cfg, run_dir, session.dist, session.device, metrics, compile_seconds,
                        setup_seconds, steps_per_epoch=len(session.loaders.train))
    table = EpochTable()
    log(table.header())
    for row in metrics:
        log(table.row(row))
    data, every = session.cfg.data, session.cfg.run.test_every
    with StopSignals() as signals:
        # On a CPU every step is synchronous anyway; on GPUs agreeing across ranks is a sync, so rarely.
        stop = AgreedStop(signals, session.dist, session.device, 1 if session.device.type == "cpu" else CHECK_EVERY_GPU)
        for ep in range(len(metrics) + 1, s.epochs + 1):
            try:
                # The loader's order of epoch ep depends only on (seed, ep): a resumed epoch replays it from
                # `progress`.
                row = run_epoch(trainer, session.loaders.train, ep, s.epochs,
                                test=session.loaders.test if is_test_epoch(ep, s.epochs, every) else None,
                                flip=data.test_flip, translate=data.test_translate, start=progress, stop=stop,
                                dist=session.dist, show_progress=progress_enabled(session.cfg.run.progress))
            except EpochInterrupted as stopped:
                ckpt.steps_per_epoch = len(session.loaders.train)  # this epoch's: a pruned one has fewer steps
                ckpt.interrupt(stop, stopped.epochs_done, stopped.progress)
            except NonFiniteLoss as err:
                kept = (f"the last checkpoint ({ckpt.path}) is intact" if ckpt.path.exists()
                        else "no checkpoint was written")
                raise NonFiniteLoss(f"training diverged in epoch {ep}: {err}; {kept}. Lower --max-lr (see python -m "
                                    f"fastcifar find-lr), use --precision fp32, or add --model.logit_scale 0.125"
                                    f"{_continue_hint(ckpt, session)}") from None
            progress = None
            metrics.append(row)
            if session.dist.is_main:
                rundir.append_jsonl(run_dir / "metrics.jsonl", row)
            log(table.row(row))
            ckpt.end_of_epoch(ep, row["test_acc"])  # None: no test pass this epoch
            if stop():
                ckpt.interrupt(stop, ep, None)
    return _finish(session, metrics, ckpt.compile_seconds, ckpt.setup_seconds, log)


SINGLE = Dist()  # one process, no process group


class EpochInterrupted(Exception):
    """A stop was requested during an epoch: `epochs_done` whole epochs, and `progress` into the next (None when
    only its test pass is left)."""

    def __init__(self, epochs_done: int, progress: EpochProgress | None) -> None:
        super().__init__(f"stopped after epoch {epochs_done}")
        self.epochs_done, self.progress = epochs_done, progress


def run_epoch(trainer: Trainer, train: BatchLoader, ep: int, epochs: int, *, test: BatchLoader | None = None,
              flip: bool = False, translate: int = 0, start: EpochProgress | None = None,
              stop: Callable[[], bool] | None = None, dist: Dist = SINGLE, show_progress: bool | None = None) -> dict:
    """Epoch `ep` (1-based) of `epochs`: the training steps, then (with a `test` loader) the test pass; returns
    the epoch's row (test fields None without a test pass).

    `start` continues an epoch interrupted after `start.step` steps: the loader replays the same epoch from that
    batch on. When `stop()` becomes true the epoch ends after the current step, raising EpochInterrupted with how
    far it got. A NaN/inf loss, weight or test loss raises NonFiniteLoss naming where.
    """
    t, amp, pruner = trainer, trainer.amp, trainer.pruner
    if pruner is not None:
        pruner.plan(ep - 1)  # which examples this epoch trains on (a resumed epoch keeps its saved plan)
    steps = len(train)
    # The schedule runs in full epochs' steps; an epoch that leaves examples out walks the same stretch of it in
    # fewer steps (`advance_schedule`).
    full = t.total_steps // epochs if pruner is not None else steps
    lr = float(t.lr_at((ep - 1) * full))  # at the epoch's first step, also when resuming in its middle
    t.model.train()
    t.augment.epoch = ep - 1  # alternating flips depend on it
    start = start or EpochProgress()
    totals = EpochTotals(amp.device, start)
    # On a CPU every step is synchronous anyway; on a GPU reading the loss is a sync, so rarely: the first
    # non-finite step is recorded on the device either way, and the error names it.
    check_every = 1 if amp.device.type == "cpu" else CHECK_EVERY_GPU
    began, lrs = time.perf_counter(), {}
    if start.step < steps:
        with (train.epoch(ep - 1, skip=start.step) as batches,
              progress_bar(steps, f"epoch {ep}/{epochs}", show_progress) as bar):
            bar.update(start.step)
            for step, (images, labels, *index) in enumerate(batches, start.step + 1):
                lrs[step] = t.scheduler.get_last_lr()[0]
                scale = scale_before(amp)
                if pruner is None:
                    loss, logits = loop.train_step(t, images, labels)
                else:  # the pruned loader's batches carry their dataset indices
                    loss, logits = loop.train_step(t, images, labels, pruner.weights[index[0]])
                    pruner.record(index[0], logits, labels)
                if scale is not None:  # fp16: the GradScaler lowered its scale = it skipped this step (on device)
                    totals.skipped_on_device += (amp.scaler._scale < scale).sum()
                if steps == full:
                    t.scheduler.step()
                else:
                    advance_schedule(t.scheduler, (ep - 1) * full + round(step * full / steps))
                if t.lookahead is not None:
                    t.lookahead.step(plain_module(t.model), t.scheduler.last_epoch, t.total_steps)
                if t.ema is not None:
                    t.ema.update(plain_module(t.model))
                totals.add(loss, logits, labels)
                if step % check_every == 0 or step == steps:
                    check_finite(totals, lrs, steps)
                if not bar.disable and (step % PROGRESS_EVERY == 0 or step == steps):
                    loss_avg, acc = totals.read()  # sync point, only while a progress bar is shown
                    bar.set_postfix(loss=f"{loss_avg:.3f}", acc=f"{acc:.3f}", refresh=False)
                    bar.update(step - bar.n)
                if stop is not None and stop() and step < steps:
                    break
    sync(amp.device)
    check_finite(totals, lrs, steps)
    seconds = start.seconds + time.perf_counter() - began
    loss_avg, acc = totals.read()
    tr = PassStats(loss_avg, acc, totals.images, seconds, totals.steps == steps, totals.progress(seconds))
    if not tr.finished or stop is not None and stop():
        raise EpochInterrupted(ep - 1, tr.progress)
    if t.lookahead is not None and ep == epochs:
        t.lookahead.finish(t.module)  # the slow weights are the run's result (idempotent on resume)

    te = None
    if test is not None:
        try:
            te = test_pass(t.eval_model, test, normalize=t.augment.normalize, loss_fn=t.loss_fn, amp=amp, stop=stop,
                           flip=flip, translate=translate)
        except StopRequested:
            raise EpochInterrupted(ep - 1, tr.progress) from None  # training part done: resume redoes the test
    bad = non_finite_state(t.tested)
    if bad or te is not None and not math.isfinite(te.loss):
        what = f"the BatchNorm statistics or weights ({bad})" if bad else "the test loss"
        raise NonFiniteLoss(f"{what} became NaN/inf (lr up to {lr:.4g})")

    skipped = int(all_sum([tr.progress.skipped], dist, amp.device)[0])
    tr = _over_ranks(tr, dist, amp.device)
    row = {"epoch": ep, "lr": lr, "lr_end": t.scheduler.get_last_lr()[0], "train_loss": tr.loss,
           "train_acc": tr.accuracy, "test_loss": None, "test_acc": None, "train_s": tr.seconds, "test_s": 0.0,
           "epoch_s": tr.seconds, "train_img_s": tr.images / tr.seconds, "test_img_s": None,
           "skipped_steps": skipped, "train_side": t.augment.side_at(ep - 1)}
    if te is not None:  # else an epoch without a test pass (run.test_every): its test fields stay None
        te = _over_ranks(te, dist, amp.device)
        row |= {"test_loss": te.loss, "test_acc": te.accuracy, "test_s": te.seconds,
                "epoch_s": tr.seconds + te.seconds, "test_img_s": te.images / te.seconds}
    return row


def advance_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, position: int) -> None:
    """Set the LR schedule to step `position` of its full-epoch steps (a pruned epoch's step i of m stands for
    step i * full / m of the epoch). The schedule is a LambdaLR: the LR is a function of the position alone."""
    scheduler.last_epoch = position - 1
    scheduler.step()


def is_test_epoch(ep: int, epochs: int, every: int) -> bool:
    """Whether epoch `ep` (1-based) of `epochs` ends with a test pass: every `every`-th one, and always the last."""
    return ep == epochs or every > 0 and ep % every == 0


def _continue_hint(ckpt: Checkpointer, session: Session) -> str:
    if not ckpt.path.exists():
        return ""
    return (f"; or continue from that checkpoint: python -m fastcifar train --resume {session.run_dir} "
            f"--lower-lr --max-lr {session.cfg.schedule.max_lr / 2:.4g}")


def _over_ranks(stats: PassStats, dist: Dist, device: torch.device) -> PassStats:
    """Loss/accuracy over every rank's images, time of the slowest rank (the stats themselves alone)."""
    if not dist.enabled:
        return stats
    loss_sum, correct, images = all_sum([stats.loss * stats.images, stats.accuracy * stats.images, stats.images],
                                        dist, device)
    seconds = all_max(stats.seconds, dist, device)
    return dataclasses.replace(stats, loss=loss_sum / images, accuracy=round(correct) / images, images=int(images),
                               seconds=seconds)


def _finish(session: Session, metrics: list[dict], compile_seconds: float, setup_seconds: float,
            log: Callable[[str], None]) -> TrainResult:
    """The final weights, predictions, results.json (marks the run finished) and the report."""
    cfg, run_dir, dist, trainer = session.cfg, session.run_dir, session.dist, session.trainer
    model = trainer.module
    # DDP keeps the weights equal on every rank; check it (batch-norm statistics are per rank: rank 0's are kept).
    checksums = gather(sum(float(p.detach().double().sum()) for p in model.parameters()), dist)
    result = _summarise(metrics, compile_seconds, count_parameters(model), setup_seconds) | {
        "steps_per_epoch": len(session.loaders.train), "world_size": dist.world_size}
    if dist.enabled:
        result["rank_weight_checksums"] = checksums
        if len(set(checksums)) != 1:
            raise FastCifarError(f"weights differ across ranks after training ({checksums}); this is a bug")
    if not dist.is_main:
        broadcast(None, dist)  # wait for rank 0's files
        return TrainResult(run_dir, metrics, trainer.tested, cfg, result)
    rundir.save_checkpoint(run_dir / "model.pt", {"model": trainer.tested.state_dict(), "config": cfg.to_dict(),
                                                  "epoch": cfg.schedule.epochs})
    # One more, untimed test pass that keeps every prediction, for the report (confusion, misclassified);
    # on rank 0 over the whole test set, also in a distributed run.
    test = session.loaders.test if not dist.enabled else open_split(cfg.data, "test", session.device)
    predict(trainer.eval_model, test, trainer.augment.normalize, trainer.amp.autocast, cfg.data.test_flip,
            cfg.data.test_translate).save(run_dir / "predictions.npz")
    rundir.write_json(run_dir / "results.json", result)
    reporting.write_report(run_dir)
    method = f" with {m}" if (m := reporting.test_method(cfg)) else ""
    log(f"final test accuracy{method} {result['final_test_acc']:.2%} (best {result['best_test_acc']:.2%}) | "
        f"{result['train_seconds']:.0f} s training, {result['total_seconds']:.0f} s in epochs, "
        f"{result['mean_train_img_s']:.0f} img/s | {run_dir}")
    broadcast(None, dist)
    return TrainResult(run_dir, metrics, trainer.tested, cfg, result)


def _summarise(metrics: list[dict], compile_seconds: float, parameters: int, setup_seconds: float = 0.0) -> dict:
    tested = reporting.tested_epochs(metrics)  # the last epoch always is (is_test_epoch)
    total = sum(m["epoch_s"] for m in metrics)
    train_s = sum(m["train_s"] for m in metrics)
    images = sum(m["train_img_s"] * m["train_s"] for m in metrics)
    # The work apart from the machine's speed: images forwarded and backpropagated (every training image is both),
    # and the same weighted by their pixels against a 32x32 image (progressive resizing's low-res epochs weigh less).
    equivalent = sum(m["train_img_s"] * m["train_s"] * (m.get("train_side") or 32) ** 2 / 32 ** 2 for m in metrics)
    return {
        "epochs": len(metrics),
        "final_test_acc": metrics[-1]["test_acc"],
        "best_test_acc": max(m["test_acc"] for m in tested),
        "final_test_loss": metrics[-1]["test_loss"],
        "train_seconds": train_s,
        "total_seconds": total,
        "compile_seconds": compile_seconds,  # the warm-up before epoch 1 (loaders' first batch, compilation)
        "setup_seconds": setup_seconds,  # from train() to the warm-up: session, data onto the device, inits
        "mean_train_img_s": images / train_s,
        "train_images": round(images),
        "train_images_32px": round(equivalent),
        "parameters": parameters,
        # the first tested epoch whose test accuracy reaches each mark, and the seconds to it: set-up, warm-up,
        # and every epoch up to it with its test pass (with run.test_every > 1, an untested epoch before it may
        # have reached the mark already)
        "time_to_test_acc": {f"{mark:.2f}": dict(zip(("epoch", "seconds"), time_to(
            metrics, mark, compile_seconds + setup_seconds), strict=True)) for mark in ACCURACY_MARKS},
    }


ACCURACY_MARKS = (0.90, 0.91, 0.92, 0.93, 0.94)


def time_to(metrics: list[dict], target: float, start_seconds: float = 0.0) -> tuple[int | None, float | None]:
    """The first epoch whose test accuracy reaches `target` and the seconds spent in epochs up to and
    including it (plus `start_seconds`, e.g. the compile warm-up); (None, None) if no tested epoch does."""
    elapsed = start_seconds
    for m in metrics:
        elapsed += m["epoch_s"]
        if m["test_acc"] is not None and m["test_acc"] >= target:
            return m["epoch"], elapsed
    return None, None


def finish_report(run_dir: Path) -> bool:
    """A finished run (results.json) whose report files are missing (a kill between the two): write them and
    say so. True when the run was finished (and nothing is left to resume)."""
    if not (run_dir / "results.json").exists():
        return False
    missing = [name for name in reporting.FILES if not (run_dir / name).exists()]
    if not missing:
        return False  # load_training_state says "finished run; nothing to resume"
    # The lock keeps a second --resume out and removes the temporary file of the writer that the kill stopped.
    rundir.lock_run_dir(run_dir)
    for path in reporting.write_report(run_dir):
        print(f"wrote {path}")
    print(f"{run_dir} had finished; its report ({', '.join(missing)}) was missing and is written now")
    return True


def build_parser(prog: str = "python -m fastcifar.train") -> argparse.ArgumentParser:
    parser = Parser(
        prog=prog,
        description="Train the custom ResNet on CIFAR-10 (betons from data_prep/write_beton.py).",
        epilog="Every config field is a dotted flag, e.g. --optim.weight_decay 1e-3 (see fastcifar/config.py).",
    )
    add_config_arguments(parser)
    parser.add_argument("--resume", metavar="RUN_DIR", type=path_arg,
                        help="continue the run saved in RUN_DIR/checkpoint.pt")
    parser.add_argument("--lower-lr", action="store_true",
                        help="with --resume: allow lower LR levels (--max-lr, --min-lr, --schedule.end_lr, "
                             "--optim.muon_lr) than the run's, e.g. to continue a diverged run from its last "
                             "good checkpoint")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m fastcifar.train") -> int:
    args = build_parser(prog).parse_args(argv)

    def run() -> TrainResult | None:
        if args.resume is None:
            if args.lower_lr:
                raise ConfigError("--lower-lr continues a run: use it with --resume RUN_DIR")
            return train(config_from_args(args))
        moved = {"run.name", "run.out_dir"} & vars(args).keys()
        if moved:
            raise ConfigError(f"--resume continues {args.resume} in place; do not combine it with "
                              f"{' or '.join('--' + k for k in sorted(moved))}")
        if finish_report(Path(args.resume)):
            return None
        # The interrupted run's config, with only the options given now changed (checked in train).
        saved = load_training_state(args.resume)["config"]
        return train(config_from_args(args, base=Config.from_dict(saved)), resume=args.resume,
                     lower_lr=args.lower_lr)

    code = run_cli(run)
    if from_env().enabled:  # every file is written and closed; skip the gloo/DDP teardown (distributed._KEPT)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
