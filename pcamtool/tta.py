"""The dihedral group D4: the transforms shared by training, validation, export and infer.

A PCam label does not depend on orientation (tissue has no "up"), so the
8 flips and 90-degree rotations serve training augmentation
(:mod:`pcamtool.augment` draws one per image) and test-time augmentation
(:mod:`pcamtool.infer` averages a subgroup of them).

Numbering (shared by :func:`dihedral`, :func:`dihedral_np`, the per-sample
:func:`dihedral_batch` and :func:`tta_transforms`)::

    k = r + 4 * f:  flip the width axis if f == 1, then rotate by r * 90 degrees
                    (np.rot90 / torch.rot90 direction, from the first axis
                    towards the second)

so ``k`` in 0..3 are the rotations and 4..7 the reflections;
``dihedral(dihedral(x, k), dihedral_inverse(k)) == x``.

Example::

    probs = tta_mean(model.run, images_nhwc, tta_transforms(8))
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import PcamError

from .constants import TTA_CHOICES  # the one list, shared with the CLI
# Each k as (transpose, flip first spatial axis, flip second spatial axis),
# applied in that order: the form used for per-sample transforms in one pass.
_T = (0, 1, 0, 1, 0, 1, 0, 1)
_FH = (0, 1, 1, 0, 0, 0, 1, 1)
_FW = (0, 0, 1, 1, 1, 0, 0, 1)


def _check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or not 0 <= int(k) <= 7:
        raise PcamError(f"dihedral transform must be an integer in 0..7, got {k!r}")
    return int(k)


def dihedral(x: Tensor, k: int, dims: tuple[int, int] = (-2, -1)) -> Tensor:
    """Element ``k`` (0..7) of the dihedral group applied to the square axes ``dims``.

    ``dims=(-2, -1)`` for NCHW floats, ``dims=(1, 2)`` for NHWC uint8 batches.
    """
    k = _check_k(k)
    if k >= 4:
        x = torch.flip(x, (dims[1],))
    return torch.rot90(x, k % 4, dims) if k % 4 else x


def dihedral_np(x: np.ndarray, k: int, axes: tuple[int, int] = (1, 2)) -> np.ndarray:
    """NumPy twin of :func:`dihedral` (a view; default axes for NHWC batches)."""
    k = _check_k(k)
    if k >= 4:
        x = np.flip(x, axes[1])
    return np.rot90(x, k % 4, axes)  # k % 4 == 0 gives x[:], a view like the rest


def dihedral_inverse(k: int) -> int:
    """The ``j`` with ``dihedral(dihedral(x, k), j) == x``: reflections are their own inverse."""
    k = _check_k(k)
    return k if k >= 4 else (4 - k) % 4


def dihedral_batch(x: Tensor, ks: Tensor) -> Tensor:
    """Image ``i`` of an NCHW batch transformed by ``dihedral(., ks[i])``, in one gather."""
    return remap(x, ks, None, 0)


def tta_transforms(n: int) -> list[int]:
    """The dihedral ``k`` averaged by TTA x``n``: always a subgroup, so the average is invariant to it.

    1: identity; 2: + horizontal flip; 4: the flips and the half turn
    ({0, 2, 4, 6}); 8: the whole group.
    """
    table = {1: [0], 2: [0, 4], 4: [0, 2, 4, 6], 8: list(range(8))}
    if n not in table:
        raise PcamError(f"--tta must be one of {', '.join(map(str, TTA_CHOICES))}, got {n}")
    return table[n]


def tta_mean(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """Mean of ``run`` over the dihedral copies ``ks`` of an NHWC batch, one call per transform.

    One call of ``len(images)`` per copy rather than one of ``len(ks)`` times
    the batch: on a CPU all copies in one run measured 15-25% slower (the
    activations no longer fit in cache). GPU providers average inside the
    graph instead (:func:`tta_graph`).
    """
    total = np.zeros(len(images))  # float64 (NumPy's default), whatever dtype run returns
    for k in ks:
        total += run(np.ascontiguousarray(dihedral_np(images, k)))
    return total / len(ks)


def tta_graph(proto: Any, ks: Sequence[int], name: str = "images") -> Any:
    """An ONNX model that averages ``proto`` over the dihedral copies ``ks`` of its NHWC input.

    The copies are made by graph ops (transpose and reversed slices, the
    ``_T``/``_FH``/``_FW`` form of each ``k``), so on a GPU the batch is
    uploaded once and copied on the device; the model then runs once on the
    ``len(ks)`` copies (``k``-major) and the graph returns their mean,
    ``(batch,)``. Needs opset >= 10 (slices with steps).
    """
    import onnx
    from onnx import TensorProto, helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    opset = max(o.version for o in out.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 10:
        raise PcamError(f"TTA inside the graph needs opset >= 10, the model has {opset}")
    result = g.output[0].name
    inner_in, inner_out = f"{name}__tta", f"{result}__each"
    for node in g.node:
        node.input[:] = [inner_in if i == name else i for i in node.input]
        node.output[:] = [inner_out if o == result else o for o in node.output]
    nodes, copies = [], []
    consts = [helper.make_tensor("tta__last", TensorProto.INT64, [1], [-1]),
              helper.make_tensor("tta__first", TensorProto.INT64, [1], [-(2 ** 63)]),
              helper.make_tensor("tta__shape", TensorProto.INT64, [2], [len(ks), -1])]
    for axis in (1, 2):
        consts.append(helper.make_tensor(f"tta__axis{axis}", TensorProto.INT64, [1], [axis]))
    for k in ks:
        x = name
        if _T[k]:
            nodes.append(helper.make_node("Transpose", [x], [f"tta__t{k}"], perm=[0, 2, 1, 3]))
            x = f"tta__t{k}"
        for axis, on in ((1, _FH[k]), (2, _FW[k])):
            if on:  # reversed slice: start at the last row/column, step -1 past the first
                y = f"tta__f{k}_{axis}"
                nodes.append(helper.make_node("Slice", [x, "tta__last", "tta__first", f"tta__axis{axis}",
                                                        "tta__last"], [y]))
                x = y
        copies.append(x)
    nodes.append(helper.make_node("Concat", copies, [inner_in], axis=0))
    tail = [helper.make_node("Reshape", [inner_out, "tta__shape"], ["tta__grid"])]
    if opset >= 18:
        consts.append(helper.make_tensor("tta__axis0", TensorProto.INT64, [1], [0]))
        tail.append(helper.make_node("ReduceMean", ["tta__grid", "tta__axis0"], [result], keepdims=0))
    else:
        tail.append(helper.make_node("ReduceMean", ["tta__grid"], [result], axes=[0], keepdims=0))
    g.initializer.extend(consts)
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old + tail)
    return out


@lru_cache(maxsize=8)
def _source_tables(n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For each k, where every output pixel comes from: (8, n*n) int64 rows, columns, flat indices."""
    i = torch.arange(n).view(n, 1).expand(n, n)
    j = torch.arange(n).view(1, n).expand(n, n)
    rows, cols = [], []
    for k in range(8):
        # undo the steps in reverse order: flip axis 1, flip axis 0, transpose
        jj = n - 1 - j if _FW[k] else j
        ii = n - 1 - i if _FH[k] else i
        a, b = (jj, ii) if _T[k] else (ii, jj)
        rows.append(a.reshape(-1))
        cols.append(b.reshape(-1))
    r, c = torch.stack(rows), torch.stack(cols)
    return r.to(device), c.to(device), (r * n + c).to(device)


