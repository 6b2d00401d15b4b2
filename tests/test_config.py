"""Training configuration: options in, a validated config and the user's overrides out; bad values refused in one line."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcamtool import config
from pcamtool.cli import cli
from pcamtool.config import AugmentConfig, TrainConfig, max_threads, option_flags
from pcamtool.errors import ModelError, PcamError

from helpers import write_kaggle


def test_options_become_a_config_and_the_overrides_the_user_gave(tmp_path: Path):
    cfg, overrides = TrainConfig.from_options(
        store=tmp_path / "s.h5", out=tmp_path / "run", arch="simple", model_kwargs={"width": 8}, lr=0.01,
        epochs=None, seed=None, compile_=True, export_=None, flip=False, color_strength=2.0, hed_sigma=0.1)
    base = AugmentConfig()
    assert cfg.store == str(tmp_path / "s.h5") and cfg.out == str(tmp_path / "run")  # paths become text
    assert cfg.arch == "simple" and cfg.model_kwargs == {"width": 8} and cfg.lr == 0.01 and cfg.compile
    assert cfg.epochs is None and cfg.seed == 0 and not cfg.export  # not given: the defaults
    assert cfg.augment == AugmentConfig(flip=False, hed_sigma=0.1, brightness=2 * base.brightness,
                                        contrast=2 * base.contrast, saturation=2 * base.saturation,
                                        hue=2 * base.hue)
    assert overrides == {
        "store": str(tmp_path / "s.h5"), "out": str(tmp_path / "run"), "arch": "simple",
        "model_kwargs": {"width": 8}, "lr": 0.01, "compile": True,
        "augment": {"brightness": 2 * base.brightness, "contrast": 2 * base.contrast,
                    "saturation": 2 * base.saturation, "hue": 2 * base.hue, "flip": False, "hed_sigma": 0.1}}
    assert option_flags(overrides) == ["STORE", "--output", "--arch", "--model-arg", "--lr", "--compile",
                                       "--color-strength", "--flip", "--hed-sigma"]
    # the config.json round trip keeps every value
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_nothing_given_is_the_default_config():
    cfg, overrides = TrainConfig.from_options(store=None, epochs=None, model_kwargs={}, compile_=None)
    assert cfg == TrainConfig() and overrides == {}
    assert option_flags({"warmup_frac": 0.1, "epochs": 3, "patience": 2}) == ["--warmup", "--epochs", "--patience"]


def test_max_train_beside_a_validation_store_is_accepted(tmp_path: Path):
    cfg, overrides = TrainConfig.from_options(store="a.h5", val_store=tmp_path / "v.h5", max_train=5)
    assert cfg.val_store == str(tmp_path / "v.h5") and cfg.max_train == 5
    assert set(overrides) == {"store", "val_store", "max_train"}


@pytest.mark.parametrize("opts, says", [
    ({"fold": 1}, r"^--fold 1 needs --folds \(the number of folds\)$"),
    ({"fold": 0}, r"^--fold 0 needs --folds"),               # given explicitly, even as the default
    ({"folds": 3, "fold": 3}, r"^--fold 3 is not one of the 3 folds \(0 to 2\)$"),
    ({"folds": 1}, r"^--folds must be at least 2, got 1$"),
    ({"val_frac": 0.0}, r"^--val-frac must be between 0 and 1 \(both excluded\), got 0.0$"),
    ({"val_frac": 1.0}, "--val-frac must be between 0 and 1"),
    ({"val_frac": -0.2}, "--val-frac must be between 0 and 1"),
    ({"lr": float("inf")}, r"^--lr must be a finite positive number, got inf$"),
    ({"lr": float("nan")}, "--lr must be a finite positive number, got nan"),
    ({"lr": -1e-3}, "--lr must be a finite positive number"),
    ({"lr": "fast"}, r"^--lr must be a number, got 'fast'$"),
    ({"weight_decay": float("inf")}, "--weight-decay must be a finite number"),
    ({"batch_size": 2.5}, r"^--batch-size must be a whole number, got 2.5$"),
    ({"threads": 100000}, r"^--threads must be between 1 and \d+ \(4 per core this process may use\), got 100000$"),
    ({"threads": 0}, "--threads must be between 1 and"),
    ({"color_strength": 10.0}, r"^--color-strength must be >= 0 and below 10, got 10.0$"),
    ({"color_strength": -1.0}, "--color-strength must be >= 0"),
    ({"val_store": "v.h5", "folds": 5}, r"^--val-store replaces the train/validation split: --folds would have"),
    ({"val_store": "v.h5", "val_frac": 0.1}, "--val-frac would have no effect"),
    ({"arch": "resnet9000"}, r"^unknown model 'resnet9000' \(known: pcamnet, plain4, simple\)$"),
    ({"model_kwargs": {"widht": 8}}, r"^model 'plain4' takes no argument\(s\) widht \(it takes: width, "),
    ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
    ({"learning_rate": 0.1}, r"^unknown training option\(s\): learning_rate$"),
])
def test_bad_options_are_one_line(opts, says):
    with pytest.raises(PcamError, match=says) as err:
        TrainConfig.from_options(**opts)
    assert "\n" not in str(err.value)


def test_the_constructor_holds_the_same_rules():
    for bad, says in [({"fold": 2}, "needs --folds"), ({"folds": 4, "fold": 7}, "not one of the 4 folds"),
                      ({"threads": max_threads() + 1}, "--threads must be between"),
                      ({"groups": "no/such/groups.csv"}, r"--groups no/such/groups.csv: file not found"),
                      ({"model_kwargs": {"width": 0}}, "width must be a positive integer"),
                      ({"augment": {"flip": False}}, "--augment must be an AugmentConfig")]:
        with pytest.raises(PcamError, match=says):
            TrainConfig(**bad)
    assert issubclass(ModelError, PcamError)
    assert TrainConfig(folds=4, fold=3).fold == 3 and TrainConfig(threads=max_threads()).threads == max_threads()


def test_thread_bound_follows_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(config, "cpu_threads", lambda: 3)
    assert max_threads() == 12
    assert TrainConfig(threads=12).threads == 12
    with pytest.raises(PcamError, match="between 1 and 12 "):
        TrainConfig(threads=13)


def test_from_dict_names_the_file_and_ignores_unknown_keys(tmp_path: Path):
    d = {**TrainConfig(epochs=3).to_dict(), "resolved": {"device": "cpu"}, "from_a_newer_version": 1}
    assert TrainConfig.from_dict(d) == TrainConfig(epochs=3)
    src = tmp_path / "run" / "config.json"
    for bad, says in [({**d, "lr": "abc"}, "--lr must be a number, got 'abc'"),
                      ({**d, "epochs": 0}, "--epochs must be at least 1"),
                      ({**d, "augment": {"flip": "yes"}}, "augment.flip must be true or false"),
                      ({**d, "augment": [1]}, "not a training configuration"),
                      ([1, 2], "not a training configuration")]:
        with pytest.raises(PcamError, match=f"^{src}: {says}") as err:
            TrainConfig.from_dict(bad, source=src)  # type: ignore[arg-type]
        assert "\n" not in str(err.value)


# --------------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("args, says", [
    (["--fold", "1"], "--fold 1 needs --folds"),
    (["--folds", "3", "--fold", "3"], "--fold 3 is not one of the 3 folds"),
    (["--threads", "100000"], "--threads must be between 1 and"),
    (["--val-frac", "1.5"], "--val-frac must be between 0 and 1"),
    (["--lr", "inf"], "--lr must be a finite positive number, got inf"),
    (["--lr", "nan"], "--lr must be a finite positive number, got nan"),
    (["--groups", "missing.csv"], "--groups missing.csv: file not found"),
    (["--model-arg", "widht=3"], "takes no argument(s) widht (it takes: width, blocks, dropout, centre_pool)"),
    (["--model-arg", "centre_pool=False"], "centre_pool must be true or false, got 'False'"),
    (["--arch", "resnet9000"], "unknown model 'resnet9000'"),
    (["--color-strength", "12"], "--color-strength must be >= 0 and below 10"),
])
def test_cli_refuses_in_one_line_and_writes_nothing(tmp_path: Path, monkeypatch, args, says):
    monkeypatch.chdir(tmp_path)  # a default run folder would appear under runs/ here
    r = CliRunner().invoke(cli, ["train", "train.h5", "-o", "run", *args])
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit)  # no traceback: a clean exit
    assert r.stdout == "" and r.stderr.strip().splitlines() == [f"Error: {r.stderr.strip()[7:]}"]
    assert says in r.stderr
    assert os.listdir(tmp_path) == []


def test_cli_train_makes_one_library_call_with_the_config(tmp_path: Path, monkeypatch):
    import pcamtool.train.loop as loop

    calls = []

    class Result:
        run_dir, best_auc, best_epoch, seconds = tmp_path / "run", 0.9, 3, 1.0

    def fake_fit(cfg, **kw):
        calls.append((cfg, kw))
        return Result()

    monkeypatch.setattr(loop, "fit", fake_fit)
    r = CliRunner().invoke(cli, ["-q", "train", str(tmp_path / "s.h5"), "-o", str(tmp_path / "run"),
                                 "--max-train", "5", "--val-store", str(tmp_path / "v.h5"), "--no-flip",
                                 "--model-arg", "width=8", "--model-arg", "depths=[2,1]", "--arch", "pcamnet",
                                 "--export", "--resume", str(tmp_path / "old")])
    assert r.exit_code == 0, r.output
    [(cfg, kw)] = calls
    assert cfg == TrainConfig(store=str(tmp_path / "s.h5"), out=str(tmp_path / "run"), max_train=5,
                              val_store=str(tmp_path / "v.h5"), arch="pcamnet",
                              model_kwargs={"width": 8, "depths": [2, 1]}, export=True,
                              augment=AugmentConfig(flip=False))
    assert kw["resume"] == tmp_path / "old" and kw["progress"] is False
    assert sorted(option_flags(kw["overrides"])) == ["--arch", "--export", "--flip", "--max-train", "--model-arg",
                                                     "--output", "--val-store", "STORE"]


def test_max_train_with_a_validation_store_trains(tmp_path: Path):
    """The pairing the split options are refused with is fine with --max-train."""
    from pcamtool import pack
    from pcamtool.train.loop import fit

    write_kaggle(tmp_path / "a", n=24, seed=1)
    write_kaggle(tmp_path / "b", n=10, seed=2)
    train_h5 = pack(tmp_path / "a" / "train", progress=False).path
    val_h5 = pack(tmp_path / "b" / "train", progress=False).path
    cfg, _ = TrainConfig.from_options(store=train_h5, val_store=val_h5, max_train=8, out=tmp_path / "run",
                                      arch="simple", model_kwargs={"width": 4, "hidden": 8}, epochs=1,
                                      batch_size=4, device="cpu", threads=1, seed=0)
    fit(cfg, progress=False)
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert (resolved["train_rows"], resolved["val_rows"]) == (8, 10)
