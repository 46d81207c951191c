"""The one place where fastcifar's defaults live.

A configuration is a tree of frozen dataclasses, one per section (data, model, optim, schedule, run).
Every field can be set from the command line as a dotted flag, ``--<section>.<field> VALUE``
(for example ``--optim.weight_decay 1e-3``); the most common fields also have short flags
(``--epochs``, ``--batch-size``, ``--max-lr``...; see ``SHORT_FLAGS``). Named presets are starting
points that flags then override. Library code receives the typed sections it needs, never an
argparse namespace.

The defaults here are the default recipe (`fast12`: the least time to 91% measured, docs/experiments.md), so
`Config()` is what the command line trains without `--preset`; the other presets (fastcifar/presets.py) are named
sets of overrides on it, `fast` (the same levers at 24 epochs: the best accuracy) among them. Each default's comment
or help says where it comes from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastcifar.errors import FastCifarError
from fastcifar.presets import DEFAULT_PRESET, PRESETS


class ConfigError(FastCifarError, ValueError):
    """An invalid configuration: the message names the field and says what is allowed."""


def is_device(text: str) -> bool:
    """auto, cpu, cuda or cuda:N."""
    head, _, index = text.partition(":")
    return head in {"auto", "cpu"} and not index or head == "cuda" and (not index or index.isdigit())


LOADER_KINDS = ("auto", "ffcv", "resident")  # the one list: fastcifar/data.py builds each kind
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Check:
    """A rule for one field's value, with the words that state it ("must be >= 1")."""

    ok: Callable[[Any], bool]
    rule: str


def at_least(low: float, note: str = "") -> Check:
    return Check(lambda v: v >= low, f"must be >= {low}{note}")


def above(low: float) -> Check:
    return Check(lambda v: v > low, f"must be > {low}")


def within(low: float, high: float, note: str = "", open_low: bool = False, open_high: bool = False) -> Check:
    brackets = ("(" if open_low else "[", ")" if open_high else "]")
    return Check(lambda v: (low < v if open_low else low <= v) and (v < high if open_high else v <= high),
                 f"must be in {brackets[0]}{low}, {high}{brackets[1]}{note}")


def one_of(*choices: str) -> Check:
    words = ", ".join(choices[:-1]) + f" or {choices[-1]}"
    return Check(lambda v: v in choices, f"must be {words}")


