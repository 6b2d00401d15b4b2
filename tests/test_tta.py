"""The dihedral group and the TTA subgroups (pcamtool.tta)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pcamtool.errors import PcamError
from pcamtool.tta import (TTA_CHOICES, _FH, _FW, _T, dihedral, dihedral_batch, dihedral_inverse, dihedral_np,
                          remap, tta_graph, tta_mean, tta_transforms)


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


# ------------------------------------------------------- the exact TTA sets and the graph


def test_tta_sets_are_the_documented_flips_and_turns():
    """Each TTA set pinned by what it does to an image, computed with plain flips (not the numbering)."""
    x = batch(1, seed=3)
    flips = {"identity": x, "flip W": x.flip(-1), "flip H": x.flip(-2), "half turn": x.flip(-2).flip(-1)}

    def named(n: int) -> list[str]:
        out = []
        for k in tta_transforms(n):
            out += [name for name, want in flips.items() if torch.equal(dihedral(x, k), want)]
        return out

    assert tta_transforms(1) == [0] and named(1) == ["identity"]
    assert tta_transforms(2) == [0, 4] and named(2) == ["identity", "flip W"]
    assert tta_transforms(4) == [0, 2, 4, 6]
    assert sorted(named(4)) == sorted(flips)  # the Klein four-group: no quarter turn, no transpose
    assert tta_transforms(8) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert TTA_CHOICES == (1, 2, 4, 8)


def test_each_k_matches_its_transpose_and_flip_form():
    """The (transpose, flip H, flip W) table the graph and the gather use agrees with flip-then-rotate."""
    x = batch(1, seed=4)
    for k in range(8):
        y = x.transpose(-2, -1) if _T[k] else x
        y = y.flip(-2) if _FH[k] else y
        y = y.flip(-1) if _FW[k] else y
        want = torch.rot90(x.flip(-1) if k >= 4 else x, k % 4, (-2, -1))
        assert torch.equal(y, want), k
        assert torch.equal(dihedral(x, k), want), k
        assert np.array_equal(dihedral_np(x.numpy(), k, axes=(2, 3)), want.numpy()), k
    assert [dihedral_inverse(k) for k in range(8)] == [0, 3, 2, 1, 4, 5, 6, 7]
    for bad in (8, -1, 2.0, "1"):
        with pytest.raises(PcamError, match="0..7"):
            dihedral_inverse(bad)  # type: ignore[arg-type]
    assert dihedral_inverse(np.int64(1)) == 3


def test_remap_is_a_shift_then_a_dihedral_transform():
    import torch.nn.functional as F

    x = batch(8, seed=5)
    ks = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    shifts = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 2], [6, 5, 4, 3, 2, 1, 0, 2]])
    out = remap(x, ks, shifts, 3)
    padded = F.pad(x, (3, 3, 3, 3), mode="reflect")
    for i in range(8):
        a, b = int(shifts[0, i]), int(shifts[1, i])
        crop = padded[i:i + 1, :, a:a + 96, b:b + 96]
        assert torch.equal(out[i:i + 1], dihedral(crop, int(ks[i]))), i
    assert torch.equal(remap(x, None, None, 0), x)
    with pytest.raises(PcamError, match="square"):
        remap(torch.zeros(1, 3, 8, 6), None, None, 0)


def test_tta_graph_averages_the_model_over_the_chosen_copies():
    """The ONNX graph wrapper gives the same mean as tta_mean over the same ks (opset 17 and 18)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def score_model(opset: int) -> onnx.ModelProto:
        # an orientation-dependent score: the sum of a corner block of channel 0
        g = helper.make_graph(
            [helper.make_node("Slice", ["images", "s", "e", "ax"], ["block"]),
             helper.make_node("Cast", ["block"], ["blockf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["blockf", "axes"], ["score"], keepdims=0)],
            "score", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["b", 96, 96, 3])],
            [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["b"])],
            [helper.make_tensor("s", TensorProto.INT64, [3], [0, 0, 0]),
             helper.make_tensor("e", TensorProto.INT64, [3], [10, 5, 1]),
             helper.make_tensor("ax", TensorProto.INT64, [3], [1, 2, 3]),
             helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)

    nhwc = torch.randint(0, 256, (3, 96, 96, 3), dtype=torch.uint8, generator=gen(2)).numpy()

    def run(x: np.ndarray) -> np.ndarray:
        return x[:, :10, :5, 0].astype(np.float64).sum((1, 2))

    for opset in (17, 18):
        for n in (1, 2, 4, 8):
            model = tta_graph(score_model(opset), tta_transforms(n))
            onnx.checker.check_model(model)
            sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            got = sess.run(None, {"images": nhwc})[0]
            assert got.shape == (3,)
            np.testing.assert_allclose(got, tta_mean(run, nhwc, tta_transforms(n)), rtol=1e-6)
    with pytest.raises(PcamError, match="opset >= 10"):
        tta_graph(score_model(9), [0])


def test_remap_takes_transforms_and_shifts_of_any_integer_type():
    x = batch(4, seed=6)
    ks = torch.tensor([1, 4, 6, 7])
    shifts = torch.tensor([[0, 2, 4, 1], [3, 0, 2, 4]])
    want = remap(x, ks, shifts, 2)
    for dt in (torch.int32, torch.uint8, torch.int16):
        assert torch.equal(remap(x, ks.to(dt), shifts.to(dt), 2), want), dt
        assert torch.equal(dihedral_batch(x, ks.to(dt)), dihedral_batch(x, ks)), dt


def test_tta_graph_accepts_opset_10_and_the_long_domain_name():
    from onnx import TensorProto, helper

    def identity(opsets: list) -> "onnx.ModelProto":  # noqa: F821
        g = helper.make_graph([helper.make_node("Identity", ["images"], ["p"])], "id",
                              [helper.make_tensor_value_info("images", TensorProto.UINT8, ["b", 96, 96, 3])],
                              [helper.make_tensor_value_info("p", TensorProto.UINT8, ["b", 96, 96, 3])])
        return helper.make_model(g, opset_imports=opsets, ir_version=8)

    for opsets in ([helper.make_opsetid("", 10)], [helper.make_opsetid("ai.onnx", 17)],
                   [helper.make_opsetid("ai.onnx", 10), helper.make_opsetid("com.microsoft", 1)]):
        out = tta_graph(identity(opsets), tta_transforms(4))
        ops = [n.op_type for n in out.graph.node]
        assert ops.count("Slice") == 4 and "Concat" in ops and ops[-1] == "ReduceMean", opsets
    with pytest.raises(PcamError, match="needs opset >= 10, the model has 9"):
        tta_graph(identity([helper.make_opsetid("ai.onnx", 9), helper.make_opsetid("com.microsoft", 12)]), [0])


def test_tta_graph_flips_the_whole_axis_of_images_larger_than_a_patch():
    """The reversed slices run past the first row/column for any size, not only up to 96 (here 160)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    size = 160
    # an orientation-dependent score read from the far corner: a flip that stops short of the first
    # column would move other pixels there
    g = helper.make_graph(
        [helper.make_node("Slice", ["images", "s", "e", "ax"], ["block"]),
         helper.make_node("Cast", ["block"], ["blockf"], to=TensorProto.FLOAT),
         helper.make_node("ReduceSum", ["blockf", "axes"], ["score"], keepdims=0)],
        "corner", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["b", size, size, 3])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["b"])],
        [helper.make_tensor("s", TensorProto.INT64, [3], [size - 10, size - 5, 0]),
         helper.make_tensor("e", TensorProto.INT64, [3], [size, size, 1]),
         helper.make_tensor("ax", TensorProto.INT64, [3], [1, 2, 3]),
         helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    nhwc = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=gen(7)).numpy()
    for ks in ([4], [6], tta_transforms(8)):
        sess = ort.InferenceSession(tta_graph(proto, ks).SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"images": nhwc})[0]
        # the same corner of each copy made with plain NumPy flips and turns
        want = np.mean([np.rot90(nhwc[:, :, ::-1] if k >= 4 else nhwc, k % 4, (1, 2))[:, -10:, -5:, 0]
                        .astype(np.float64).sum((1, 2)) for k in ks], axis=0)
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_remap_moves_transforms_and_shifts_to_the_batch_device():
    """Augmentation may draw ``ks`` and shifts with a CPU generator for a batch on the GPU.

    A ``meta`` batch stands in for a GPU one (as in test_augment). Meta kernels accept a CPU
    index where CUDA ones fail, so every op is watched for tensors on more than one device.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    mixed = []

    class WatchDevices(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # 0-d tensors are scalars, which torch lets cross devices
            devices = {a.device for a in tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor) and a.dim()}
            if len(devices) > 1:
                mixed.append((str(func), devices))
            return func(*args, **(kwargs or {}))

    x = torch.empty(4, 3, 96, 96, device="meta")
    ks = torch.tensor([1, 4, 6, 7])
    shifts = torch.tensor([[0, 2, 4, 1], [3, 0, 2, 4]])
    for args in ((ks, shifts, 2), (None, shifts, 2), (ks, None, 0), (None, None, 0)):
        with WatchDevices():
            out = remap(x, *args)
        assert out.device.type == "meta" and out.shape == x.shape, args
        assert mixed == [], (args, mixed)
