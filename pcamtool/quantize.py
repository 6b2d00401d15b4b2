"""Static int8 quantization of an exported fp32 graph, judged by validation AUC: ``export --int8``.

onnxruntime's static quantization in QDQ format: weights int8 per output
channel, activations uint8, ranges calibrated (min/max) on a few thousand
training images. The file still takes the same uint8 images: the image
itself is the first quantized tensor (scale 1/255, zero point 0, exact), the
normalization becomes a 1x1 int8 convolution that adds a 4th, all-zero
channel for the stem (:mod:`pcamtool.int8_rewrite`: onnxruntime's int8
convolution has no fast path for 3 input channels). The body is quantized
(:data:`QUANT_OPS`); the pooled head and the sigmoid stay float, so
probabilities are not rounded to 1/255 steps. In a graph whose
normalization does not feed the stem directly, the preprocessing stays float
and strided convolutions on the 3 colour channels too (:func:`thin_convs`).

Weights use 7 bits (``reduce_range``): on CPUs without AVX-512 VNNI,
onnxruntime multiplies uint8 by int8 with ``vpmaddubsw``, whose int16 sums
saturate with full 8-bit weights (onnxruntime's quantization docs); 7-bit
weights keep the same file exact on AVX2 and VNNI machines alike.

The check is what matters for a classifier: the validation AUC of the int8
graph within :data:`AUC_TOLERANCE` of the fp32 graph's on the same rows (the
run's own validation split where it can be rebuilt from the checkpoint), and
probabilities within :data:`PROB_TOLERANCE` of the fp32 ones (and within
:data:`MEAN_TOLERANCE` on average).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .errors import ModelError, PcamError
from .int8_rewrite import INPUT_SCALE, feed_uint8_input, normalization_as_conv, tile_channel_constants
from .onnx_io import INPUT

if TYPE_CHECKING:
    from .train.checkpoint import Checkpoint

log = logging.getLogger("pcamtool")

QUANT_OPS = ("Conv", "Relu", "MaxPool", "Add")   # the body; Cast/Div/Sub, ReduceMean, Gemm, Sigmoid stay float
CALIBRATION_IMAGES = 2048     # training rows whose activation ranges set the scales
CHECK_ROWS = 8192             # at most this many validation rows judge the int8 graph
AUC_TOLERANCE = 0.002         # |AUC int8 - AUC fp32| allowed on those rows (or one swapped pair, if more)
# Probability bounds: the largest and the mean |p_int8 - p_fp32| over the checked rows.
# Measured on trained pcamnet models (1,600 validation rows of a synthetic store):
# max 0.068 / mean 0.0057 (val AUC 0.964) and max 0.035 / mean 0.0037 (AUC 0.940),
# AUC deltas +0.0001; plain4 width 16: max 0.009 / mean 0.0027 on 800 rows. The max
# grows with the rows checked (a rare image near a clipped activation range), so it
# has room; the mean catches a systematically shifted graph (a wrong scale, lost
# normalization); the AUC bound is the real judge.
PROB_TOLERANCE = 0.15
MEAN_TOLERANCE = 0.02
BATCH = 64
PREPROCESSING_INT8 = "uint8 input at scale 1/255, normalization as a 1x1 int8 convolution (3 -> 4 channels)"
PREPROCESSING_FLOAT = "preprocessing and strided colour-channel convolutions in float"


@dataclass(frozen=True)
class Int8Check:
    """How the int8 graph compares with the fp32 one on validation rows."""

    rows: int                 # validation rows checked
    calibration_images: int
    auc_fp32: float
    auc_int8: float
    max_abs_diff: float       # max |p_int8 - p_fp32|
    mean_abs_diff: float
    split: str                # where the rows came from, in words
    preprocessing: str = PREPROCESSING_FLOAT   # how the graph turns the uint8 image into the stem's input

    @property
    def auc_delta(self) -> float:
        return self.auc_int8 - self.auc_fp32

    def metadata(self) -> dict[str, str]:
        """What the ONNX file records about its quantization (strings, per ONNX)."""
        return {"precision": "int8", "int8_scheme": "onnxruntime static QDQ, per-channel int8 (7-bit) weights, "
                f"uint8 activations, min/max calibration; {self.preprocessing}; head in float",
                "int8_calibration_images": str(self.calibration_images), "int8_check_rows": str(self.rows),
                "int8_check_split": self.split, "int8_auc_fp32": f"{self.auc_fp32:.6f}",
                "int8_auc_delta": f"{self.auc_delta:+.6f}", "int8_max_abs_diff": f"{self.max_abs_diff:.6f}",
                "int8_mean_abs_diff": f"{self.mean_abs_diff:.6f}"}


def _rows_for(ck: "Checkpoint", store_path: Path) -> tuple[Any, np.ndarray, Any, np.ndarray, str]:
    """``(store, calibration rows, validation store, validation rows, how)`` for ``store_path``.

    The run's own split when ``store_path`` is the store it trained on
    (:meth:`Checkpoint.split`, the split training made, or its ``--val-store``);
    otherwise a stratified 20% hold-out with the run's seed.

    Raises
    ------
    PcamError
        The run's split cannot be rebuilt: its groups file or validation
        store is gone (a split without the groups would leak slides into
        the check).
    """
    from .io.store import open_store
    from .train.split import make_split

    seed = int(ck.config.get("seed", 0))
    store = open_store(store_path, need_labels=True)
    if not ck.trained_on(store_path):
        tr, va = make_split(store.labels, 0.2, seed)
        return store, np.asarray(tr), store, np.asarray(va), f"a stratified 20% hold-out of {store_path} (seed {seed})"
    val_store_path = ck.config.get("val_store")
    if val_store_path:
        if not Path(val_store_path).exists():
            raise PcamError(f"{val_store_path}: the run's --val-store is not there, and the int8 check "
                            f"validates on it (restore it, or pass another store with --store)")
        val = open_store(val_store_path, need_labels=True)
        return store, np.arange(len(store)), val, np.arange(len(val)), f"the run's --val-store {val_store_path}"
    tr, va = ck.split(store)
    return store, tr, store, va, "the run's validation split"


def _subset(rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most ``n`` of ``rows``, drawn without replacement, sorted (the store reads in order)."""
    if len(rows) <= n:
        return np.sort(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, n, replace=False))