def opt(default: Any, help: str, check: Check | None = None) -> Any:
    """A config field: its default, the one-line help that --help shows, and the rule its value must meet."""
    return field(default=default, metadata={"help": help, "check": check})


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = opt("data", "folder holding train.beton / test.beton (written by python -m fastcifar prepare)")
    loader: str = opt("auto", "ffcv (betons), resident (the split on the device as one tensor; needs no FFCV) "
                      "or auto (ffcv where installed)", one_of(*LOADER_KINDS))
    batch_size: int = opt(512, "training batch size (global: split over torchrun ranks)",
                          within(1, 50_000, " (the training set)"))
    test_batch_size: int = opt(1000, "test batch size (no grad: larger batches are cheaper; 1000 divides the 10,000 "
                                     "test images: one compiled shape, no partial batch)",
                                within(1, 10_000, " (the test set)"))
    # 1 on a CPU: decoding raw 32x32 images is cheap, and every extra thread takes a core from the step.
    num_workers: int = opt(0, "FFCV decode threads; 0 = auto (1 on a CPU, 2 with a GPU)", within(0, 64, " (0 = auto)"))
    train_subset: int = opt(0, "train on the first N images only (0 = all 50,000)", within(0, 50_000, " (0 = all)"))
    test_subset: int = opt(0, "test on the first N images only (0 = all 10,000)", within(0, 10_000, " (0 = all)"))
    crop_padding: int = opt(4, "random 32x32 crop of the image padded by this many pixels", within(0, 16))
    # Page's and the seed's (Albumentations' default, cv2.BORDER_REFLECT_101): torch's (and numpy's) "reflect".
    pad_mode: str = opt("reflect", "padding of the crop: reflect (edge pixel not repeated) or zeros",
                        one_of("zeros", "reflect"))
    flip: bool = opt(True, "random horizontal flips")
    # Alternating flips (Keller Jordan's airbench): +0.49 pt at 10 epochs over random flips, 2 seeds.
    flip_mode: str = opt("alternate", "random: each image flipped with p=0.5 every epoch; alternate: flipped in every "
                         "other epoch (a fixed per-image bit says which first); always: every image flipped (the "
                         "seed's code as it ran: HorizontalFlip(p=1))", one_of("random", "alternate", "always"))
    cutout_size: int = opt(8, "side of the cutout square (0 = no cutout)", within(0, 32))
    cutout_place: str = opt("centre", "inside: each square wholly inside the image (Albumentations' CoarseDropout, "
                            "the seed's code); centre: centre uniform over the image, square clipped at the border "
                            "(DeVries & Taylor)", one_of("inside", "centre"))
    cutout_max_holes: int = opt(1, "each image gets a uniform 1..N cutout squares (the seed's code as it ran: 3)",
                                within(1, 16))
    cutout_p: float = opt(1.0, "probability that an image gets its cutout squares (the seed's code as it ran: 0.8)",
                          within(0, 1))
    # Progressive resizing (FFCV's ImageNet examples, fast.ai; MosaicML Composer's two modes): the early epochs on
    # smaller images cost less per step (a 24x24 step is ~56% of a 32x32 one); the last ones at 32x32, the test size.
    low_res_size: int = opt(32, "side of the training images in the first low_res_epochs epochs (progressive "
                            "resizing; 32 = full size, off)", within(8, 32))
    low_res_epochs: int = opt(0, "epochs trained at low_res_size before the rest at 32x32 (0 = off); testing is "
                              "always at 32x32", within(0, 10_000))
    low_res_mode: str = opt("crop", "how a low-res image is made from the augmented 32x32 one: crop (a random "
                            "low_res_size window: the test images' scale, less of the image) or scale (the whole "
                            "image resized down, antialiased bilinear)", one_of("crop", "scale"))
    # Skipping easy examples (InfoBatch, Qin et al. 2024; fastcifar/prune.py): each pruned epoch leaves out a random
    # share of the examples whose last loss was below the mean, and scales up the kept ones' losses to match.
    prune_fraction: float = opt(0.0, "share of the below-mean-loss examples that each pruned epoch leaves out (their "
                                "kept peers' losses are scaled by 1/(1-share): the same expected gradient); 0 = off; "
                                "needs the resident loader", within(0, 0.9))
    prune_epochs: int = opt(0, "epochs that leave easy examples out, from the 2nd on (the 1st has no losses yet; the "
                            "rest train on every image)", within(0, 10_000))
    test_flip: bool = opt(True, "flip TTA in every test pass: mean logits of each image and its mirror")
    # fast12 tests once, at the end, so translation TTA's 3x test pass is paid once (+0.29 pt over 20 runs).
    test_translate: int = opt(1, "translation TTA: also average copies shifted by this many pixels (reflect-"
                              "padded, up-left and down-right; each with its mirror when test_flip), weighted 1/2 "
                              "against the unshifted views (airbench's level 2); 0 = off", within(0, 4, " pixels"))


@dataclass(frozen=True)
class ModelConfig:
    widths: tuple[int, int, int, int] = opt((64, 128, 256, 512), "output channels of prep, layer1, layer2, "
                                            "layer3 (the spec: 64,128,256,512)",
                                            Check(lambda v: len(v) == 4 and min(v) >= 1 and max(v) <= 4096,
                                                  "must be 4 integers in [1, 4096]"))
    num_classes: int = opt(10, "classes of the linear head", Check(lambda v: v == 10, "must be 10 (CIFAR-10)"))
    # The spec's network has large initial logits; a scale < 1 (Page used 0.125) lets it take much larger LRs.
    logit_scale: float = opt(0.125, "multiply the logits by this constant (no parameters)",
                             within(0, 1000, open_low=True))
    bn_momentum: float = opt(0.1, "weight of each new batch in BatchNorm's running statistics",
                             within(0, 1, open_low=True))
    whiten_init: bool = opt(True, "prep conv filters from the 3x3 patch whitening of the training images (+/- "
                            "each of the 27 principal directions / sqrt(eigenvalue); the rest stay random)")
    whiten_frozen: bool = opt(True, "keep the whitened prep conv fixed in training (needs whiten_init)")
    bn_weight_frozen: bool = opt(True, "BatchNorm scales fixed at 1, only the biases trained (Page, airbench)")
    dirac_init: bool = opt(False, "partial-identity init of every conv after prep (first c_in outputs = identity)")
    ghost_batch: int = opt(0, "ghost batch norm: in training, each group of this many images is normalised by its "
                           "own statistics (Page: 32 of 512); 0 = the whole batch",
                           within(0, 50_000, " (0 = whole batch)"))


