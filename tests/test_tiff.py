"""The fast reader gives tifffile's pixels for every TIFF variant and names bad files."""
from __future__ import annotations

import os

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


# ---------------------------------------------------------------- hostile files (issue 14)

def _kaggle_tif(**tags) -> bytes:
    """A Kaggle-layout tif (one little-endian IFD of 15 entries at offset 8) with some entries changed.

    ``tags`` maps ``t<number>`` to ``(type, count, value)``; None keeps that part.
    """
    import struct

    from pcamtool.synth.kaggle_tiff import encode_tiff

    data = bytearray(encode_tiff(random_patches(1, seed=8)[0]))
    for e in range(15):
        p = 10 + 12 * e
        tag, typ, count = struct.unpack_from("<HHI", data, p)
        if f"t{tag}" in tags:
            new_typ, new_count, value = tags[f"t{tag}"]
            typ = typ if new_typ is None else new_typ
            struct.pack_into("<HI", data, p + 2, typ, count if new_count is None else new_count)
            if value is not None:
                struct.pack_into("<HH" if typ == 3 else "<I", data, p + 8, *((value, 0) if typ == 3 else (value,)))
    return bytes(data)


def test_huge_declared_image_refused_before_decoding(tmp_path):
    """A 460 KB file declaring 12000x12000x3 costs kilobytes, not its declared 432 MB."""
    import tracemalloc

    path = tmp_path / "huge.tif"
    path.write_bytes(_kaggle_tif(t256=(None, None, 12000), t257=(None, None, 12000),
                                 t279=(None, None, 12000 * 12000 * 3)) + bytes(440_000))
    tracemalloc.start()
    try:
        with pytest.raises(BadImageError, match="image is 12000x12000x3 uint8, expected 96x96x3 uint8"):
            read_patch(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6


@pytest.mark.parametrize("tags,expect", [
    (dict(t256=(99, None, None)), "damaged image directory (tag 256: invalid data type 99)"),
    (dict(t258=(12, None, None)), "image is 96x96x3 float64, expected 96x96x3 uint8"),
    (dict(t339=(None, None, 3)), "image is 96x96x3 float64, expected 96x96x3 uint8"),
    (dict(t277=(None, None, 1)), "image is 96x96x1 uint8, expected 96x96x3 uint8"),
    (dict(t259=(None, None, 7)), "pixel data cannot be decoded (Not a JPEG file"),
    (dict(t256=(None, None, 0)), "not a readable TIFF (damaged image directory"),
    (dict(t279=(None, None, 4 * 27648), t256=(None, None, 192)), "image is 96x192x3 uint8"),
    (dict(t258=(1, None, None)), "expected 96x96x3 uint8"),
])
def test_crafted_ifd_named_in_user_terms_without_log_lines(tmp_path, capfd, caplog, tags, expect):
    """A crafted IFD gets one line saying what is wrong; tifffile's log lines and warnings reach nobody."""
    import warnings

    path = tmp_path / "crafted.tif"
    path.write_bytes(_kaggle_tif(**tags))
    with pytest.raises(BadImageError) as info, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_patch(path)
    assert not [str(w.message) for w in caught]
    assert expect in str(info.value) and str(path) in str(info.value)
    assert "image is 0" not in str(info.value)
    assert capfd.readouterr().err == ""
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]


def test_whatever_tifffile_logs_or_warns_stays_in_the_message(tmp_path, monkeypatch, capfd):
    """Fuzzing found tifffile's numpy arithmetic warning on stderr (overflow on crafted BitsPerSample
    values): a read contains tifffile's warnings and log lines, and the log says what went wrong."""
    import logging
    import warnings

    class Crafted:
        def __init__(self, path):
            np.uint16(8) - np.uint16(16)  # what tifffile's tag arithmetic does on such values
            logging.getLogger("tifffile").error("<tifffile.TiffTag 258 @34> invalid value")
            raise IndexError("tuple index out of range")

    monkeypatch.setattr(tifffile, "TiffFile", Crafted)
    path = tmp_path / "crafted.tif"
    path.write_bytes(b"II*\0" + bytes(100))
    with pytest.raises(BadImageError, match=r"damaged image directory \(tag 258: invalid value\)"), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_patch(path)
    assert not caught and capfd.readouterr().err == ""