def _reflect(v: Tensor, n: int) -> Tensor:
    """Index ``v`` reflected into ``0..n-1`` without repeating the edge (``F.pad`` "reflect")."""
    return (n - 1) - ((n - 1) - v.abs()).abs()


def remap(x: Tensor, ks: Tensor | None, shifts: Tensor | None, max_shift: int) -> Tensor:
    """Per-image dihedral transform ``ks`` after a shift, as a single gather.

    ``shifts`` is ``(2, B)`` in ``0..2*max_shift`` (row and column offsets of
    the crop in the reflect-padded image); ``None`` means no shift, and
    ``ks=None`` no dihedral transform. The index arithmetic is done on
    per-image rows and columns (``B x 96``), not per pixel, and the only
    per-pixel work is two small integer gathers and the gather of the image.
    """
    b, c, h, w = x.shape
    if h != w:
        raise PcamError(f"dihedral transforms need square images, got {tuple(x.shape)}")
    if ks is not None and ks.shape != (b,):
        raise PcamError(f"need one transform per image: {tuple(ks.shape)} for a batch of {b}")
    tab_r, tab_c, tab_flat = _source_tables(h, x.device)
    sel = ks.to(device=x.device, dtype=torch.long) if ks is not None else torch.zeros(b, dtype=torch.long, device=x.device)
    if shifts is None:
        src = tab_flat.index_select(0, sel)                                   # (B, H*W)
    else:
        shifts = shifts.to(device=x.device, dtype=torch.long) - max_shift
        line = torch.arange(h, device=x.device)                               # broadcasts against (B, 1)
        row_of = _reflect(line + shifts[0].view(b, 1), h)                     # (B, H)
        col_of = _reflect(line + shifts[1].view(b, 1), w)
        src = (row_of.gather(1, tab_r.index_select(0, sel)) * w
               + col_of.gather(1, tab_c.index_select(0, sel)))
    src = src.view(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(x.reshape(b, c, h * w), 2, src).view(b, c, h, w)