@dataclass(frozen=True)
class OptimConfig:
    momentum: float = opt(0.9, "SGD momentum", within(0, 1, open_high=True))
    nesterov: bool = opt(True, "Nesterov momentum")
    weight_decay: float = opt(5e-4, "L2 weight decay (Page's 5e-4; the seed's 0.005 at its 20x smaller LR)",
                              within(0, 1))
    # Page's and airbench's 0.2 at 24 epochs; 0.1 at 12 (docs/experiments.md, 2026-12-06: time to accuracy, round 2).
    label_smoothing: float = opt(0.1, "label smoothing of the cross-entropy", within(0, 1, open_high=True))
    bn_lr_scale: float = opt(64.0, "LR multiplier for the BatchNorm weights and biases",
                               within(0, 10_000, open_low=True))
    bn_weight_decay: bool = opt(True, "apply weight decay to the BatchNorm weights and biases too")
    # Page and airbench: 1/64 together with bn_lr_scale 64, so that LR x decay stays that of the other weights.
    bn_wd_scale: float = opt(1 / 64, "weight-decay multiplier for the BatchNorm weights and biases",
                              within(0, 10_000))
    optimizer: str = opt("sgd", "sgd, or muon: Muon for the conv filters (fastcifar/muon.py: Nesterov, filters at "
                         "a fixed norm, no decay) and SGD for the rest", one_of("sgd", "muon"))
    muon_lr: float = opt(0.24, "the filters' peak LR with --optim.optimizer muon (scheduled like max_lr)",
                           within(0, 100, open_low=True))
    muon_momentum: float = opt(0.6, "the filters' momentum with --optim.optimizer muon",
                               within(0, 1, open_high=True))
    lookahead_every: int = opt(0, "lookahead (airbench's): every N steps pull the weights back to a slow average "
                               "of weight 0.95**5 * progress**3; the slow weights are the final ones; 0 = off",
                               within(0, 1_000_000, " (0 = off)"))
    ema_decay: float = opt(0.0, "EMA of the weights and BN statistics per step, used by the test passes and the "
                           "saved models; 0 = off", within(0, 1, " (0 = off)", open_high=True))


@dataclass(frozen=True)
class ScheduleConfig:
    """One-cycle policy: linear min_lr -> max_lr until `peak_epoch`, then linear back to min_lr (or end_lr) at
    the end of the last epoch."""

    epochs: int = opt(12, "training epochs", within(1, 10_000))
    # Page's DAWNBench schedule (`fast`): linear up to 0.4 at epoch 5 of 24, then linear down to 0 (the logits scaled
    # by 1/8). fast12 keeps its shape (the peak at 5/24 of the run) at 1.5x the LR: at 12 epochs the higher LR paid
    # (docs/experiments.md, 2026-12-06), where half of it had cost 0.8 pt at 10.
    peak_epoch: float = opt(2.5, "epoch (fractional) at which the LR peaks")
    min_lr: float = opt(0.006, "LR at the start (and, with end_lr -1, the end)", within(1e-9, 1e6))
    max_lr: float = opt(0.6, "peak LR", within(1e-9, 1e6))
    end_lr: float = opt(0.0, "LR at the end of the last epoch; -1 = min_lr (the spec: no annihilation)")
    lr_from: str = opt("", "a find_lr.json whose suggestion sets min_lr/max_lr (recorded here when used)")