class _Calibration:
    """Batches of uint8 images for onnxruntime's calibrator (the ``CalibrationDataReader`` protocol)."""

    def __init__(self, store: Any, rows: np.ndarray) -> None:
        self.store, self.rows, self.at = store, rows, 0

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self.at >= len(self.rows):
            return None
        batch = self.rows[self.at:self.at + BATCH]
        self.at += BATCH
        return {INPUT: self.store.gather(batch)}

    def rewind(self) -> None:
        self.at = 0


def thin_convs(path: Path) -> list[str]:
    """Names of the strided convolutions on the raw colour channels (3 inputs), which stay float.

    Only a graph that :func:`pcamtool.int8_rewrite.normalization_as_conv`
    could not rewrite still has such a stem (once rewritten, a quantized
    4-channel stem was faster: pcamnet 2.2x fp32 against 1.8x with it
    float). Measured before that rewrite on an idle AVX-512 VNNI CPU (batch 256, int8 over fp32, graphs
    timed in turns in one process, two runs each), all convolutions quantized
    vs this stem kept float: pcamnet (stride-2 stem) 1.63-1.78x vs 1.89-2.02x;
    plain4 (stride-1 stem, then a float 2x2 max-pool) 1.76-1.91x vs
    1.24-1.31x; simple ~2.4x either way. A stride-1 stem kept float leaves
    its full-resolution pooling to run between layout reorders outside
    onnxruntime's fast float path, so only strided stems stay float.
    """
    import onnx

    proto = onnx.load(str(path))
    weights = {t.name: t.dims for t in proto.graph.initializer}

    def strided(node: Any) -> bool:
        return any(s > 1 for a in node.attribute if a.name == "strides" for s in a.ints)

    return [n.name for n in proto.graph.node if n.op_type == "Conv" and len(weights.get(n.input[1], [])) == 4
            and weights[n.input[1]][1] <= 3 and strided(n)]


