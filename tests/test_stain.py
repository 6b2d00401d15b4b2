"""Stain normalization: jitted kernel == plain-Python kernel == numpy formulas; blank patches pass."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from pcamtool.errors import PcamError
from pcamtool.kernels import plain
from pcamtool.kernels import stain as K
from pcamtool.kernels.stats import lerp_quantile, percentile_pairs
from pcamtool.stain import StainReference, fit_reference, normalize

from helpers import REAL
from oracles import macenko_numpy, reinhard_numpy

NUMPY = {"reinhard": reinhard_numpy, "macenko": macenko_numpy}
KERNEL = {"reinhard": K.reinhard_batch, "macenko": K.macenko_batch}


def he_patch(seed: int, h_vec=(0.65, 0.70, 0.29), e_vec=(0.07, 0.99, 0.11)) -> np.ndarray:
    """A Beer-Lambert H&E-like patch: blobs of hematoxylin on an eosin background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:96, :96]
    h = np.zeros((96, 96))
    for _ in range(25):
        cy, cx, r = rng.uniform(0, 96), rng.uniform(0, 96), rng.uniform(2, 6)
        h += 1.2 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    e = 0.4 + 0.3 * rng.random((96, 96))
    od = h[..., None] * np.array(h_vec) + e[..., None] * np.array(e_vec)
    rgb = 255 * np.exp(-od) + rng.normal(0, 2, od.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    imgs = [he_patch(i) for i in range(6)]
    if (REAL / "train").is_dir():
        files = sorted((REAL / "train").glob("*.tif"))[:40]
        imgs += [tifffile.imread(f) for f in files]
    return np.stack(imgs)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_kernel_matches_plain_python_and_numpy(patches, method):
    ref = fit_reference(patches, method)
    got = normalize(patches, ref)
    assert got.shape == patches.shape and got.dtype == np.uint8
    for img, g in zip(patches[:8], got[:8]):
        want = NUMPY[method](img, ref)
        assert np.abs(g.astype(int) - want).max() <= 1
    # the same kernel source, not jitted, on one patch
    from pcamtool.stain import _kernel_args

    _, args = _kernel_args(ref)
    out = np.empty_like(patches[:1])
    plain(KERNEL[method])(patches[:1], *args, out, np.zeros(1, np.bool_))
    assert np.abs(out[0].astype(int) - got[0]).max() <= 1


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_blank_patches_pass_unchanged(patches, method):
    ref = fit_reference(patches, method)
    blank = np.full((3, 96, 96, 3), 240, np.uint8)
    blank[1] = 0  # black
    blank[2, :2, :2] = 100  # a speck of tissue on glass
    out = normalize(blank, ref)
    assert np.array_equal(out, blank)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("flavour", ["jit", "plain"])
def test_fast_log_exp_within_stated_bounds(flavour):
    """The float32 approximations the Reinhard and Macenko kernels use, against float64 numpy."""
    log, exp = (K.fast_log, K.fast_exp) if flavour == "jit" else (plain(K.fast_log), plain(K.fast_exp))
    step = 1 if flavour == "jit" else 50  # plain Python is slow
    x = np.geomspace(2.0 ** -10, 2.0 ** 10, 200_001).astype(np.float32)[::step]
    x = np.concatenate([x, np.arange(1, 256, dtype=np.float32) / np.float32(255)])  # LMS of grey pixels
    got = np.array([log(v) for v in x], np.float64)
    assert np.abs(got - np.log(x.astype(np.float64))).max() < 1e-6
    y = np.linspace(-87.0, 88.0, 200_001).astype(np.float32)[::step]
    got = np.array([exp(v) for v in y], np.float64)
    assert np.abs(got / np.exp(y.astype(np.float64)) - 1.0).max() < 3e-7
    # outside the clamp: finite, saturated
    assert 0.0 < exp(np.float32(-1e4)) < 1e-37 and 1e38 < exp(np.float32(1e4)) < np.inf


def test_pseudo_angle_orders_as_atan2_and_inverts():
    rng = np.random.default_rng(1)
    xy = rng.normal(size=(5000, 2))
    xy[:8] = [[1, 0], [-1, 0], [0, 1], [0, -1], [-1, 1e-300], [-1, -1e-300], [1, -1e-300], [0, 0]]
    p = np.array([K._pseudo_angle(x, y) for x, y in xy])
    a = np.arctan2(xy[:, 1], xy[:, 0])
    assert ((p >= -2) & (p <= 2)).all()
    # sorted by pseudo-angle, the angles come out sorted (a pseudo-angle tie may swap angles
    # that differ by less than float64 resolution of the pseudo-angle, ~1e-16)
    assert np.abs(a[np.argsort(p)] - np.sort(a)).max() < 1e-15
    assert np.abs(np.array([K._angle(v) for v in p]) - a).max() < 1e-14


@pytest.mark.parametrize("case", ["normal", "ties", "filler", "narrow", "outside"])
def test_percentile_pairs_match_np_percentile(case):
    rng = np.random.default_rng(2)
    a = rng.normal(size=9216)
    lo, hi = -4.0, 4.0
    if case == "ties":
        a = np.round(a, 1)
    elif case == "narrow":  # all values in one bin
        a = 0.5 + 1e-12 * a
    elif case == "outside":  # bin range narrower than the values: still exact
        lo, hi = -0.1, 0.2
    sample = a.copy()
    count = a.size
    if case == "filler":  # inf marks pixels outside the sample
        a[rng.random(a.size) < 0.4] = np.inf
        sample = a[np.isfinite(a)]
        count = sample.size
    qs = np.array([0.01, 0.5, 0.99])
    below, above, t = percentile_pairs(a, count, lo, hi, qs)
    got = [lerp_quantile(b, c, g) for b, c, g in zip(below, above, t)]
    assert np.array_equal(got, np.percentile(sample, 100 * qs))


def test_estimators_match_numpy_formulas(patches):
    """Reference statistics from the kernels' estimators vs the same formulas in float64 numpy."""
    pixels = patches.reshape(-1, 3)[::7].copy()
    mean, std, ok = K.lab_stats(pixels)
    rgb = pixels.astype(np.float64)
    lab = np.log10(np.maximum(rgb @ K.RGB2LMS.T, K.LMS_FLOOR)) @ K.LMS2LAB.T
    lab = lab[rgb.mean(1) <= K.TISSUE_MAX_MEAN]
    assert ok
    assert np.abs(mean - lab.mean(0)).max() < 1e-6 and np.abs(std / lab.std(0) - 1).max() < 1e-4
    he, max_c, ok = K.macenko_estimate(pixels)
    od = -np.log((rgb + 1.0) / 256.0)
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0].T
    assert ok
    assert np.allclose(max_c, np.percentile(conc, 99, axis=0), rtol=1e-12)
    assert np.allclose((he ** 2).sum(0), 1.0) and he[0, 0] > he[0, 1]