# The seed's LR finder (eva_pytorch_wrapper utils/misc.py lr_finder, config min_lr 0.001, max_lr 0.02, 10 epochs):
# LR = 0.001 + 0.0019 k for k = 0..9.
SEED_SWEEP = tuple(round(0.001 + 0.0019 * k, 6) for k in range(10))


@dataclass(frozen=True)
class LRFinderConfig:
    """LR range tests (python -m fastcifar.find_lr): see fastcifar/lr_finder.py for the suggestion rules."""

    method: str = opt("steps", "steps: Smith's range test, the LR rising every step of one run, scored by the "
                      "smoothed loss; epochs: the seed's, one epoch per LR of `sweep` from the same untrained "
                      "weights, scored by train accuracy", one_of("steps", "epochs"))
    start_lr: float = opt(1e-4, "steps: first LR of the range test", within(1e-9, 1e4))
    end_lr: float = opt(10.0, "steps: last LR of the range test", within(1e-9, 1e4))
    steps: int = opt(100, "steps: optimizer steps from start_lr to end_lr (fewer if the loss diverges)",
                     within(2, 100_000))
    mode: str = opt("exp", "steps: exp (geometric LR steps) or linear", one_of("exp", "linear"))
    smoothing: float = opt(0.95, "steps: EMA factor of the loss curve (0 = none)", within(0, 1, open_high=True))
    diverge_factor: float = opt(4.0, "steps: stop once the smoothed loss exceeds this multiple of the best",
                                within(1, 1e6, open_low=True))
    min_lr_divisor: float = opt(10.0, "suggested min_lr = suggested max_lr / this", within(1, 1e6))
    sweep: tuple[float, ...] = opt(SEED_SWEEP, "epochs: the LRs, one training epoch each (default: the seed's "
                                   "0.001 + 0.0019 k, k = 0..9)",
                                   Check(lambda v: len(v) <= 1000 and all(1e-9 <= lr <= 100 for lr in v),
                                         "values must be in [1e-09, 100], at most 1000 of them"))
    sweep_images: int = opt(0, "epochs: images per sweep epoch (0 = the whole training set)",
                              within(0, 50_000))
    sweep_weight_decay: float = opt(-1.0, "epochs: weight decay during the sweep (-1 = optim.weight_decay; the "
                                    "seed's finder: 0.05)", Check(lambda v: v == -1 or v >= 0, "must be -1 or >= 0"))


