import json
import subprocess
import sys

import pytest
import torch

from fastcifar.augment import BatchAugment
from fastcifar.config import Config
from fastcifar.custom_resnet import CustomResNet
from fastcifar.errors import FastCifarError
from fastcifar.evaluation import evaluate_checkpoint
from fastcifar.reporting import load_history
from fastcifar.runtime import resolve_precision
from fastcifar.schedule import make_scheduler
from fastcifar.session import parameter_groups
from fastcifar.training import EpochTable, is_test_epoch, main, time_to, train
from tests.conftest import LEVERS, TINY, tiny_cli_args, tiny_config


def test_training_lowers_the_loss_and_learns(tiny_run):
    losses = [m["train_loss"] for m in tiny_run.metrics]
    assert losses[-1] < 0.5 * losses[0], losses
    assert tiny_run.metrics[-1]["test_acc"] > 0.5  # 10 colour classes; chance is 0.1
    assert all(m["train_img_s"] > 0 and m["epoch_s"] > 0 for m in tiny_run.metrics)


def test_run_directory_holds_config_metrics_env_results_and_checkpoint(tiny_run):
    run_dir = tiny_run.run_dir
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert Config.from_dict(json.loads((run_dir / "config.json").read_text())) == tiny_run.config
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["final_test_acc"] == tiny_run.metrics[-1]["test_acc"] and results["epochs"] == 3
    ckpt = torch.load(run_dir / "model.pt", weights_only=True)
    model = CustomResNet(tiny_run.config.model)
    model.load_state_dict(ckpt["model"])
    assert Config.from_dict(ckpt["config"]) == tiny_run.config
    for name, tensor in tiny_run.model.state_dict().items():
        assert torch.equal(tensor.cpu(), model.state_dict()[name])


def test_lr_column_follows_the_one_cycle(tiny_run):
    lrs = [m["lr"] for m in tiny_run.metrics]
    assert lrs[0] == pytest.approx(0.005) and lrs[1] == pytest.approx(0.05)  # peak at the end of epoch 1
    assert lrs[1] > lrs[2] > 0.005


def test_finished_run_is_not_overwritten_without_permission(tiny_run, synthetic):
    cfg = tiny_config(synthetic, tiny_run.run_dir.parent)
    with pytest.raises(FastCifarError, match="already holds a finished run.*--overwrite"):
        train(cfg, log=lambda _: None)
    assert (tiny_run.run_dir / "results.json").exists()


def test_same_seed_same_metrics(synthetic, tmp_path):
    overrides = {"schedule.epochs": 1, "schedule.peak_epoch": 1, "run.deterministic": True}
    a = train(tiny_config(synthetic, tmp_path, **overrides, **{"run.name": "a"}), log=lambda _: None)
    b = train(tiny_config(synthetic, tmp_path, **overrides, **{"run.name": "b"}), log=lambda _: None)
    keys = ("train_loss", "train_acc", "test_loss", "test_acc")
    assert [a.metrics[0][k] for k in keys] == [b.metrics[0][k] for k in keys]
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, b.model.state_dict()[name]), name