@pytest.mark.parametrize("native", [True, False])
def test_unreadable_entries_are_listed_and_named(tmp_path, monkeypatch, native):
    """A broken symlink, a folder or a FIFO named x.tif is a bad image with its reason, never dropped."""
    import pcamtool.io.tiff as T

    if native and not T.NATIVE_IO:
        pytest.skip("kernels cannot call C here")
    monkeypatch.setattr(T, "NATIVE_IO", native)
    img = random_patches(1, seed=2)[0]
    tifffile.imwrite(tmp_path / "good.tif", img, photometric="rgb")
    (tmp_path / "gone.tif").symlink_to(tmp_path / "nowhere.tif")
    (tmp_path / "dir.tif").mkdir()
    os.mkfifo(tmp_path / "pipe.tif")  # opening it for reading must not block
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    listing = T.list_tifs(tmp_path)
    assert listing.ids == ["dir", "gone", "good", "pipe"] and listing.others == ["notes.txt"]
    out = np.zeros((4, 96, 96, 3), np.uint8)
    errors = T.read_into(listing.paths, out)
    assert errors[2] is None and np.array_equal(out[2], img)
    assert "is a directory" in str(errors[0]) and "dir.tif" in str(errors[0])
    assert "broken symbolic link" in str(errors[1]) and "gone.tif" in str(errors[1])
    assert "not a regular file" in str(errors[3]) and "pipe.tif" in str(errors[3])


# ---------------------------------------------------------------- the fast path declines what it cannot be sure of

def _decode_status(data: bytes) -> int:
    buf = np.frombuffer(data, np.uint8).copy()
    return decode_tiff(buf, buf.size, np.empty((96, 96, 3), np.uint8))


@pytest.mark.parametrize("case", ["bits_count_0", "bits_count_2", "width_count_0", "fill_order_2", "duplicate_strips",
                                  "strip_offset_0"])
def test_fast_path_declines_ambiguous_tags(tmp_path, case):
    """Each of these once decoded where tifffile reads otherwise (or not at all); now tifffile decides."""
    import struct

    if case == "duplicate_strips":  # entry 0 (NewSubfileType) becomes a second StripOffsets, 100 bytes later
        data = bytearray(_kaggle_tif())
        struct.pack_into("<HHII", data, 10, 273, 4, 1, 387)
        data = bytes(data)
    elif case == "fill_order_2":  # entry 0 becomes FillOrder = 2 (bits reversed in every byte)
        data = bytearray(_kaggle_tif())
        struct.pack_into("<HHIHH", data, 10, 266, 3, 1, 2, 0)
        data = bytes(data)
    else:
        data = _kaggle_tif(**{"bits_count_0": dict(t258=(None, 0, None)), "bits_count_2": dict(t258=(None, 2, None)),
                              "width_count_0": dict(t256=(None, 0, None)),
                              "strip_offset_0": dict(t273=(None, None, 0))}[case])  # found by the fuzz test
    assert _decode_status(data) == FALLBACK
    path = tmp_path / f"{case}.tif"
    path.write_bytes(data)
    try:
        theirs = tifffile.imread(path)
    except Exception:  # noqa: BLE001 - tifffile refusing it is one acceptable outcome
        with pytest.raises(BadImageError):
            read_patch(path)
    else:
        if theirs.shape == (96, 96, 3) and theirs.dtype == np.uint8:
            assert np.array_equal(read_patch(path), theirs)


def test_huge_bits_per_sample_count_does_not_hang(tmp_path):
    """BitsPerSample with 2**31 values once looped over all of them (30 s jitted, hours in plain Python)."""
    import subprocess
    import sys

    path = tmp_path / "bits.tif"
    path.write_bytes(_kaggle_tif(t258=(None, 2 ** 31 - 1, None)))
    code = ("import sys, numpy as np; from pcamtool.kernels.decode import decode_tiff; "
            "b = np.fromfile(sys.argv[1], np.uint8); print(decode_tiff(b, b.size, np.empty((96, 96, 3), np.uint8)))")
    env = {**os.environ, "PCAMTOOL_NUMBA": "0"}  # plain Python: a loop over the count could never finish
    done = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == str(FALLBACK)
