"""The parts a training loop is built from (pcamtool.train.parts): optimizer, schedule, EMA, loss scaler, Dist.

Each is pinned against an independent computation (``oracles.lr_multipliers``,
the EMA recurrence written out in NumPy), so a changed constant or a swapped
weight fails here rather than only as a slightly worse AUC.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pcamtool.config import TrainConfig
from pcamtool.device import Precision
from pcamtool.train.parts import EMA, Dist, LossScaler, create_optimizer, create_schedule

from oracles import lr_multipliers

CPU = torch.device("cpu")
FP32 = Precision("cpu", None, False, "fp32: test")
FP16 = Precision("cpu", torch.float16, False, "fp16: test")


def net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))


def lrs(cfg: TrainConfig, total: int, steps: int) -> np.ndarray:
    """The learning rate the optimizer holds at steps 0..steps-1."""
    opt = create_optimizer(net().parameters(), cfg, CPU)
    sched = create_schedule(opt, cfg, total)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


# ------------------------------------------------------------------ optimizer


def test_adamw_and_nesterov_sgd_carry_the_configured_settings():
    adam = create_optimizer(net().parameters(), TrainConfig(lr=3e-3, weight_decay=0.02), CPU)
    assert type(adam) is torch.optim.AdamW
    assert adam.defaults["lr"] == 3e-3 and adam.defaults["weight_decay"] == 0.02
    assert not adam.defaults.get("fused")  # the CPU keeps the default (unfused) implementation
    sgd = create_optimizer(net().parameters(), TrainConfig(optimizer="sgd", lr=0.1, weight_decay=1e-4), CPU)
    assert type(sgd) is torch.optim.SGD
    d = sgd.defaults
    assert (d["lr"], d["momentum"], d["nesterov"], d["weight_decay"]) == (0.1, 0.9, True, 1e-4)
    assert not d.get("fused")


def test_optimizer_takes_parameter_groups():
    m = net()
    groups = [{"params": list(m[0].parameters()), "lr": 1e-3}, {"params": list(m[2].parameters()), "lr": 1e-4}]
    opt = create_optimizer(groups, TrainConfig(lr=1e-3), CPU)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4]


# ------------------------------------------------------------------ schedule


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
@pytest.mark.parametrize("total,warmup", [(100, 0.15), (37, 0.3), (10, 0.0), (5, 0.5), (1, 0.15), (400, 0.05)])
def test_schedule_follows_the_independent_curve(schedule, total, warmup):
    cfg = TrainConfig(lr=0.5, schedule=schedule, warmup_frac=warmup)
    got = lrs(cfg, total, total + 3)   # a few steps past the end stay at the floor
    want = 0.5 * lr_multipliers(total, warmup, schedule, steps=total + 3)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_onecycle_starts_at_a_25th_and_ends_at_a_25000th_of_the_peak():
    cfg = TrainConfig(lr=1.0, schedule="onecycle", warmup_frac=0.1)
    got = lrs(cfg, 100, 101)
    # warm-up of 10 steps from 1/25: step 0 is one tenth of the way from 0.04 to 1
    assert got[0] == pytest.approx(0.04 + 0.96 / 10, rel=1e-12)
    assert got[9] == pytest.approx(1.0, rel=1e-12) and got.max() == pytest.approx(1.0, rel=1e-12)
    assert got[100] == pytest.approx(1 / 25_000, rel=1e-9)
    assert got[55] == pytest.approx(4e-5 + (1 - 4e-5) * 0.5, rel=1e-9)   # half-way down the cosine
    assert np.all(np.diff(got[:10]) > 0) and got[10] == got[9] and np.all(np.diff(got[10:]) < 0)
    # one-step warm-up (warmup 0): the first step is already the peak, start value or not
    assert lrs(TrainConfig(lr=1.0, warmup_frac=0.0), 10, 1)[0] == pytest.approx(1.0)


def test_cosine_warms_up_from_zero_and_anneals_to_zero():
    got = lrs(TrainConfig(lr=2.0, schedule="cosine", warmup_frac=0.2), 50, 51)
    assert got[0] == pytest.approx(2.0 / 10) and got[9] == pytest.approx(2.0)
    assert got[50] == pytest.approx(0.0, abs=1e-15)
    assert got[30] == pytest.approx(2.0 * 0.5 * (1 + np.cos(np.pi * 20 / 40)))


def test_schedule_state_is_the_step_so_a_longer_run_resumes_on_its_own_curve():
    cfg = TrainConfig(lr=1.0, warmup_frac=0.1)
    opt = create_optimizer(net().parameters(), cfg, CPU)
    sched = create_schedule(opt, cfg, 100)
    for _ in range(40):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["last_epoch"] == 40
    opt2 = create_optimizer(net().parameters(), cfg, CPU)
    longer = create_schedule(opt2, cfg, 200)   # resumed with twice the epochs
    longer.load_state_dict(state)
    opt2.step()
    longer.step()
    # step 41 of the 200-step curve, not of the saved 100-step one
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_multipliers(200, 0.1, "onecycle")[41], rel=1e-12)
    assert opt2.param_groups[0]["lr"] != pytest.approx(lr_multipliers(100, 0.1, "onecycle")[41], rel=1e-6)


# ------------------------------------------------------------------ EMA


def params_np(m: torch.nn.Module) -> list[np.ndarray]:
    return [p.detach().numpy().astype(np.float64).copy() for p in m.parameters()]


def test_ema_decay_zero_is_the_network_itself_and_update_does_nothing():
    m = net()
    ema = EMA(m, 0.0)
    assert ema.model is m and ema.decay == 0.0
    before = params_np(m)
    ema.update()
    assert all(np.array_equal(a, b) for a, b in zip(before, params_np(m)))


def test_ema_update_moves_the_average_by_one_minus_decay():
    m = net()
    decay = 0.9
    ema = EMA(m, decay)
    assert ema.model is not m and not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())
    avg = params_np(m)
    rng = np.random.default_rng(0)
    for _ in range(5):
        with torch.no_grad():   # the "trained" weights jump somewhere new each step
            for p in m.parameters():
                p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape)).astype(np.float32)))
        ema.update()
        new = params_np(m)
        avg = [decay * a + (1 - decay) * n for a, n in zip(avg, new)]
        for got, want in zip(params_np(ema.model), avg):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert m.training  # the trained network keeps its mode


def test_ema_converges_to_constant_weights_geometrically():
    m = net()
    ema = EMA(m, 0.5)
    start = params_np(ema.model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    for _ in range(3):
        ema.update()
    # after n steps the gap to the target is decay**n of the first gap (here 1.0)
    for got, s in zip(params_np(ema.model), start):
        np.testing.assert_allclose(got, s + 1.0 - 0.5 ** 3, rtol=1e-6, atol=1e-6)


def test_ema_copies_buffers_as_they_are():
    m = net()
    ema = EMA(m, 0.99)
    m.train()
    with torch.no_grad():
        m(torch.randn(16, 4) * 5 + 3)  # batch norm's running statistics move
    bn, ema_bn = m[1], ema.model[1]
    assert not torch.equal(bn.running_mean, ema_bn.running_mean)
    ema.update()
    assert torch.equal(bn.running_mean, ema_bn.running_mean)
    assert torch.equal(bn.running_var, ema_bn.running_var)
    assert torch.equal(bn.num_batches_tracked, ema_bn.num_batches_tracked)


def test_ema_of_a_network_without_buffers():
    m = torch.nn.Linear(3, 1)
    ema = EMA(m, 0.5)
    with torch.no_grad():
        m.weight.add_(2.0)
    ema.update()
    assert torch.allclose(ema.model.weight, m.weight - 1.0)


# ------------------------------------------------------------------ loss scaler


def one_step(scaler: LossScaler, grad_value: float) -> tuple[torch.nn.Linear, torch.Tensor]:
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    loss = (lin(torch.ones(1, 2)) * grad_value).sum()
    scaler.backward(loss)
    scaler.step(opt)
    return lin, lin.weight.detach().clone()


def test_fp32_scaler_is_a_pass_through():
    s = LossScaler(FP32, CPU)
    assert not s.scaler.is_enabled()
    _, w = one_step(s, 2.0)
    assert torch.allclose(w, torch.full((1, 2), 1.0 - 0.1 * 2.0))  # the plain gradient, unscaled
    _, w = one_step(s, float("inf"))   # nothing skips an overflow in fp32
    assert not torch.isfinite(w).all()
    assert int(s.skipped) == 0
    assert s.state_dict()["skipped"] == 0


def test_fp16_scaler_skips_overflowing_steps_and_counts_them():
    s = LossScaler(FP16, CPU)
    assert s.scaler.is_enabled()
    assert s.skipped.dtype == torch.int64   # an exact count (a float32 one stops counting at 2**24)
    scale = s.scaler.get_scale()
    _, w = one_step(s, float("inf"))
    assert torch.equal(w, torch.ones(1, 2)) and int(s.skipped) == 1   # the step was skipped
    assert s.scaler.get_scale() == scale / 2
    _, w = one_step(s, 2.0)
    assert torch.allclose(w, torch.full((1, 2), 0.8)) and int(s.skipped) == 1  # unscaled before the step
    _, w = one_step(s, float("nan"))
    assert int(s.skipped) == 2
    state = s.state_dict()
    assert state["skipped"] == 2 and state["scaler"]["scale"] == scale / 4
    fresh = LossScaler(FP16, CPU)
    fresh.load_state_dict(state)
    assert int(fresh.skipped) == 2 and fresh.scaler.get_scale() == scale / 4
    fresh.load_state_dict({})   # an old checkpoint without scaler state: the count restarts
    assert int(fresh.skipped) == 0 and fresh.scaler.get_scale() == scale / 4


@pytest.mark.parametrize("precision", [FP32, FP16])
def test_skip_counter_lives_on_the_training_device(precision):
    # counting on the device is what spares the host a sync every step; "meta" stands in for a GPU here
    s = LossScaler(precision, torch.device("meta"))
    assert s.skipped.device == torch.device("meta") and s.skipped.dtype == torch.int64 and s.skipped.dim() == 0


# ------------------------------------------------------------------ Dist


def test_single_process_dist_is_a_set_of_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    d = Dist(CPU)
    assert (d.world, d.rank, d.enabled, d.main) == (1, 0, False, True)
    m = net()
    assert d.wrap(m, CPU) is m
    t = torch.arange(3)
    assert d.all_gather(t) is t
    assert d.local_device(CPU) == CPU
    d.barrier()
    d.close()
    assert not torch.distributed.is_initialized()


def test_dist_reads_rank_and_world_from_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "3")
    d = Dist(CPU)
    assert d.rank == 3 and not d.main and not d.enabled


def test_dist_under_a_process_group_wraps_gathers_and_closes(monkeypatch, tmp_path):
    """The DDP paths in one process: a gloo group of one rank stands in for torchrun's."""
    monkeypatch.setenv("WORLD_SIZE", "2")   # torchrun's variables say several ranks; the group has one
    monkeypatch.setenv("RANK", "0")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        d = Dist(CPU)                        # finds the group already made: does not make another
        assert d.enabled and d.main and d.world == 2
        d.world = 1                          # the group's real size, for the gather below
        assert d.local_device(CPU) == CPU    # a CPU run keeps its device whatever the rank
        m = net()
        wrapped = d.wrap(m, CPU)
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and wrapped.module is m
        t = torch.arange(4.0)
        got = d.all_gather(t)
        assert torch.equal(got, t) and got is not t
        d.barrier()
    finally:
        d.close()
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_cuda_gets_the_fused_optimizer(optimizer):
    """Asked for a CUDA device the fused kernels are chosen (torch builds the fused optimizer on CPU tensors too)."""
    opt = create_optimizer(net().parameters(), TrainConfig(optimizer=optimizer), torch.device("cuda"))
    assert opt.defaults["fused"] is True
    assert not create_optimizer(net().parameters(), TrainConfig(optimizer=optimizer), CPU).defaults.get("fused")