@dataclass(frozen=True)
class RunConfig:
    device: str = opt("auto", "auto, cpu, cuda or cuda:N", Check(lambda v: is_device(v), "must be auto, cpu, cuda "
                                                                   "or cuda:N"))
    # The auto settings below are measured on the machine at hand (fastcifar/calibrate.py, cached per machine).
    precision: str = opt("auto", "auto (the fastest of the numerically sound ones on this device, measured: bf16 "
                         "or fp16 under autocast with fp32 weights, or fp32), fp32, bf16 or fp16",
                         one_of("auto", "fp32", "bf16", "fp16"))
    channels_last: str = opt("auto", "NHWC memory layout (what oneDNN and cuDNN convolutions want): on, off, or auto "
                             "(measured); true/false read as on/off", one_of("auto", "on", "off"))
    compile: str = opt("auto", "torch.compile: auto (on for CUDA, off for CPU), on or off", one_of("auto", "on", "off"))
    compile_mode: str = opt("default", "torch.compile mode", one_of(*COMPILE_MODES))
    conv_grad: str = opt("auto", "filter gradient of the 3x3 convolutions at 4x4: im2col (one matmul, 3.7x "
                         "oneDNN's on an AMX Xeon in bf16; fastcifar/conv.py), onednn, or auto (measured on a CPU; "
                         "the library's on a GPU)", one_of("auto", "im2col", "onednn"))
    recalibrate: bool = opt(False, "measure the auto settings again instead of reading this machine's cached "
                            "measurement")
    seed: int = opt(0, "random seed (weights, data order, augmentation)", within(0, 2**32 - 1))
    deterministic: bool = opt(False, "torch.use_deterministic_algorithms (slower on CUDA)")
    threads: int = opt(0, "torch intra-op threads on a CPU (0 = all cores)", within(0, 1024, " (0 = all cores)"))
    out_dir: str = opt("runs", "folder of the run directories")
    name: str = opt("", "run directory name under out_dir ('' = time stamp + preset)",
                    Check(lambda v: "/" not in v and v not in (".", "..") and len(v) <= 200,
                          "must be a plain directory name of at most 200 characters"))
    overwrite: bool = opt(False, "allow reusing a run directory that holds a finished run")
    progress: str = opt("auto", "progress bar: auto (on a terminal only), on or off", one_of("auto", "on", "off"))
    summary: bool = opt(True, "print the network's layer table when the run starts (off where it was shown already, "
                        "e.g. a notebook's model cell)")
    sync_bn: bool = opt(False, "with torchrun on GPUs: BatchNorm statistics over the global batch")
    dist_timeout_s: float = opt(300.0, "how long ranks wait for each other, seconds",
                                  within(0, 86_400, open_low=True))
    # A test pass costs ~10% of a CPU epoch with flip TTA (~27% with translation TTA): a time-to-accuracy run
    # that only needs the final number skips the others, as fast12 does. Training is the same either way.
    test_every: int = opt(0, "test pass after every N-th epoch and after the last (0 = after the last only); the "
                          "epochs in between log no test numbers",
                          within(0, 10_000, " (0 = the last epoch only)"))
    checkpoint_every: int = opt(-1, "write RUN_DIR/checkpoint.pt every N epochs (0 = only at the end or on a "
                                "signal; -1 = auto: every epoch on a CPU, every 10 on a GPU)",
                                within(-1, 10_000))


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "lr_finder": LRFinderConfig,
    "run": RunConfig,
}


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    lr_finder: LRFinderConfig = field(default_factory=LRFinderConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = DEFAULT_PRESET

    @classmethod
    def from_preset(cls, name: str, overrides: Mapping[str, Any] | None = None, **keywords: Any) -> Config:
        """The named preset with overrides applied, validated: dotted keys in `overrides`
        (``{"optim.nesterov": True}``) and/or keywords (``epochs=10``, ``max_lr=0.2``: the short flags'
        names; any field as ``section__field``, e.g. ``optim__weight_decay=1e-3``)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return dataclasses.replace(Config(), preset=name).override(PRESETS[name]).override(overrides, **keywords)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config:
        """Inverse of to_dict; unknown sections or fields are an error, missing ones take defaults."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a config is a JSON object of sections (data, model, ...), got {type(d).__name__} "
                              f"{shown(d)}")
        if not isinstance(d.get("preset", DEFAULT_PRESET), str):
            raise ConfigError(f"the config's preset must be a string, got {shown(d['preset'])}")
        flat = {f"{s}.{k}": v for s, sec in d.items() if s != "preset" for k, v in _section(s, sec).items()}
        return Config(preset=d.get("preset", DEFAULT_PRESET)).override(flat)

    def override(self, updates: Mapping[str, Any] | None = None, **keywords: Any) -> Config:
        """A copy with dotted keys (``"optim.weight_decay"``) and/or keywords (see `from_preset`) set;
        strings are parsed to the field type."""
        sections = {name: getattr(self, name) for name in SECTIONS}
        merged = {**(updates or {}), **{keyword_key(k): v for k, v in keywords.items()}}
        for key, value in merged.items():
            value = _legacy(key, value)
            section, _, name = key.partition(".")
            hints = _field_types(section)
            if name not in hints:
                raise ConfigError(f"unknown option {key!r}; valid options: {', '.join(all_keys())}")
            sections[section] = dataclasses.replace(sections[section], **{name: _coerce(key, value, hints[name])})
        cfg = dataclasses.replace(self, **sections).validated()
        if merged.get("schedule.lr_from") and not {"schedule.min_lr", "schedule.max_lr"} & merged.keys():
            cfg = with_lr_from(cfg, cfg.schedule.lr_from)  # the LRs come from that range test
        return cfg

    def validated(self) -> Config:
        """This config, if every field meets its own rule (next to it, above) and the fields agree with each
        other (RELATIONS); else a ConfigError naming the first field that does not."""
        for section in SECTIONS:
            values = getattr(self, section)
            for f in dataclasses.fields(values):
                value, check = getattr(values, f.name), f.metadata.get("check")
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{section}.{f.name} must be a finite number, got {value!r}")
                if isinstance(value, str) and not _plain_text(value):
                    raise ConfigError(f"{section}.{f.name} must be printable text of at most {MAX_TEXT} characters "
                                      f"(no NUL or control characters), got {shown(value)}")
                if check is not None and not check.ok(value):
                    raise ConfigError(f"{section}.{f.name} {check.rule}, got {shown(value)}")
        for message in (relation(self) for relation in RELATIONS):
            if message:
                raise ConfigError(message)
        return self


