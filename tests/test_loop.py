"""One training step (pcamtool.train.loop.train_step) against an independent loss: label smoothing, micro-batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pcamtool.config import AugmentConfig, TrainConfig
from pcamtool.contract import Classifier, to_float01
from pcamtool.device import Precision
from pcamtool.models import create_model
from pcamtool.train.data import Batch
import pcamtool.train.loop as loop
from pcamtool.train.loop import create_trainer, train_step

from oracles import bce_with_logits

CPU = torch.device("cpu")


def trainer(label_smoothing: float, micro_batch: int = 0, lr: float = 1e-3):
    torch.manual_seed(0)
    # no dropout: the logits seen before the step are the ones the step sees
    net = Classifier(create_model("pcamnet", width=4, dropout=0.0), [0.5] * 3, [0.25] * 3)
    cfg = TrainConfig(label_smoothing=label_smoothing, augment=AugmentConfig.off(), lr=lr, ema=0.5)
    precision = Precision("cpu", None, False, "fp32: test", micro_batch=micro_batch)
    return create_trainer(cfg, net, CPU, precision, total_steps=10)


def a_batch(n: int = 6) -> Batch:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 96, 96, 3), dtype=torch.uint8, generator=g)
    y = torch.tensor([1, 0, 1, 1, 0, 0][:n], dtype=torch.float32)
    return Batch(x, y, np.arange(n))


def logits_now(t, b: Batch) -> np.ndarray:
    """The logits the step is about to see (train mode: batch norm uses the batch's statistics)."""
    state = {k: v.clone() for k, v in t.net.state_dict().items()}
    t.net.train()
    with torch.no_grad():
        z = t.module(to_float01(b.x)).double().numpy()
    t.net.load_state_dict(state)  # undo the running-statistics update of this extra forward
    return z


@pytest.mark.parametrize("ls", [0.0, 0.1, 0.3])
def test_step_loss_is_cross_entropy_against_smoothed_targets(ls):
    t, b = trainer(ls), a_batch()
    z = logits_now(t, b)
    loss = float(train_step(t, b))
    y = b.y.double().numpy()
    want = bce_with_logits(z, y * (1 - ls) + 0.5 * ls)   # 1 -> 1 - ls/2, 0 -> ls/2
    assert loss == pytest.approx(want, rel=1e-5)
    if ls:
        assert abs(loss - bce_with_logits(z, y)) > 1e-4  # smoothing changes what is learnt


def test_micro_batches_give_the_same_loss_as_one_batch():
    whole, sliced, b = trainer(0.2), trainer(0.2, micro_batch=2), a_batch()
    z = np.concatenate([logits_now(sliced, Batch(b.x[s:s + 2], b.y[s:s + 2], b.index[s:s + 2]))
                        for s in range(0, 6, 2)])
    want = bce_with_logits(z, b.y.double().numpy() * 0.8 + 0.1)
    assert float(train_step(sliced, b)) == pytest.approx(want, rel=1e-5)
    assert float(train_step(whole, b)) != pytest.approx(want, rel=1e-5)  # batch norm sees other batches


def test_step_moves_the_weights_the_schedule_and_the_average():
    t, b = trainer(0.0, lr=1e-2), a_batch()
    before = [p.detach().clone() for p in t.net.parameters()]
    ema_before = [p.detach().clone() for p in t.ema.model.parameters()]
    train_step(t, b)
    after = list(t.net.parameters())
    assert any(not torch.equal(a, c) for a, c in zip(before, after))
    assert t.sched.last_epoch == 1
    for e0, e1, w in zip(ema_before, t.ema.model.parameters(), after):  # EMA decay 0.5: half-way
        assert torch.allclose(e1, 0.5 * e0 + 0.5 * w.detach(), atol=1e-6)
    assert all(p.grad is not None for p in t.net.parameters())


@pytest.mark.parametrize("micro,slices", [(2, 3), (1, 6), (4, 2), (6, 1), (0, 1)])
def test_micro_batches_keep_gradients_local_until_the_last_slice(micro, slices):
    """Under DDP every slice but the last runs inside ``no_sync()`` (one all-reduce per step)."""
    import contextlib

    t, b = trainer(0.0, micro_batch=micro), a_batch()
    entered = []

    class Wrapped(torch.nn.Module):   # what DistributedDataParallel offers the step: forward and no_sync
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

        @contextlib.contextmanager
        def no_sync(self):
            entered.append(1)
            yield

    t.module = Wrapped(t.module)
    calls = []
    t.module.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    train_step(t, b)
    assert len(calls) == slices and sum(calls) == 6
    assert entered == [1] * (slices - 1)          # all slices but the last without sync


def test_create_trainer_seeds_each_rank_and_lays_out_the_network():
    t = trainer(0.0)
    assert torch.equal(t.gen.get_state(), torch.Generator().manual_seed(0).get_state())  # rank 0: the seed itself
    assert [g["lr"] for g in t.opt.param_groups] == [1e-3]                                # one group at --lr
    torch.manual_seed(0)
    net = Classifier(create_model("pcamnet", width=4, dropout=0.0), [0.5] * 3, [0.25] * 3)
    cl = Precision("cpu", None, True, "channels-last: test")
    t2 = create_trainer(TrainConfig(seed=5), net, CPU, cl, total_steps=4, rank=2)
    assert torch.equal(t2.gen.get_state(), torch.Generator().manual_seed(5 + 2000).get_state())
    convs = [m.weight for m in t2.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert t2.memory_format == torch.channels_last


class _Bar:
    """What train_one_epoch needs of a tqdm bar: counts and the loss postfixes it was shown."""

    disable = False

    def __init__(self) -> None:
        self.n, self.postfix = 0, []

    def update(self, k: int) -> None:
        self.n += k

    def set_postfix(self, refresh: bool = True, **kw) -> None:
        self.postfix.append(kw["loss"])


def scripted_steps(monkeypatch, losses: list[float]) -> None:
    """train_step answers the given batch-mean losses in turn, warning like an fp16 run's first skipped steps."""
    it = iter(losses)

    def step(t, b):
        import warnings

        warnings.warn("Detected call of `lr_scheduler.step()` before `optimizer.step()`. ...", UserWarning)
        return torch.tensor(next(it), dtype=torch.float64)

    monkeypatch.setattr(loop, "train_step", step)


class _Loader(list):
    """Batches of the given sizes (train_one_epoch reads only len(b.index))."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__(Batch(None, None, np.arange(n)) for n in sizes)


def test_epoch_loss_is_the_image_weighted_mean_and_the_bar_shows_the_running_mean(monkeypatch, recwarn):
    t = trainer(0.0)
    scripted_steps(monkeypatch, [1.0, 2.0, 4.0, 8.0])
    monkeypatch.setattr(loop, "BAR_EVERY", 2)
    bar = _Bar()
    st = loop.train_one_epoch(t, _Loader([4, 4, 4, 2]), bar)
    assert st.loss == pytest.approx((4 * 1 + 4 * 2 + 4 * 4 + 2 * 8) / 14) and st.images == 14
    assert st.skipped_steps == 0 and st.seconds > 0
    assert bar.n == 14 and bar.postfix == [f"{(4 + 8) / 8:.4f}", f"{(4 + 8 + 16 + 16) / 14:.4f}"]
    assert not [w for w in recwarn if "lr_scheduler.step" in str(w.message)]   # expected with fp16: kept quiet


def test_epoch_without_a_bar_or_with_one_image(monkeypatch):
    t = trainer(0.0)
    scripted_steps(monkeypatch, [0.5])
    st = loop.train_one_epoch(t, _Loader([1]))
    assert (st.loss, st.images) == (0.5, 1)