def test_dist_under_torchrun_starts_the_group_for_its_device(monkeypatch):
    """Several ranks: nccl for CUDA, gloo for the CPU; each rank on its LOCAL_RANK GPU; DDP told that GPU."""
    import torch.distributed as td

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(td, "is_initialized", lambda: False)
    monkeypatch.setattr(td, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(td, "destroy_process_group", lambda: calls.append(("destroy",)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda module, device_ids=None: ("ddp", module, device_ids))
    cpu = Dist(CPU)
    assert calls == [("init", "gloo")] and cpu.rank == 1 and not cpu.main
    gpu = Dist(torch.device("cuda"))
    assert calls[-1] == ("init", "nccl")
    local = gpu.local_device(torch.device("cuda"))
    assert local == torch.device("cuda", 3) and calls[-1] == ("set_device", torch.device("cuda", 3))
    m = net()
    assert gpu.wrap(m, local) == ("ddp", m, [3])
    assert cpu.wrap(m, CPU) == ("ddp", m, None)
    assert cpu.local_device(CPU) == CPU
    monkeypatch.delenv("LOCAL_RANK")
    assert gpu.local_device(torch.device("cuda")) == torch.device("cuda", 0)
    monkeypatch.setattr(td, "is_initialized", lambda: True)
    cpu.close()
    assert calls[-1] == ("destroy",)


def test_a_single_process_does_not_close_a_group_it_did_not_start(monkeypatch):
    import torch.distributed as td

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    destroyed = []
    monkeypatch.setattr(td, "is_initialized", lambda: True)
    monkeypatch.setattr(td, "destroy_process_group", lambda: destroyed.append(1))
    Dist(CPU).close()
    assert destroyed == []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: destroyed.append(d))
    assert Dist(CPU).local_device(torch.device("cuda", 1)) == torch.device("cuda", 1) and destroyed == []