# Rules between fields; each returns an error message, or "" when the config is fine.
RELATIONS = [
    lambda c: "" if 0 < c.schedule.peak_epoch <= c.schedule.epochs
    else f"schedule.peak_epoch must be in (0, epochs={c.schedule.epochs}], got {c.schedule.peak_epoch}",
    lambda c: "" if 0 < c.schedule.min_lr <= c.schedule.max_lr
    else f"need 0 < schedule.min_lr <= schedule.max_lr, got {c.schedule.min_lr} and {c.schedule.max_lr}",
    lambda c: "" if c.schedule.end_lr == -1 or 0 <= c.schedule.end_lr <= c.schedule.max_lr
    else f"schedule.end_lr must be -1 (= min_lr) or in [0, max_lr], got {c.schedule.end_lr}",
    lambda c: "" if not c.optim.nesterov or c.optim.momentum > 0 else "optim.nesterov needs optim.momentum > 0",
    lambda c: "" if c.lr_finder.start_lr < c.lr_finder.end_lr else "need lr_finder.start_lr < lr_finder.end_lr",
    lambda c: "" if c.data.low_res_epochs <= c.schedule.epochs
    else f"data.low_res_epochs must be at most schedule.epochs={c.schedule.epochs}, got {c.data.low_res_epochs}",
    lambda c: "" if c.data.prune_fraction == 0 or c.data.prune_epochs < c.schedule.epochs
    else f"data.prune_epochs must be below schedule.epochs={c.schedule.epochs} (the 1st epoch is full), got "
         f"{c.data.prune_epochs}",
    lambda c: "" if c.data.prune_fraction == 0 or c.data.loader != "ffcv"
    else "data.prune_fraction needs --data.loader resident or auto (FFCV reads whole betons: it cannot leave "
         "examples out)",
    lambda c: "" if c.model.whiten_init or not c.model.whiten_frozen
    else "model.whiten_frozen needs model.whiten_init true (it freezes the whitened prep conv)",
    lambda c: "" if not (c.model.ghost_batch and c.run.sync_bn)
    else "model.ghost_batch and run.sync_bn exclude each other (one splits the batch's statistics, one joins them)",
]


