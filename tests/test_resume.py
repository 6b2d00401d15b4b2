"""The resume policy and the training state (pcamtool.train.resume), without training a run.

What may change on resume, what identifies a run, and that ``training_state``
followed by ``restore`` puts every part (weights, EMA, optimizer, schedule,
scaler, sampler, generators) back exactly, so the next step matches the one
an uninterrupted run takes.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pcamtool.config import AugmentConfig, TrainConfig
from pcamtool.contract import Classifier
from pcamtool.device import Precision
from pcamtool.errors import PcamError
from pcamtool.models import create_model
from pcamtool.stain import StainReference
from pcamtool.train.checkpoint import Checkpoint
from pcamtool.train.data import Batch, BatchLoader, RowSource
from pcamtool.train.loop import create_trainer, train_step
from pcamtool.train.resume import (MACHINE, RESUMABLE, check_changes, given_options, restore, resume_config,
                                   training_state)

from helpers import write_store
from test_data import FakeStore

CPU = torch.device("cpu")
FP32 = Precision("cpu", None, False, "fp32: test")
RUN = Path("runs/x")


# ------------------------------------------------------------------ the policy


def test_what_may_change_on_resume():
    assert set(MACHINE) == {"device", "threads", "cache", "compile", "tensorboard"}
    assert set(RESUMABLE) == set(MACHINE) | {"epochs", "patience", "export"}
    for learnt in ("lr", "batch_size", "seed", "arch", "optimizer", "schedule", "label_smoothing", "ema", "augment"):
        assert learnt not in RESUMABLE


def test_allowed_changes_are_returned_and_unchanged_options_dropped():
    run = TrainConfig(epochs=4, device="cpu", threads=1)
    got = check_changes(run, {"epochs": 8, "device": "cpu", "threads": 2, "lr": run.lr}, RUN)
    assert got == {"epochs": 8, "threads": 2}
    assert check_changes(run, {}, RUN) == {}
    # the run's own folder given as -o, and paths spelt another way, are no change
    assert check_changes(run, {"out": str(RUN), "store": "./" + run.store}, RUN) == {}
    assert check_changes(run, {"out": None}, RUN) == {}
    assert check_changes(run, {"augment": {"flip": run.augment.flip}}, RUN) == {}


def test_refused_changes_name_the_option_and_the_run_value():
    run = TrainConfig(lr=2e-3, epochs=4)
    with pytest.raises(PcamError) as e:
        check_changes(run, {"lr": 1e-3, "epochs": 8}, RUN)
    msg = str(e.value)
    assert msg.startswith("--resume: cannot change --lr on resume (the run was trained with --lr 0.002); only ")
    assert "--epochs" in msg and "start a new run with another -o instead" in msg and "\n" not in msg
    with pytest.raises(PcamError, match=r"cannot change --color-strength on resume \(the run was trained with "
                                        r"--color-strength 0.02\)"):
        check_changes(run, {"augment": {"hue": 0.1}}, RUN)
    with pytest.raises(PcamError, match=r"cannot change --out"):
        check_changes(run, {"out": "elsewhere"}, RUN)
    with pytest.raises(PcamError, match=r"cannot change STORE on resume \(the run was trained with STORE data/train.h5\)"):
        check_changes(run, {"store": "other.h5"}, RUN)
    with pytest.raises(PcamError, match=r"cannot change --no-such-option"):
        check_changes(run, {"no_such_option": 1}, RUN, allowed=RESUMABLE + ("no_such_option",))


def test_cv_allows_only_the_machine_options():
    run = TrainConfig(epochs=4)
    assert check_changes(run, {"cache": "ram"}, RUN, allowed=MACHINE, what="cv") == {"cache": "ram"}
    with pytest.raises(PcamError, match=r"^cv: cannot change --epochs on resume .* only --device, --threads"):
        check_changes(run, {"epochs": 9}, RUN, allowed=MACHINE, what="cv")


def test_given_options_are_the_fields_a_library_caller_set_differently():
    run = TrainConfig(epochs=4, lr=2e-3)
    mine = TrainConfig(epochs=6, lr=2e-3, augment=AugmentConfig(hue=0.05))
    assert given_options(mine, run) == {"epochs": 6, "augment": {"hue": 0.05}}
    assert given_options(run, run) == {}
    assert given_options(TrainConfig(epochs=None), run) == {}   # unset counts as not given


def test_a_library_callers_defaults_do_not_undo_the_runs_own_settings():
    run = TrainConfig(lr=2e-3, augment=AugmentConfig(hue=0.1))
    assert given_options(TrainConfig(), run) == {}
    assert given_options(TrainConfig(augment=AugmentConfig(hue=0.2)), run) == {"augment": {"hue": 0.2}}


# ------------------------------------------------------------------ state round trip


def parts(seed: int = 0, ema: float = 0.5, scaler_precision: Precision = FP32):
    torch.manual_seed(seed)
    net = Classifier(create_model("pcamnet", width=4, dropout=0.0), [0.5] * 3, [0.25] * 3)
    cfg = TrainConfig(seed=3, augment=AugmentConfig(), lr=1e-2, ema=ema, batch_size=4)
    t = create_trainer(cfg, net, CPU, scaler_precision, total_steps=20)
    store = FakeStore(12)
    loader = BatchLoader(RowSource(store, "mmap", CPU), np.arange(12), 4, shuffle=True, seed=3, prefetch=0)
    return t, loader


def checkpoint(t, loader) -> Checkpoint:
    # deep copies: state dicts hold the live tensors, which the next steps change (last.pt is written at once)
    return Checkpoint(arch="pcamnet", model_kwargs={"width": 4}, mean=(0.5,) * 3, std=(0.25,) * 3,
                      weights={k: v.clone() for k, v in t.ema.model.state_dict().items()},
                      config={"seed": 3}, epoch=1,
                      training_state=copy.deepcopy(training_state(t, loader, CPU)))


def run_epoch(t, loader) -> list[float]:
    return [float(train_step(t, b)) for b in loader]


def test_restore_continues_exactly_like_an_uninterrupted_run():
    t, loader = parts()
    run_epoch(t, loader)
    ck = checkpoint(t, loader)
    want = run_epoch(t, loader)                      # the uninterrupted second epoch
    want_w = [p.detach().clone() for p in t.net.parameters()]
    want_ema = [p.detach().clone() for p in t.ema.model.parameters()]

    fresh, fresh_loader = parts(seed=99)             # other initial weights, other generator state
    restore(fresh, fresh_loader, ck, RUN / "last.pt", FP32, CPU)
    assert fresh_loader.epoch == 1 and fresh.sched.last_epoch == t.sched.last_epoch - 3
    got = run_epoch(fresh, fresh_loader)
    assert got == want                               # same batches, same augmentation, same steps
    assert all(torch.equal(a, b) for a, b in zip(fresh.net.parameters(), want_w))
    assert all(torch.equal(a, b) for a, b in zip(fresh.ema.model.parameters(), want_ema))
    assert fresh.opt.param_groups[0]["lr"] == t.opt.param_groups[0]["lr"]


def test_training_state_holds_every_part():
    t, loader = parts()
    run_epoch(t, loader)
    st = training_state(t, loader, CPU)
    assert set(st) == {"train_weights", "optimizer", "scheduler", "scaler", "sampler", "rng"}
    assert st["sampler"] == {"epoch": 1, "seed": 3, "rows": 12, "world": 1}
    assert st["scheduler"]["last_epoch"] == 3
    assert st["rng"]["device"] == "cpu" and st["rng"]["cuda"] is None
    assert torch.equal(st["rng"]["augment"], t.gen.get_state())
    assert torch.equal(st["rng"]["cpu"], torch.get_rng_state())
    assert st["scaler"] == {"scaler": {}, "skipped": 0}


def test_restore_on_another_device_kind_reseeds_the_augmentation(caplog):
    t, loader = parts()
    run_epoch(t, loader)
    ck = checkpoint(t, loader)
    ck.training_state["rng"] = {**ck.training_state["rng"], "device": "cuda"}
    fresh, fresh_loader = parts()
    with caplog.at_level(logging.WARNING, logger="pcamtool"):
        restore(fresh, fresh_loader, ck, RUN / "last.pt", FP32, CPU)
    assert "saved on cuda, resumed on cpu: random augmentation restarts from the seed" in caplog.text
    want = torch.Generator().manual_seed(3 + 7919 * 1).get_state()
    assert torch.equal(fresh.gen.get_state(), want)


def test_restore_in_another_precision_starts_the_scaler_afresh(caplog):
    fp16 = Precision("cpu", torch.float16, False, "fp16: test")
    t, loader = parts(scaler_precision=fp16)
    t.scaler.skipped.fill_(5)
    ck = checkpoint(t, loader)
    ck = Checkpoint(**{**ck.__dict__, "precision": "fp16"})
    fresh, fresh_loader = parts()
    with caplog.at_level(logging.WARNING, logger="pcamtool"):
        restore(fresh, fresh_loader, ck, RUN / "last.pt", FP32, CPU)
    assert "trained in fp16, resumed in fp32: the loss scaler starts afresh" in caplog.text
    assert int(fresh.scaler.skipped) == 0
    same, same_loader = parts(scaler_precision=fp16)
    restore(same, same_loader, ck, RUN / "last.pt", fp16, CPU)
    assert int(same.scaler.skipped) == 5


def test_restore_without_ema_leaves_the_average_alone_and_refuses_other_optimizers():
    t, loader = parts(ema=0.0)
    ck = checkpoint(t, loader)
    fresh, fresh_loader = parts(ema=0.0, seed=5)
    restore(fresh, fresh_loader, ck, RUN / "last.pt", FP32, CPU)
    assert fresh.ema.model is fresh.net
    assert all(torch.equal(a, b) for a, b in zip(fresh.net.parameters(), t.net.parameters()))
    ck.training_state["optimizer"] = {"state": {}, "param_groups": []}
    with pytest.raises(PcamError, match=r"last.pt: optimizer state does not fit this run \("):
        restore(fresh, fresh_loader, ck, RUN / "last.pt", FP32, CPU)


def test_old_checkpoint_without_sampler_state_resumes_at_its_epoch():
    t, loader = parts()
    ck = checkpoint(t, loader)
    del ck.training_state["sampler"]
    fresh, fresh_loader = parts()
    restore(fresh, fresh_loader, ck, RUN / "last.pt", FP32, CPU)
    assert fresh_loader.epoch == 1


def test_unknown_options_are_refused_not_crashed_on():
    run = TrainConfig()
    with pytest.raises(PcamError, match=r"cannot change --nonsense on resume \(the run was trained with --nonsense \?\)"):
        check_changes(run, {"augment": {"nonsense": 1}}, RUN)
    # an augmentation name given at the top level is not the run's augmentation setting
    with pytest.raises(PcamError, match=r"the run was trained with --color-strength \?\)"):
        check_changes(run, {"hue": 0.5}, RUN)


def test_several_refused_options_are_listed_together():
    with pytest.raises(PcamError, match=r"cannot change --lr, --seed on resume \(the run was trained with --lr 0.002, "
                                        r"--seed 0\); only --device, "):
        check_changes(TrainConfig(), {"lr": 1e-3, "seed": 1}, RUN)


def test_restore_without_ema_keeps_the_trained_weights_not_the_saved_average():
    t, loader = parts(ema=0.0)
    ck = checkpoint(t, loader)
    other, _ = parts(ema=0.0, seed=7)
    ck = Checkpoint(**{**ck.__dict__, "weights": {k: v.clone() for k, v in other.net.state_dict().items()}})
    fresh, fresh_loader = parts(ema=0.0, seed=5)
    restore(fresh, fresh_loader, ck, RUN / "last.pt", FP32, CPU)
    assert all(torch.equal(a, b) for a, b in zip(fresh.net.parameters(), t.net.parameters()))


def test_restore_takes_the_sampler_state_over_the_epoch():
    t, loader = parts()
    ck = checkpoint(t, loader)
    ck = Checkpoint(**{**ck.__dict__, "epoch": 5})
    ck.training_state["sampler"] = {"epoch": 2, "seed": 3, "rows": 12, "world": 1}
    fresh, fresh_loader = parts()
    restore(fresh, fresh_loader, ck, RUN / "last.pt", FP32, CPU)
    assert fresh_loader.epoch == 2


def test_old_checkpoint_without_scaler_or_rng_state(caplog):
    t, loader = parts()
    ck = checkpoint(t, loader)
    del ck.training_state["scaler"], ck.training_state["rng"]
    fresh, fresh_loader = parts()
    fresh.scaler.skipped.fill_(4)
    with caplog.at_level(logging.WARNING, logger="pcamtool"):
        restore(fresh, fresh_loader, ck, RUN / "last.pt", FP32, CPU)
    assert int(fresh.scaler.skipped) == 0
    assert caplog.messages == [f"{RUN / 'last.pt'}: saved on ?, resumed on cpu: random augmentation restarts from "
                               f"the seed, so the run will not repeat an uninterrupted one exactly"]
    assert torch.equal(fresh.gen.get_state(), torch.Generator().manual_seed(3 + 7919).get_state())


def test_a_reseeded_generator_differs_from_epoch_to_epoch():
    # each resumed epoch must not replay the augmentation of another: seed + 7919 * epoch (7919 a prime)
    t, loader = parts()
    ck = checkpoint(t, loader)
    del ck.training_state["rng"]
    ck = Checkpoint(**{**ck.__dict__, "epoch": 2, "config": {"seed": 5}})
    fresh, fresh_loader = parts()
    restore(fresh, fresh_loader, ck, RUN / "last.pt", FP32, CPU)
    assert torch.equal(fresh.gen.get_state(), torch.Generator().manual_seed(5 + 7919 * 2).get_state())


def test_restore_messages_name_the_checkpoint(caplog):
    fp16 = Precision("cpu", torch.float16, False, "fp16: test")
    t, loader = parts()
    ck = checkpoint(t, loader)
    fresh, fresh_loader = parts()
    with caplog.at_level(logging.WARNING, logger="pcamtool"):
        restore(fresh, fresh_loader, ck, RUN / "last.pt", fp16, CPU)
    assert caplog.messages == [f"{RUN / 'last.pt'}: trained in fp32, resumed in fp16: the loss scaler starts afresh"]
    ck.training_state["optimizer"] = {"state": {}, "param_groups": []}
    with pytest.raises(PcamError, match=r"runs/x/last.pt: optimizer state does not fit this run \(loaded state dict"):
        restore(fresh, fresh_loader, ck, RUN / "last.pt", FP32, CPU)
    for key in ("train_weights", "weights"):
        bad = checkpoint(t, loader)
        if key == "weights":
            bad = Checkpoint(**{**bad.__dict__, "weights": {"nonsense": torch.zeros(1)}})
        else:
            bad.training_state["train_weights"] = {"nonsense": torch.zeros(1)}
        with pytest.raises(PcamError, match=r"^runs/x/last.pt"):
            restore(fresh, fresh_loader, bad, RUN / "last.pt", FP32, CPU)


# ------------------------------------------------------------------ resume_config on a run folder


REINHARD = {"method": "reinhard", "mean": [60.0, 5.0, -3.0], "std": [12.0, 4.0, 2.5]}


def write_run(tmp_path: Path, epoch: int = 2, store_count: int | None = 6, stain: dict | None = None,
              state: dict | None = None, **cfg_kw) -> Path:
    """A run folder as training leaves it after ``epoch`` epochs: config.json, last.pt and its store."""
    store = tmp_path / "s.h5"
    if not store.exists():
        write_store(store, [0, 1] * 3, stain=stain)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    cfg = TrainConfig(**{"store": str(store), "out": str(run), "arch": "pcamnet", "model_kwargs": {"width": 4},
                         "epochs": 4, "seed": 3, **cfg_kw})
    saved = json.loads(json.dumps(cfg.to_dict()))     # as json.dump writes it and torch.save keeps it
    (run / "config.json").write_text(json.dumps({**saved, "resolved": {"train_rows": 4}}))
    Checkpoint(arch="pcamnet", model_kwargs={"width": 4}, mean=(0.5,) * 3, std=(0.25,) * 3,
               stain=StainReference.from_dict(stain), store_path=str(store), store_count=store_count,
               config=saved, epoch=epoch,
               training_state={"optimizer": {"state": {}, "param_groups": []}} if state is None else state,
               ).save(run / "last.pt")
    return run


def test_resume_config_is_the_runs_own_config_with_its_checkpoint(tmp_path):
    run = write_run(tmp_path, lr=2e-3)
    dead = run / ".last.pt.99999999.0123abcd.partial"   # what a SIGKILL mid-save leaves (no such pid runs)
    dead.write_bytes(b"half")
    cfg, ck = resume_config(run)
    assert not dead.exists()
    assert cfg == TrainConfig(store=str(tmp_path / "s.h5"), out=str(run), arch="pcamnet",
                              model_kwargs={"width": 4}, epochs=4, seed=3, lr=2e-3)
    assert ck.epoch == 2 and ck.store_count == 6 and "optimizer" in ck.training_state
    # the run's own folder is where it goes on, wherever its config says it was written
    moved = tmp_path / "moved"
    run.rename(moved)
    assert resume_config(moved)[0].out == str(moved)


def test_resume_config_applies_the_options_given_or_a_library_callers_config(tmp_path, caplog):
    run = write_run(tmp_path, lr=1e-3)
    assert resume_config(run, overrides={})[0].epochs == 4
    # options given again with the run's own values (its folder as -o) are no change
    assert resume_config(run, overrides={"lr": 1e-3, "out": str(run), "epochs": 5})[0].epochs == 5
    with caplog.at_level(logging.INFO, logger="pcamtool"):
        cfg, _ = resume_config(run, cfg=TrainConfig(epochs=6, threads=2))
    assert (cfg.epochs, cfg.threads, cfg.lr) == (6, 2, 1e-3)   # the caller's default lr is not a change
    assert f"resuming {run} with --epochs 6, --threads 2" in caplog.messages
    # options the user gave rule over the library caller's config
    assert resume_config(run, overrides={"epochs": 5}, cfg=TrainConfig(epochs=6))[0].epochs == 5
    with pytest.raises(PcamError, match=r"^--resume: cannot change --lr on resume \(the run was trained with "
                                        r"--lr 0.001\)"):
        resume_config(run, cfg=TrainConfig(lr=0.1))


def test_resume_config_refuses_fewer_epochs_than_the_run_has_trained(tmp_path):
    run = write_run(tmp_path, epoch=2)
    assert resume_config(run, overrides={"epochs": 2})[0].epochs == 2   # a finished run, continued to its end
    with pytest.raises(PcamError, match=rf"^--epochs 1: {re.escape(str(run))} has already trained 2 epochs$"):
        resume_config(run, overrides={"epochs": 1})


def test_resume_config_of_a_run_without_a_set_length(tmp_path):
    assert resume_config(write_run(tmp_path, epochs=None))[0].epochs is None


def test_resume_config_refuses_what_is_not_a_run_to_resume_in_one_line(tmp_path):
    run = write_run(tmp_path)
    (run / "last.pt").unlink()
    with pytest.raises(PcamError) as e:
        resume_config(run)
    assert str(e.value) == (f"{run}: not a run folder to resume (no last.pt: it stopped before its first epoch ended; "
                            f"run the command that started it again)")
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "lr": -1}))
    with pytest.raises(PcamError, match=rf"^{re.escape(str(run / 'config.json'))}: --lr must be"):
        resume_config(run)


@pytest.mark.parametrize("state", [{}, {"sampler": {"epoch": 2}}], ids=["none", "no optimizer"])
def test_resume_config_refuses_a_checkpoint_without_training_state(tmp_path, state):
    run = write_run(tmp_path, state=state)   # a best.pt copied over last.pt, or one of an older pcamtool
    with pytest.raises(PcamError, match=rf"^{re.escape(str(run))}/last.pt: holds no training state to resume from$"):
        resume_config(run)


def test_resume_config_refuses_a_checkpoint_without_its_config(tmp_path):
    run = write_run(tmp_path)
    dataclasses.replace(Checkpoint.load(run / "last.pt"), config={}).save(run / "last.pt")
    with pytest.raises(PcamError, match=r"last.pt: holds no training state to resume from$"):
        resume_config(run)


def test_resume_config_refuses_another_runs_checkpoint_naming_both_sides(tmp_path):
    run = write_run(tmp_path)
    ck = Checkpoint.load(run / "last.pt")
    dataclasses.replace(ck, config={**ck.config, "arch": "simple", "seed": 5}).save(run / "last.pt")
    with pytest.raises(PcamError) as e:
        resume_config(run)
    assert str(e.value) == (f"{run}/last.pt: belongs to another run (arch 'simple', seed 5, "
                            f"where config.json says 'pcamnet', 3)")


def test_resume_config_refuses_a_store_with_other_rows(tmp_path):
    run = write_run(tmp_path, store_count=7)
    with pytest.raises(PcamError) as e:
        resume_config(run)
    assert str(e.value) == f"{run}: run was trained on 7 images, {tmp_path / 's.h5'} has 6"
    # a checkpoint of an older pcamtool that did not record the count is taken at its word
    assert resume_config(write_run(tmp_path, store_count=None))[0].store == str(tmp_path / "s.h5")


def test_resume_config_takes_a_store_with_the_same_stain_normalization(tmp_path):
    run = write_run(tmp_path, stain=REINHARD)
    assert resume_config(run)[1].stain == StainReference.from_dict(REINHARD)


def test_resume_config_refuses_a_store_packed_with_other_stain_normalization(tmp_path):
    write_store(tmp_path / "s.h5", [0, 1] * 3)
    run = write_run(tmp_path, stain=REINHARD)
    with pytest.raises(PcamError) as e:
        resume_config(run)
    assert str(e.value) == (f"{tmp_path / 's.h5'}: packed with stain normalization 'none', but {run} was trained on "
                            f"images normalized with 'reinhard' (reference 60.0, 5.0, -3.0, ...) (the store was "
                            f"replaced; resume on the store it was trained on, or start a new run)")


def test_a_cuda_run_saves_and_restores_the_generator_of_its_own_device(monkeypatch):
    # dropout on a GPU draws from that device's generator; torch.cuda is faked so this runs on any machine
    gpu = torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": ("state of", device))
    t, loader = parts()
    rng = training_state(t, loader, gpu)["rng"]
    assert rng["device"] == "cuda" and rng["cuda"] == ("state of", gpu)

    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    ck = checkpoint(t, loader)
    saved = torch.arange(16, dtype=torch.uint8)
    ck.training_state["rng"] = {**ck.training_state["rng"], "device": "cuda", "cuda": saved}
    fresh, fresh_loader = parts(seed=9)
    restore(fresh, fresh_loader, ck, RUN / "last.pt", FP32, gpu)
    assert len(restored) == 1 and restored[0][0] is saved and restored[0][1] == gpu
    assert torch.equal(fresh.gen.get_state(), ck.training_state["rng"]["augment"])
