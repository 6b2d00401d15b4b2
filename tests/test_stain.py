"""Stain normalization: jitted kernel == plain-Python kernel == numpy formulas; blank patches pass."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from pcamtool.errors import PcamError
from pcamtool.kernels import plain
from pcamtool.kernels import stain as K
from pcamtool.stain import StainReference, fit_reference, macenko_numpy, normalize, reinhard_numpy

from helpers import REAL

NUMPY = {"reinhard": reinhard_numpy, "macenko": macenko_numpy}
KERNEL = {"reinhard": K.reinhard_image, "macenko": K.macenko_image}


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
    out = np.empty_like(patches[0])
    plain(KERNEL[method])(patches[0], *args, out)
    assert np.abs(out.astype(int) - got[0]).max() <= 1


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_blank_patches_pass_unchanged(patches, method):
    ref = fit_reference(patches, method)
    blank = np.full((3, 96, 96, 3), 240, np.uint8)
    blank[1] = 0  # black
    blank[2, :2, :2] = 100  # a speck of tissue on glass
    out = normalize(blank, ref)
    assert np.array_equal(out, blank)
    assert np.isfinite(out).all()


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


def test_stain_metadata_round_trip_pack_train_export_infer(tmp_path):
    """The reference recorded at pack time reaches infer, which normalizes test tifs the same way."""
    import onnx

    from pcamtool import open_store, pack
    from pcamtool.export import export_onnx
    from pcamtool.infer import predict
    from pcamtool.train import fit

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