def shown(value: Any, limit: int = 60) -> str:
    """A value as an error message quotes it: its repr, cut to `limit` characters (a typo can be 400 digits)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 20]}...{text[-10:]} ({len(text)} characters)"


def _section(name: str, values: Any) -> Mapping[str, Any]:
    if name in SECTIONS and not isinstance(values, Mapping):
        raise ConfigError(f"config section {name!r} must be a JSON object of its fields, got {type(values).__name__} "
                          f"{shown(values)}")
    if name not in SECTIONS:
        raise ConfigError(f"unknown config section {name!r}; sections are: {', '.join(SECTIONS)}")
    return values


def _field_types(section: str) -> dict[str, Any]:
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r}; sections are: {', '.join(SECTIONS)}")
    return typing.get_type_hints(SECTIONS[section])


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def check_option(flag: str, key: str, value: Any) -> Any:
    """`value` read as the config field `key` and checked by its rule, for a command's own flag that sets the same
    thing (evaluate's --batch-size is data.test_batch_size): one type and range per quantity, whichever command
    takes it. A ConfigError names `flag`."""
    section, _, name = key.partition(".")
    try:
        typed = _coerce(key, value, _field_types(section)[name])
        Config().override({key: typed})
    except ConfigError as err:
        raise ConfigError(str(err).replace(key, flag, 1)) from None
    return typed


MAX_TEXT = 4096  # a path or a name: the longest path Linux takes


def _plain_text(value: str) -> bool:
    """Every string field is a name, a path, a mode or a URL: printable, of a sane length. A NUL would reach the OS
    (`ValueError: embedded null byte`), and a control character would garble the one-line errors that show it."""
    return len(value) <= MAX_TEXT and value.isprintable()


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


_JSON_TYPES = {bool: (bool,), int: (int, float), float: (int, float), str: (str,)}


def _legacy(key: str, value: Any) -> Any:
    """Values of earlier versions, read as today's: run.channels_last was a bool until 2026-12-07 (now on, off or
    auto), so the configs of earlier runs and the flag's true/false keep working."""
    if key == "run.channels_last":
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return "on" if value.strip().lower() in _TRUE else "off"
    return value


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Parse `value` into the field type `kind`: a string (from the CLI) is read as that type; any other value (from
    a config file or the API) must already be of it (an int for an int field, true/false for a bool, a list for a
    tuple...): a number where a name belongs, or true where a count belongs, is refused, not converted."""
    name = getattr(kind, "__name__", str(kind))
    if not isinstance(value, str):
        tuple_kind = typing.get_origin(kind) is tuple
        allowed = (list, tuple) if tuple_kind else _JSON_TYPES.get(kind, (object,))
        if not isinstance(value, allowed) or isinstance(value, bool) and kind is not bool:
            words = {bool: "true or false", str: "a string"}
            wanted = "a list" if tuple_kind else words.get(kind, f"a number ({name})")
            raise ConfigError(f"{key} must be {wanted}, got {type(value).__name__} {shown(value)}")
    try:
        if typing.get_origin(kind) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            (item_kind, *_) = typing.get_args(kind)
            return tuple(_coerce(key, v, item_kind) for v in items)
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key}: cannot read {shown(value)} as {name}") from None


# Short flags for the options people change most; each also exists as its dotted form.
SHORT_FLAGS: dict[str, str] = {
    "--epochs": "schedule.epochs",
    "--batch-size": "data.batch_size",
    "--max-lr": "schedule.max_lr",
    "--min-lr": "schedule.min_lr",
    "--lr-from": "schedule.lr_from",
    "--data-dir": "data.data_dir",
    "--workers": "data.num_workers",
    "--device": "run.device",
    "--precision": "run.precision",
    "--compile": "run.compile",
    "--seed": "run.seed",
    "--name": "run.name",
    "--out-dir": "run.out_dir",
}


def keyword_key(name: str) -> str:
    """A Python keyword for a config field -> its dotted key: a short flag's name (``batch_size``) or
    ``section__field``."""
    if "__" in name:
        return name.replace("__", ".", 1)
    short = SHORT_FLAGS.get("--" + name.replace("_", "-"))
    if short is None:
        names = ", ".join(flag[2:].replace("-", "_") for flag in SHORT_FLAGS)
        raise ConfigError(f"unknown keyword {name!r}; use one of {names}, or section__field (e.g. optim__nesterov)")
    return short


def read_config_file(path: str | Path, what: str = "config file") -> Config:
    """The Config in a JSON file (a run's config.json, or --config FILE), checked as a whole: one ConfigError line
    for a missing or unreadable file, bytes that are not UTF-8 JSON, JSON that is not an object of sections, or a
    field of the wrong type or out of its range."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
        data = json.loads(text)
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text (a JSON config was expected)") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{what} {path} is not JSON ({err.msg} at line {err.lineno})") from None
    try:
        return Config.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{what} {path}: {err}") from None


def with_lr_from(cfg: Config, path: str) -> Config:
    """`cfg` with min_lr/max_lr taken from the suggestion in a find_lr.json (and its path recorded)."""
    try:
        suggestion = json.loads(Path(path).read_text())["suggestion"]
        lrs = {"schedule.min_lr": float(suggestion["min_lr"]), "schedule.max_lr": float(suggestion["max_lr"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--lr-from {path}: not a find_lr.json with a suggestion ({err})") from None
    return cfg.override(lrs | {"schedule.lr_from": str(path)})