def test_fit_reference_needs_uint8(patches):
    with pytest.raises(PcamError, match="uint8"):
        fit_reference(patches.astype(np.float64), "reinhard")


def _stain_distance(a: StainReference, b: StainReference) -> float:
    return sum(float(np.abs(np.asarray(a.params[k]) - np.asarray(b.params[k])).sum()) for k in a.params)


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_normalizing_moves_stain_toward_reference(method):
    ref_imgs = np.stack([he_patch(i) for i in range(6)])
    shifted = np.stack([he_patch(10 + i, h_vec=(0.45, 0.80, 0.35), e_vec=(0.20, 0.90, 0.25)) for i in range(6)])
    ref = fit_reference(ref_imgs, method)
    out = normalize(shifted, ref, workers=2)
    # measured the way the reference was: the normalized batch's own stain statistics
    before = _stain_distance(fit_reference(shifted, method), ref)
    after = _stain_distance(fit_reference(out, method), ref)
    assert after < 0.5 * before


def test_reference_round_trip_and_errors(patches):
    for method in ("reinhard", "macenko"):
        ref = fit_reference(patches, method)
        again = StainReference.from_dict(ref.to_dict())
        assert again == ref
        assert np.array_equal(normalize(patches[:3], again), normalize(patches[:3], ref))
    with pytest.raises(PcamError, match="no tissue"):
        fit_reference(np.full((4, 96, 96, 3), 245, np.uint8), "macenko")
    with pytest.raises(PcamError, match="no tissue"):
        fit_reference(np.full((4, 96, 96, 3), 245, np.uint8), "reinhard")
    with pytest.raises(PcamError, match="unknown stain method"):
        fit_reference(patches, "vahadane")
    with pytest.raises(PcamError, match="unknown stain method"):
        StainReference("foo")


def test_workers_give_the_same_result(patches):
    ref = fit_reference(patches, "macenko")
    assert np.array_equal(normalize(patches, ref, workers=1), normalize(patches, ref, workers=2))


@pytest.mark.slow
def test_stain_metadata_round_trip_pack_train_export_infer(tmp_path):
    """The reference recorded at pack time reaches infer, which normalizes test tifs the same way."""
    import onnx

    from pcamtool import open_store, pack
    from pcamtool.export import export_onnx
    from pcamtool.infer import predict
    from pcamtool.train.loop import fit

    from helpers import write_kaggle
    from test_train import tiny

    ids, images, y = write_kaggle(tmp_path, n=48)
    for i, img in zip(ids, images):  # tissue-like patches so the reference can be fitted
        tifffile.imwrite(tmp_path / "train" / f"{i}.tif", he_patch(int(i[:6], 16) % 1000), photometric="rgb")
    store = pack(tmp_path / "train", stain="macenko", progress=False).path
    recorded = open_store(store).stain()
    assert recorded["method"] == "macenko" and len(recorded["stain_matrix"]) == 2
    run = fit(tiny(store, tmp_path / "run", epochs=1), progress=False).run_dir
    model = export_onnx(run).path
    meta = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert '"macenko"' in meta["stain"]
    write_kaggle(tmp_path, n=6, seed=9, split="test", labels=False)
    for f in (tmp_path / "test").glob("*.tif"):
        tifffile.imwrite(f, he_patch(7, h_vec=(0.45, 0.80, 0.35)), photometric="rgb")
    from_folder = predict(tmp_path / "test", [model], tta=1, progress=False)
    test_store = pack(tmp_path / "test", stain="macenko", stain_reference=store, progress=False).path
    assert open_store(test_store).stain() == recorded  # same reference: the train store's
    from_store = predict(test_store, [model], tta=1, progress=False)
    assert np.allclose(from_folder.probs, from_store.probs, atol=1e-6)
    other = pack(tmp_path / "test", out=tmp_path / "r.h5", stain="reinhard", progress=False).path
    with pytest.raises(PcamError, match="stain normalization 'reinhard'"):
        predict(other, [model], tta=1, progress=False)
