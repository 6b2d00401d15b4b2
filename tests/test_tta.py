"""The dihedral group and the TTA subgroups (pcamtool.tta)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pcamtool.errors import PcamError
from pcamtool.tta import dihedral, dihedral_batch, dihedral_inverse, dihedral_np, tta_mean, tta_transforms


def batch(n: int = 6, seed: int = 0) -> torch.Tensor:
    """Float NCHW in [0, 1] with tissue-like values (no exact 0 or 1)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 96, 96, generator=g) * 0.9 + 0.05


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tta_batch(x: torch.Tensor, n: int, dims: tuple[int, int] = (1, 2)) -> torch.Tensor:
    """The ``n`` TTA copies of a batch concatenated ``k``-major: ``(n * B, ...)``."""
    return torch.cat([dihedral(x, k, dims) for k in tta_transforms(n)])


def tta_batch_np(x: np.ndarray, n: int, axes: tuple[int, int] = (1, 2)) -> np.ndarray:
    return np.concatenate([dihedral_np(x, k, axes) for k in tta_transforms(n)])


def dihedral_all(x: torch.Tensor, dims: tuple[int, int] = (1, 2)) -> torch.Tensor:
    return tta_batch(x, 8, dims)


# ------------------------------------------------------------------ dihedral


def test_the_eight_transforms_are_distinct_and_invertible():
    x = batch(1)
    outs = [dihedral(x, k) for k in range(8)]
    for a, b in itertools.combinations(range(8), 2):
        assert not torch.equal(outs[a], outs[b]), (a, b)
    for k in range(8):
        assert torch.equal(dihedral(outs[k], dihedral_inverse(k)), x)
        assert dihedral_inverse(dihedral_inverse(k)) == k


def test_the_transforms_form_a_group_and_match_the_numbering():
    x = batch(1)
    outs = [dihedral(x, k) for k in range(8)]
    for a, b in itertools.product(range(8), repeat=2):  # closed under composition
        comp = dihedral(dihedral(x, a), b)
        assert any(torch.equal(comp, o) for o in outs)
    assert torch.equal(outs[1], torch.rot90(x, 1, (-2, -1)))
    assert torch.equal(outs[4], x.flip(-1))
    assert torch.equal(outs[6], x.flip(-2))


def test_numpy_and_torch_agree_on_nchw_and_nhwc():
    x = batch(2)
    nhwc = (x * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    for k in range(8):
        assert np.array_equal(dihedral_np(x.numpy(), k, axes=(2, 3)), dihedral(x, k).numpy())
        assert np.array_equal(dihedral_np(nhwc.numpy(), k), dihedral(nhwc, k, dims=(1, 2)).numpy())
    # the same element acts the same on both layouts
    for k in range(8):
        a = dihedral(nhwc, k, dims=(1, 2)).permute(0, 3, 1, 2)
        assert torch.equal(a, dihedral(nhwc.permute(0, 3, 1, 2), k))
    with pytest.raises(PcamError, match="0..7"):
        dihedral(x, 8)
    with pytest.raises(PcamError, match="0..7"):
        dihedral_np(x.numpy(), -1)


def test_per_sample_dihedral_matches_one_at_a_time():
    x = batch(16)
    ks = torch.arange(16) % 8
    out = dihedral_batch(x, ks)
    for i in range(16):
        assert torch.equal(out[i], dihedral(x[i:i + 1], int(ks[i]))[0])
    with pytest.raises(PcamError, match="one transform per image"):
        dihedral_batch(x, ks[:3])


def test_tta_transforms_are_subgroups():
    assert tta_transforms(1) == [0] and tta_transforms(8) == list(range(8))
    x = batch(1)
    for n in (1, 2, 4, 8):
        ks = tta_transforms(n)
        assert len(ks) == n == len(set(ks))
        members = [dihedral(x, k) for k in ks]
        for a, b in itertools.product(ks, repeat=2):
            assert any(torch.equal(dihedral(dihedral(x, a), b), m) for m in members), (n, a, b)
    for bad in (0, 3, 16):
        with pytest.raises(PcamError, match="--tta must be one of 1, 2, 4, 8"):
            tta_transforms(bad)


def test_tta_batches_are_k_major_and_agree_across_libraries():
    nhwc = torch.randint(0, 256, (3, 96, 96, 3), dtype=torch.uint8, generator=gen())
    for n in (1, 2, 4, 8):
        t = tta_batch(nhwc, n)
        assert t.shape == (3 * n, 96, 96, 3) and t.dtype == torch.uint8
        assert np.array_equal(t.numpy(), tta_batch_np(nhwc.numpy(), n))
        for i, k in enumerate(tta_transforms(n)):
            assert torch.equal(t[3 * i:3 * i + 3], dihedral(nhwc, k, dims=(1, 2)))
    assert torch.equal(dihedral_all(nhwc), tta_batch(nhwc, 8))
    # averaging an orientation-dependent score over all 8 is invariant to transforming the input first
    def score(b: torch.Tensor) -> torch.Tensor:
        return b[:, :10, :5, 0].float().sum((1, 2))

    avg = score(dihedral_all(nhwc)).view(8, 3).mean(0)
    avg_rot = score(dihedral_all(dihedral(nhwc, 5, dims=(1, 2)))).view(8, 3).mean(0)
    assert torch.allclose(avg, avg_rot) and not torch.allclose(score(nhwc), avg)


def test_tta_mean_calls_once_per_transform_and_averages():
    nhwc = torch.randint(0, 256, (3, 96, 96, 3), dtype=torch.uint8, generator=gen(1)).numpy()
    calls = []

    def run(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape)
        assert x.flags.c_contiguous  # onnxruntime binds the memory as it is
        return x[:, :10, :5, 0].astype(np.float64).sum((1, 2))

    for n in (1, 4, 8):
        calls.clear()
        got = tta_mean(run, nhwc, tta_transforms(n))
        assert calls == [(3, 96, 96, 3)] * n
        want = np.mean([run(tta_batch_np(nhwc, n)[3 * i:3 * i + 3]) for i in range(n)], axis=0)
        assert np.allclose(got, want)
    rotated = np.ascontiguousarray(dihedral_np(nhwc, 3))
    assert np.allclose(tta_mean(run, nhwc, tta_transforms(8)), tta_mean(run, rotated, tta_transforms(8)))


# --------------------------------------------------------------- augmentation