def quantize_graph(fp32_path: Path, out_path: Path, store: Any, rows: np.ndarray) -> str:
    """Write the int8 QDQ version of the fp32 graph ``fp32_path`` to ``out_path``, calibrated on ``rows``.

    Returns how the graph preprocesses (:data:`PREPROCESSING_INT8` where the
    rewrites of :mod:`pcamtool.int8_rewrite` applied, else
    :data:`PREPROCESSING_FLOAT`), for the metadata.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = _Calibration(store, rows)   # the calibrator only calls get_next()
    with tempfile.TemporaryDirectory(prefix="pcamtool-int8-") as work:
        pre = Path(work) / "pre.onnx"
        # shape inference and graph optimization first, as onnxruntime recommends for static quantization
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        proto = onnx.load(str(pre))
        x01 = normalization_as_conv(proto)
        if x01 is None:   # the float preprocessing stays: make its broadcasts cheap in the int8 layout
            tile_channel_constants(proto)
        onnx.save(proto, str(pre))
        # the image in [0, 1] quantizes exactly at scale 1/255 (calibration might see no white pixel)
        pinned = {x01: [{"scale": np.array(INPUT_SCALE), "zero_point": np.array(0, np.uint8)}]} if x01 else {}
        quantize_static(str(pre), str(out_path), reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANT_OPS), nodes_to_exclude=thin_convs(pre), per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        # MinMax keeps only each batch's reduced min/max, so memory does not grow
                        # with the calibration set (CalibMaxIntermediateOutputs would drop data: ORT 1.31)
                        calibrate_method=CalibrationMethod.MinMax,
                        calibration_providers=["CPUExecutionProvider"],
                        extra_options={"TensorQuantOverrides": pinned} if pinned else {})
    if not x01:
        return PREPROCESSING_FLOAT
    proto = onnx.load(str(out_path))
    if feed_uint8_input(proto, x01):
        onnx.save(proto, str(out_path))
    return PREPROCESSING_INT8


def _predict(session: Any, store: Any, rows: np.ndarray) -> np.ndarray:
    return np.concatenate([session.run(store.gather(rows[s:s + 256])) for s in range(0, len(rows), 256)])


def check_int8(fp32_path: Path, int8_path: Path, val_store: Any, rows: np.ndarray, calibration_images: int,
               how: str, out_name: Path, preprocessing: str = PREPROCESSING_FLOAT) -> Int8Check:
    """Compare the two graphs on the CPU; a ModelError names ``out_name`` when int8 is not good enough."""
    from .evaluate import binary_metrics
    from .onnx_io import open_session

    p32 = _predict(open_session(fp32_path, "cpu", batch_size=256, tta=1), val_store, rows)
    p8 = _predict(open_session(int8_path, "cpu", batch_size=256, tta=1), val_store, rows)
    y = val_store.labels[rows]
    diff = np.abs(p8 - p32)
    res = Int8Check(len(rows), calibration_images, binary_metrics(p32, y)["auc"], binary_metrics(p8, y)["auc"],
                    float(diff.max()), float(diff.mean()), how, preprocessing)
    if not np.isfinite(res.auc_fp32):
        raise ModelError(f"{out_name}: int8 check needs both classes among the {len(rows)} validation rows "
                         f"({how})")
    # On a tiny validation set one swapped pair of near-equal probabilities moves the AUC by
    # 1/(positives x negatives), more than 0.002: such a set allows that one pair.
    n_pos = int(np.count_nonzero(y >= 0.5))
    auc_bound = max(AUC_TOLERANCE, 1.0 / max(n_pos * (len(y) - n_pos), 1) + 1e-12)
    if not (abs(res.auc_delta) <= auc_bound and res.max_abs_diff <= PROB_TOLERANCE
            and res.mean_abs_diff <= MEAN_TOLERANCE):
        raise ModelError(f"{out_name}: int8 graph fails its check on {len(rows)} validation rows ({how}): "
                         f"AUC {res.auc_int8:.4f} vs fp32 {res.auc_fp32:.4f} (allowed +-{auc_bound:.4g}), "
                         f"|p int8 - p fp32| max {res.max_abs_diff:.3f} mean {res.mean_abs_diff:.4f} "
                         f"(allowed {PROB_TOLERANCE}, {MEAN_TOLERANCE}): export refused")
    return res


def quantize_checked(fp32_path: Path, out_tmp: Path, ck: "Checkpoint", store_path: Optional[str | os.PathLike],
                     out_name: Path, calibration_images: int = CALIBRATION_IMAGES,
                     check_rows: int = CHECK_ROWS) -> Int8Check:
    """Quantize ``fp32_path`` into ``out_tmp`` (calibrated on the training store) and check it.

    Parameters
    ----------
    store_path
        Store for calibration and the check; None: the one the checkpoint
        was trained on (recorded in it).
    out_name
        The final file name, for messages.

    Raises
    ------
    PcamError
        No store to calibrate on (int8 needs real images).
    ModelError
        The int8 graph's AUC or probabilities differ from the fp32 graph's
        by more than :data:`AUC_TOLERANCE` / :data:`PROB_TOLERANCE` /
        :data:`MEAN_TOLERANCE`.
    """
    path = store_path or ck.store_path
    if not path or not Path(path).exists():
        raise PcamError(f"{out_name}: --int8 calibrates on the training store, and "
                        f"{path or 'the checkpoint names none'} is not there (give one with --store)")
    store, train_rows, val_store, val_rows, how = _rows_for(ck, Path(path))
    seed = int(ck.config.get("seed", 0))
    calib = _subset(train_rows, calibration_images, seed)
    rows = _subset(val_rows, check_rows, seed + 1)
    log.info("int8: calibrating on %d training images, checking on %d validation rows (%s)", len(calib),
             len(rows), how)
    preprocessing = quantize_graph(fp32_path, out_tmp, store, calib)
    return check_int8(fp32_path, out_tmp, val_store, rows, len(calib), how, out_name, preprocessing)
