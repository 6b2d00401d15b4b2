"""The fast reader gives tifffile's pixels for every TIFF variant and names bad files."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from pcamtool.errors import BadImageError
from pcamtool.kernels import plain
from pcamtool.kernels.decode import FALLBACK, OK, decode_tiff
from pcamtool.io.tiff import iter_batches, read_into, read_patch

from helpers import random_patches

VARIANTS = {
    "kaggle": dict(photometric="rgb"),
    "big_endian": dict(photometric="rgb", byteorder=">"),
    "many_strips": dict(photometric="rgb", rowsperstrip=7),
    "deflate": dict(photometric="rgb", compression="zlib"),
    "deflate_predictor": dict(photometric="rgb", compression="zlib", predictor=True),
    "tiled": dict(photometric="rgb", tile=(32, 32)),
    "packbits": dict(photometric="rgb", compression="packbits"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_pixel_exact(tmp_path, variant):
    img = random_patches(1, seed=3)[0]
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, img, **VARIANTS[variant])
    assert np.array_equal(read_patch(path), tifffile.imread(path))
    assert np.array_equal(read_patch(path), img)


def test_pil_written(tmp_path):
    img = random_patches(1, seed=4)[0]
    for comp in (None, "tiff_lzw", "tiff_adobe_deflate"):
        path = tmp_path / f"pil_{comp}.tif"
        Image.fromarray(img).save(path, compression=comp)
        assert np.array_equal(read_patch(path), img), comp


def test_fast_path_taken_for_kaggle_layout(tmp_path):
    img = random_patches(1, seed=5)[0]
    path = tmp_path / "k.tif"
    tifffile.imwrite(path, img, photometric="rgb")
    data = np.frombuffer(path.read_bytes(), np.uint8)
    out = np.empty((96, 96, 3), np.uint8)
    assert decode_tiff(data, data.size, out) == OK
    assert np.array_equal(out, img)
    out2 = np.zeros_like(out)
    assert plain(decode_tiff)(data, data.size, out2) == OK  # the same source, not jitted
    assert np.array_equal(out2, img)
    # compressed: the fast path declines rather than guessing
    tifffile.imwrite(path, img, photometric="rgb", compression="zlib")
    data = np.frombuffer(path.read_bytes(), np.uint8)
    assert decode_tiff(data, data.size, out) == FALLBACK


def test_real_files_pixel_exact(real_dir):
    files = sorted((real_dir / "train").glob("*.tif"))[:300]
    out = np.empty((len(files), 96, 96, 3), np.uint8)
    errors = read_into([str(f) for f in files], out)
    assert all(e is None for e in errors)
    for f, img in zip(files, out):
        assert np.array_equal(img, tifffile.imread(f))


@pytest.mark.parametrize("case,expect", [
    ("garbage", "not a readable TIFF"),
    ("truncated", "not a readable TIFF"),
    ("empty", "empty file"),
    ("small", "64x64x3 uint8, expected 96x96x3"),
    ("gray", "96x96 uint8, expected 96x96x3"),
    ("uint16", "96x96x3 uint16"),
    ("png", "not a readable TIFF"),
])
def test_bad_files_named(tmp_path, case, expect):
    path = tmp_path / f"{case}.tif"
    img = random_patches(1)[0]
    if case == "garbage":
        path.write_bytes(b"hello, not an image" * 100)
    elif case == "truncated":
        tifffile.imwrite(path, img, photometric="rgb")
        path.write_bytes(path.read_bytes()[:5000])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "small":
        tifffile.imwrite(path, img[:64, :64], photometric="rgb")
    elif case == "gray":
        tifffile.imwrite(path, img[..., 0])
    elif case == "uint16":
        tifffile.imwrite(path, img.astype(np.uint16) * 200, photometric="rgb")
    elif case == "png":
        Image.fromarray(img).save(path, format="PNG")
    with pytest.raises(BadImageError) as info:
        read_patch(path)
    assert str(path) in str(info.value)
    assert expect in str(info.value)
    assert isinstance(info.value, ValueError)  # one family, catchable as ValueError


def test_iter_batches_in_order_with_errors(tmp_path):
    imgs = random_patches(23, seed=9)
    paths = []
    for i, img in enumerate(imgs):
        p = tmp_path / f"{i:03d}.tif"
        tifffile.imwrite(p, img, photometric="rgb")
        paths.append(str(p))
    (tmp_path / "007.tif").write_bytes(b"broken")
    got, errs = [], []
    for b in iter_batches(paths, batch_size=5, workers=2):
        got.append(b.images)
        errs.extend(b.errors)
    got = np.concatenate(got)
    ok = [i for i in range(23) if i != 7]
    assert np.array_equal(got[ok], imgs[ok])
    assert [i for i, e in enumerate(errs) if e is not None] == [7]


@pytest.mark.parametrize("reuse", [False, True])
def test_iter_batches_stats_and_reuse(tmp_path, reuse):
    """``stats`` sums exactly the readable images (fast path and tifffile fallback alike);
    ``reuse`` recycles arrays without mixing up batches."""
    imgs = random_patches(23, seed=11)
    paths = []
    for i, img in enumerate(imgs):
        p = tmp_path / f"{i:03d}.tif"
        kw = dict(compression="zlib") if i % 4 == 1 else {}  # some go through tifffile
        tifffile.imwrite(p, img, photometric="rgb", **kw)
        paths.append(str(p))
    (tmp_path / "007.tif").write_bytes(b"broken")
    got, errs = [], []
    sums, sqsums = np.zeros(3, np.uint64), np.zeros(3, np.uint64)
    for b in iter_batches(paths, batch_size=4, workers=2, stats=True, reuse=reuse):
        got.append(b.images.copy())  # with reuse the array is only ours until the next batch
        errs.extend(b.errors)
        sums += b.sums
        sqsums += b.sqsums
    got = np.concatenate(got)
    ok = [i for i in range(23) if i != 7]
    assert np.array_equal(got[ok], imgs[ok])
    assert [i for i, e in enumerate(errs) if e is not None] == [7]
    ref = imgs[ok].reshape(-1, 3).astype(np.uint64)
    assert np.array_equal(sums, ref.sum(0))
    assert np.array_equal(sqsums, (ref * ref).sum(0))


def _mixed_folder(tmp_path):
    """Kaggle-layout files interleaved with every way a file can leave that layout."""
    imgs = random_patches(13, seed=21)
    specs = ["kaggle", "kaggle", "pil", "kaggle", "truncated", "kaggle", "trailing", "kaggle",
             "big_endian", "missing", "directory", "deflate", "kaggle"]
    paths = []
    for i, (spec, img) in enumerate(zip(specs, imgs)):
        p = tmp_path / f"{i:02d}_{spec}.tif"
        if spec == "pil":
            Image.fromarray(img).save(p)
        elif spec == "big_endian":
            tifffile.imwrite(p, img, photometric="rgb", byteorder=">")
        elif spec == "directory":
            p.mkdir()
        elif spec == "deflate":  # through tifffile
            tifffile.imwrite(p, img, photometric="rgb", compression="zlib")
        elif spec != "missing":
            tifffile.imwrite(p, img, photometric="rgb")
            if spec == "truncated":
                p.write_bytes(p.read_bytes()[:20000])
            elif spec == "trailing":  # same header, but more after the pixels
                p.write_bytes(p.read_bytes() + b"\0" * 16)
        paths.append(str(p))
    return paths, imgs, specs


def test_native_reader_matches_python_reader(tmp_path, monkeypatch):
    """The in-kernel reader (libc calls, header-guided direct reads) gives the
    Python reader's pixels, errors and statistics, file by file."""
    import pcamtool.io.tiff as T

    from pcamtool.kernels import ENABLED

    if not ENABLED:
        pytest.skip("PCAMTOOL_NUMBA=0: kernels cannot call C, only the Python reader runs")
    assert T.NATIVE_IO  # POSIX with numba on: the path every pack takes
    paths, imgs, specs = _mixed_folder(tmp_path)
    results = []
    for native in (True, False):
        monkeypatch.setattr(T, "NATIVE_IO", native)
        out = np.zeros((len(paths), 96, 96, 3), np.uint8)
        s, q = np.zeros(3, np.uint64), np.zeros(3, np.uint64)
        errors = T.read_into(paths, out, sums=s, sqsums=q)
        results.append((out, [None if e is None else str(e) for e in errors], s, q))
    (out, errors, s, q), (out_py, errors_py, s_py, q_py) = results
    assert errors == errors_py
    bad = {"truncated", "missing", "directory"}
    assert [e is not None for e in errors] == [spec in bad for spec in specs]
    assert "No such file" in errors[specs.index("missing")]
    assert "directory" in errors[specs.index("directory")].lower()
    good = [i for i, spec in enumerate(specs) if spec not in bad]
    assert np.array_equal(out[good], imgs[good]) and np.array_equal(out_py[good], imgs[good])
    ref = imgs[good].reshape(-1, 3).astype(np.uint64)
    assert np.array_equal(s, ref.sum(0)) and np.array_equal(q, (ref * ref).sum(0))
    assert np.array_equal(s, s_py) and np.array_equal(q, q_py)
    # The direct path's check: a Kaggle-layout header alone places the pixels
    # right after it and the file ends with them; other layouts do not pass.
    from pcamtool.kernels.decode import pixel_offset

    data = np.frombuffer(open(paths[0], "rb").read(), np.uint8)
    off = pixel_offset(data, data.size)
    assert off > 0 and off + 96 * 96 * 3 == data.size
    assert pixel_offset(data[:off].copy(), off) == off
    tail = np.frombuffer(open(paths[specs.index("trailing")], "rb").read(), np.uint8)
    assert pixel_offset(tail, tail.size) == off and off + 96 * 96 * 3 < tail.size  # read whole instead