def test_unwritable_output_directory_is_refused_before_training(synthetic, tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file where the run directory's parent should be")
    assert main(tiny_cli_args(synthetic, tmp_path / "blocker", **{"run.name": "x"})) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "blocker is a file, not a folder; choose another --out-dir" in err
    assert err.count("\n") == 1
    assert (tmp_path / "blocker").read_text().startswith("a file")


def test_bf16_channels_last_path_runs(synthetic, tmp_path):
    # bf16 convolutions are very slow on CPUs without bf16 kernels: keep this run small
    result = train(tiny_config(synthetic, tmp_path, **{"schedule.epochs": 1, "schedule.peak_epoch": 1,
                                                       "data.train_subset": 128, "data.test_subset": 64,
                                                       "run.precision": "bf16"}), log=lambda _: None)
    assert result.metrics[0]["train_loss"] == pytest.approx(result.metrics[0]["train_loss"])  # not NaN
    assert result.summary["parameters"] == sum(p.numel() for p in result.model.parameters())


@pytest.mark.parametrize("shown", [True, False])
def test_the_layer_table_is_printed_once_at_the_start_unless_switched_off(synthetic, tmp_path, shown):
    lines = []
    train(tiny_config(synthetic, tmp_path, **{"schedule.epochs": 1, "schedule.peak_epoch": 1, "data.train_subset": 64,
                                              "data.test_subset": 64, "run.summary": shown}), log=lines.append)
    assert sum("Param #" in line for line in lines) == int(shown)
    assert any(line.startswith("run dir ") for line in lines)  # the start line stays either way


@pytest.mark.slow
def test_compiled_training_matches_shapes_and_learns(synthetic, tmp_path):
    # 960 = 15 x 64 training images: one training graph to compile (~20 s each with an empty inductor cache on a
    # 2-core CPU); the 200 test images still end in a partial batch, so the warm-up compiles two eval shapes
    result = train(tiny_config(synthetic, tmp_path, **{"schedule.epochs": 2, "run.compile": "on",
                                                       "data.train_subset": 960}), log=lambda _: None)
    assert result.summary["compile_seconds"] > 0
    assert result.metrics[-1]["train_loss"] < result.metrics[0]["train_loss"]


def test_fp16_is_refused_on_cpu():
    with pytest.raises(FastCifarError, match="fp16 is for CUDA"):
        resolve_precision("fp16", torch.device("cpu"))


def test_epoch_table_aligns_header_and_rows():
    table = EpochTable()
    row = table.row({"epoch": 3, "lr": 0.1, "train_loss": 1.2, "train_acc": 0.5, "test_loss": 1.1, "test_acc": 0.6,
                     "epoch_s": 12.3, "train_img_s": 150.2})
    assert len(row) == len(table.header()) and "50.00%" in row


def test_epoch_table_shows_an_untested_epoch_as_dashes():
    table = EpochTable()
    row = table.row({"epoch": 3, "lr": 0.1, "train_loss": 1.2, "train_acc": 0.5, "test_loss": None, "test_acc": None,
                     "epoch_s": 12.3, "train_img_s": 150.2})
    assert len(row) == len(table.header()) and row.split()[4:6] == ["-", "-"]


@pytest.mark.parametrize(("every", "tested"), [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (0, [5]), (7, [5])])
def test_test_every_tests_every_nth_epoch_and_always_the_last(every, tested):
    assert [ep for ep in range(1, 6) if is_test_epoch(ep, 5, every)] == tested


def test_skipping_test_passes_leaves_training_alone(synthetic, tmp_path):
    overrides = {"schedule.epochs": 3, "run.deterministic": True, "data.test_flip": True}
    every = train(tiny_config(synthetic, tmp_path, **overrides, **{"run.name": "every"}), log=lambda _: None)
    lines = []
    last = train(tiny_config(synthetic, tmp_path, **overrides, **{"run.name": "last", "run.test_every": 0}),
                 log=lines.append)
    assert any("tested after the last epoch only" in line for line in lines)
    assert [m["train_loss"] for m in last.metrics] == [m["train_loss"] for m in every.metrics]
    assert [m["test_acc"] for m in last.metrics][:2] == [None, None] and last.metrics[0]["test_s"] == 0.0
    assert last.metrics[0]["epoch_s"] == last.metrics[0]["train_s"]
    assert last.metrics[-1]["test_acc"] == every.metrics[-1]["test_acc"]
    for name, tensor in every.model.state_dict().items():
        assert torch.equal(tensor, last.model.state_dict()[name]), name
    results = json.loads((last.run_dir / "results.json").read_text())
    assert results["best_test_acc"] == results["final_test_acc"] == every.metrics[-1]["test_acc"]
    assert results["time_to_test_acc"]["0.90"]["epoch"] in (None, 3)  # only epoch 3 can be the first
    assert (last.run_dir / "curves.png").exists() and (last.run_dir / "best.pt").exists()
    assert [m["test_acc"] for m in load_history(last.run_dir)[1]][:2] == [None, None]  # compare reads it


def test_cli_errors_are_one_line_with_exit_2(capsys, tmp_path):
    assert main(["--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: schedule.epochs must be in [1, 10000], got 0\n"
    assert main(["--preset", "smoke", "--data-dir", str(tmp_path)]) == 1
    assert "missing" in capsys.readouterr().err


def test_cli_runs_end_to_end_as_a_module(synthetic, tmp_path):
    # the command's default preset, with TINY's settings on top
    args = tiny_cli_args(synthetic, tmp_path, preset=None, **{"run.name": "cli", "schedule.epochs": 1,
                                                               "schedule.peak_epoch": 1, "data.test_flip": True})
    proc = subprocess.run([sys.executable, "-m", "fastcifar.train", *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Total params" in proc.stdout and "train_img_s" in proc.stdout
    # a number measured with TTA says so where the run starts and where it ends (the default: flip and translation)
    method = "flip TTA, +-1 px translation TTA"
    assert f"| test accuracy with {method}" in proc.stdout and f"final test accuracy with {method} " in proc.stdout
    assert (tmp_path / "cli" / "model.pt").is_file()


def test_a_run_with_every_lever_learns_and_reports_the_ema_weights_with_flip_tta(lever_run, synthetic):
    assert lever_run.metrics[-1]["test_acc"] > 0.5
    saved = torch.load(lever_run.run_dir / "model.pt", weights_only=True)["model"]
    raw = torch.load(lever_run.run_dir / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in raw["ema"]["module"].items())  # model.pt holds the average,
    assert any(not torch.equal(saved[k], v) for k, v in raw["model"].items())  # not the last SGD weights,
    assert all(torch.equal(saved[k], v.cpu()) for k, v in lever_run.model.state_dict().items())  # as the API
    # the reported accuracy is that of the averaged weights with flip TTA (same batches as in training)
    preds = evaluate_checkpoint(lever_run.run_dir / "model.pt", tta=True, data_dir=synthetic["data_dir"],
                                batch_size=TINY["data.test_batch_size"], num_workers=1,
                                translate=LEVERS["data.test_translate"])
    assert preds.accuracy == lever_run.metrics[-1]["test_acc"]
    without = evaluate_checkpoint(lever_run.run_dir / "model.pt", data_dir=synthetic["data_dir"], num_workers=1)
    assert without.probs.shape == preds.probs.shape and not (without.probs == preds.probs).all()


def test_low_res_epochs_are_recorded_with_the_work_they_saved(lever_run):
    """Progressive resizing (in LEVERS: the first of 3 epochs at 24x24): each row names its image side, and the
    results count the images trained and their 32x32 equivalent (a 24x24 image weighs 24^2 / 32^2)."""
    assert [row["train_side"] for row in lever_run.metrics] == [24, 32, 32]
    images = lever_run.summary["train_images"]
    assert images == 3 * 1000  # every synthetic training image in each of the 3 epochs
    assert lever_run.summary["train_images_32px"] == round(1000 * 24 ** 2 / 32 ** 2 + 2 * 1000)


def test_the_training_augmentation_is_the_data_configs():
    """No copy of the settings: the session's augmentation reads the data config itself."""
    data = Config.from_preset("fast", {"data.flip_mode": "alternate", "data.cutout_size": 5, "data.crop_padding": 2,
                                       "data.flip": False}).data
    assert BatchAugment(data, torch.device("cpu"), 0, torch.float32).settings is data


ONE_EPOCH = {"schedule.epochs": 1, "schedule.peak_epoch": 1}


@pytest.fixture(scope="module")
def one_epoch_run(synthetic, tmp_path_factory):
    return train(tiny_config(synthetic, tmp_path_factory.mktemp("one"), **ONE_EPOCH), log=lambda _: None)


# Each lever alone, against a run without it (the baseline: one_epoch_run, or the given overrides).
_ALONE = ["optim.ema_decay", "data.flip_mode", "data.test_flip", "optim.bn_lr_scale", "optim.bn_weight_decay",
          "model.whiten_init", "model.bn_momentum", "model.bn_weight_frozen", "model.dirac_init",
          "optim.lookahead_every", "data.test_translate", "optim.optimizer", "model.ghost_batch"]
_WITH_BASE = [({"model.whiten_init": True, "model.whiten_frozen": True}, {"model.whiten_init": True}),
              ({"optim.bn_lr_scale": 4.0, "optim.bn_wd_scale": 0.5}, {"optim.bn_lr_scale": 4.0}),
              ({"optim.optimizer": "muon", "optim.muon_lr": 0.1}, {"optim.optimizer": "muon"}),
              ({"data.low_res_size": 24, "data.low_res_epochs": 1}, None),
              ({"data.low_res_size": 24, "data.low_res_epochs": 1, "data.low_res_mode": "scale"},
               {"data.low_res_size": 24, "data.low_res_epochs": 1})]


@pytest.mark.parametrize(("lever", "base"), [({k: LEVERS[k]}, None) for k in _ALONE] + _WITH_BASE,
                         ids=_ALONE + ["whiten_frozen", "bn_wd_scale", "muon_lr", "low_res", "low_res_mode"])
def test_each_lever_reaches_the_run(lever, base, one_epoch_run, synthetic, tmp_path):
    """Same seed, one lever changed: the numbers change (training, or the test pass for the test-time levers)."""
    run = train(tiny_config(synthetic, tmp_path, **ONE_EPOCH, **lever), log=lambda _: None)
    if base is None:
        reference = one_epoch_run
    else:
        reference = train(tiny_config(synthetic, tmp_path, **ONE_EPOCH, **base, **{"run.name": "base"}),
                          log=lambda _: None)
    keys = ("train_loss", "test_loss")
    assert [run.metrics[0][k] for k in keys] != [reference.metrics[0][k] for k in keys]


def test_batch_norm_parameters_get_their_own_lr_scale_and_no_weight_decay():
    model = CustomResNet(Config().model)
    groups = parameter_groups(model, 4.0, False, 5e-4)
    assert len(groups) == 2 and len(groups[1]["params"]) == 16  # 8 BN layers x (weight, bias)
    assert sum(p.numel() for g in groups for p in g["params"]) == 6_573_120
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler = make_scheduler(optimizer, 10, 3, 1.0, 0.01, 0.1)
    for _ in range(15):
        main_lr, bn_lr = (g["lr"] for g in optimizer.param_groups)
        assert bn_lr == pytest.approx(4 * main_lr)
        optimizer.step()
        scheduler.step()
    assert len(parameter_groups(model, 1.0, True, 5e-4)) == 1  # the default keeps one group


def test_time_to_a_test_accuracy():
    metrics = [{"epoch": e, "test_acc": a, "epoch_s": 10.0} for e, a in [(1, 0.8), (2, 0.91), (3, 0.9)]]
    assert time_to(metrics, 0.91) == (2, 20.0) and time_to(metrics, 0.8, 5.0) == (1, 15.0)
    assert time_to(metrics, 0.95) == (None, None)
    untested = [{"epoch": 1, "test_acc": None, "epoch_s": 10.0}, *metrics[1:]]  # run.test_every skipped epoch 1
    assert time_to(untested, 0.8) == (2, 20.0)


def test_results_record_the_time_to_each_accuracy_mark(tiny_run):
    results = json.loads((tiny_run.run_dir / "results.json").read_text())
    marks = results["time_to_test_acc"]
    assert set(marks) == {"0.90", "0.91", "0.92", "0.93", "0.94"}
    assert results["setup_seconds"] > 0  # the time before epoch 1 counts: set-up and warm-up
    for mark, reached in marks.items():
        epoch, seconds = time_to(tiny_run.metrics, float(mark), results["compile_seconds"] + results["setup_seconds"])
        assert reached == {"epoch": epoch, "seconds": seconds}


@pytest.mark.slow
def test_without_ffcv_the_data_step_and_a_training_run_work_end_to_end(synthetic, tmp_path):
    """FFCV made unimportable: the data step writes the arrays (saying betons need FFCV), and training picks the
    resident loader."""
    data_dir = tmp_path / "data"
    args = tiny_cli_args({"data_dir": data_dir}, tmp_path, **ONE_EPOCH)
    code = (
        "import sys; sys.modules['ffcv'] = None\n"
        "from fastcifar.prepare import main as prepare\n"
        f"assert prepare(['--archive', {str(synthetic['archive'])!r}, '--data-dir', {str(data_dir)!r}, "
        "'--expect-counts', 'any']) == 0\n"
        "from fastcifar.training import main as train\n"
        f"sys.exit(train({args!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "betons not written: FFCV is not installed" in proc.stdout
    assert sorted(p.name for p in data_dir.iterdir()) == ["betons.json", "test.npz", "train.npz"]
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert (tmp_path / "run" / "results.json").is_file() and env["loader"] == "resident"


def test_a_batch_that_cannot_fit_is_refused_before_the_data_is_read(synthetic, tmp_path, monkeypatch, capsys):
    """README: a step that cannot fit in memory is one line at the start, before the data (here: a missing folder,
    which would otherwise be the first error) and before any output folder."""
    monkeypatch.setattr("fastcifar.runtime.available_memory", lambda device: 10**9)  # 1 GB free
    args = tiny_cli_args(synthetic, tmp_path, **{"data.data_dir": str(tmp_path / "no-data"),
                                                  "model.widths": "64,128,256,512", "data.batch_size": "512"})
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: a training step of 512 images needs about 2 GB, and cpu has 1 GB free")
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []  # no run folder either


@pytest.mark.parametrize(("free", "refused"), [(10**12, False), (2 * 10**9, True), (None, False)])
def test_the_memory_check_scales_with_the_batch_and_the_widths(monkeypatch, free, refused):
    from fastcifar import runtime

    monkeypatch.setattr(runtime, "available_memory", lambda device: free)
    cpu = torch.device("cpu")
    runtime.check_step_memory(512, (4, 8, 8, 16), cpu)  # a narrow network's step fits in 2 GB
    if refused:
        with pytest.raises(FastCifarError, match="use a smaller --batch-size"):
            runtime.check_step_memory(512, (64, 128, 256, 512), cpu)  # ~2.4 GB
    else:
        runtime.check_step_memory(512, (64, 128, 256, 512), cpu)  # unknown free memory: no refusal on a guess


@pytest.mark.parametrize(("free", "refused"), [(10**12, False), (5 * 10**9, True), (None, False)])
def test_the_test_batch_memory_check_scales_with_the_batch_and_the_widths(monkeypatch, free, refused):
    from fastcifar import runtime

    monkeypatch.setattr(runtime, "available_memory", lambda device: free)
    cpu = torch.device("cpu")
    runtime.check_test_memory(10_000, (4, 8, 8, 16), cpu)  # a narrow network's 10,000 images: ~0.4 GB
    runtime.check_test_memory(1000, (64, 128, 256, 512), cpu)  # the default test batch: ~1.2 GB
    if refused:
        with pytest.raises(FastCifarError, match="a test batch of 10,000 images needs about 12 GB.*--batch-size"):
            runtime.check_test_memory(10_000, (64, 128, 256, 512), cpu, "--batch-size")
    else:
        runtime.check_test_memory(10_000, (64, 128, 256, 512), cpu, "--batch-size")


def test_evaluate_refuses_a_test_batch_that_cannot_fit_before_the_data(tiny_run, monkeypatch, capsys):
    from fastcifar import evaluation, runtime

    monkeypatch.setattr(runtime, "available_memory", lambda device: 10**6)  # 1 MB free
    monkeypatch.setattr(evaluation, "open_split", lambda *a, **k: pytest.fail("the data was read"))
    assert evaluation.main(["--checkpoint", str(tiny_run.run_dir / "model.pt"), "--batch-size", "5000"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: a test batch of 5,000 images needs about") and err.count("\n") == 1
