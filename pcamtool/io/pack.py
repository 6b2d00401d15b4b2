"""Pack a folder of tifs into one store: ``pcamtool pack data/train``.

Reads every ``.tif`` in the folder (fast path + tifffile fallback, on worker
threads), takes labels from ``<folder>_labels.csv`` beside it when present,
and writes ``<folder>.h5`` through a temporary name, computing the exact
channel statistics with a numba kernel on the way. Ctrl-C stops it between
two batches, leaving nothing behind; so does a kill, but for the temporary
file, which the next run removes.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from .. import __version__
from .csvio import read_labels
from .sources import labels_beside, named_folder
from ..system import cpu_threads
from ..errors import BadImageError, ImageFolderError, Interrupted, LabelsError, PcamError, few
from .fsutil import atomic_path, check_writable, deferred_interrupt, utf8_ok
from ..kernels.stats import channel_sums
from ..progress import progress_bar
from .store import COMPRESSIONS, FORMAT, FORMAT_VERSION, StoreWriter, channel_stats
from .tiff import iter_batches, list_tifs, read_into

log = logging.getLogger("pcamtool")

BatchTransform = Callable[[np.ndarray], np.ndarray]

# Images decoded per batch. Batches are written straight on (into whatever
# chunks they cover), so they need not match the chunks; small ones keep the
# recycled batch arrays (1.7 MiB) in cache between the decode and the write.
DECODE_BATCH = 64


@dataclass(frozen=True)
class PackResult:
    """What a pack wrote."""

    path: Path
    count: int
    n_positive: int
    n_unlabelled: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0


def default_store_path(src: Path) -> Path:
    """``data/train`` packs to ``data/train.h5``; ``.`` inside ``data/train`` too."""
    folder = named_folder(src)
    if not folder.name:
        raise ImageFolderError(f"{src}: has no name to call the store after; give one with -o")
    return folder.parent / f"{folder.name}.h5"


def _refuse_undecodable(tifs: list[str], stems: list[str], skip_bad: bool,
                        skipped: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Files whose names are not valid UTF-8 cannot be ids in a store: fail, or skip with ``skip_bad``."""
    bad = [i for i, s in enumerate(stems) if not utf8_ok(s)]
    if not bad:
        return tifs, stems
    problem = "file name is not valid UTF-8 (rename it)"

    def shown(path: str) -> str:  # the name's bytes, escaped where not ASCII: printable anywhere
        return str(os.fsencode(path))[2:-1]

    if not skip_bad:
        raise BadImageError(shown(tifs[bad[0]]), problem)
    skipped.extend((shown(tifs[i]), problem) for i in bad)
    drop = set(bad)
    return [t for i, t in enumerate(tifs) if i not in drop], [s for i, s in enumerate(stems) if i not in drop]


def _match_labels(src: Path, tifs: list[str], stems: list[str], labels: dict[str, int],
                  labels_path: Path, skip_bad: bool, skipped: list[tuple[str, str]]
                  ) -> tuple[list[str], list[str], np.ndarray]:
    """Pair images with labels; mismatches are errors (or skipped with ``skip_bad``)."""
    have = set(stems)
    orphans = sorted(k for k in labels if k not in have)
    unlabelled = [i for i, s in enumerate(stems) if s not in labels]
    if unlabelled:
        if not skip_bad:
            raise LabelsError(f"{labels_path}: no label row for {len(unlabelled)} image(s) in {src}: "
                              f"{few([os.path.basename(tifs[i]) for i in unlabelled])}")
        skipped.extend((tifs[i], "no label row") for i in unlabelled)
        kept = [i for i, s in enumerate(stems) if s in labels]
        tifs, stems = [tifs[i] for i in kept], [stems[i] for i in kept]
    if orphans:
        msg = f"{labels_path}: {len(orphans)} label row(s) have no image in {src}: {few(orphans)}"
        if not skip_bad:
            raise LabelsError(msg)
        log.warning("%s (ignored)", msg)
    return tifs, stems, np.array([labels[s] for s in stems], np.int8)


def pack(src: str | os.PathLike, labels: Optional[str | os.PathLike] = None,
         out: Optional[str | os.PathLike] = None, workers: Optional[int] = None,
         chunk: int = 512, compression: str = "none", skip_bad: bool = False,
         force: bool = False, stain: str = "none", stain_reference: Optional[str | os.PathLike] = None,
         transform: Optional[BatchTransform] = None, progress: bool = True) -> PackResult:
    """Pack the tifs of ``src`` into an HDF5 store.

    Parameters
    ----------
    src
        Folder of ``<id>.tif`` files (Kaggle layout).
    labels
        ``id,label`` CSV; default ``<src>_labels.csv`` beside ``src`` if present,
        else the store is unlabelled (labels -1).
    out
        Store path; default ``<src>.h5`` beside ``src``.
    workers
        Decoding threads (default: the usable cores).
    chunk
        Rows per HDF5 chunk. Files are decoded ``DECODE_BATCH`` at a time
        whatever the chunk: batches are written into the chunks they cover.
    compression
        ``none`` (memory-mappable, fastest to train from), ``lzf`` or ``gzip``.
    skip_bad
        Skip unreadable or mismatched files (listed in the store) instead of failing.
    force
        Replace an existing store. The store is written under a temporary
        name and renamed at the end (:func:`~pcamtool.io.fsutil.atomic_path`):
        a second pack to the same store is refused while this one runs.
    stain
        ``none``, ``reinhard`` or ``macenko``: normalize every patch toward a
        reference computed from (a sample of) this folder, or from
        ``stain_reference`` (a store); the method and reference are recorded
        in the store, and models trained on it carry them to ``infer``.
    transform
        A further hook applied to every decoded uint8 batch before it is
        written (after stain normalization).

    Raises
    ------
    PcamError
        Bad folder, labels or images (the message names the file), an
        output that exists, is being written, or cannot be written.
    Interrupted
        Ctrl-C (nothing was written).
    """
    t0 = time.perf_counter()
    src = Path(src)
    if not src.exists():
        raise ImageFolderError(f"{src}: folder not found")
    if not src.is_dir():
        raise ImageFolderError(f"{src}: not a folder of tifs")
    if compression not in COMPRESSIONS:
        raise PcamError(f"unknown compression {compression!r} (choose from {', '.join(COMPRESSIONS)})")
    if chunk < 1:
        raise PcamError(f"--chunk must be at least 1, got {chunk}")
    out_path = Path(out) if out is not None else default_store_path(src)
    check_writable(out_path, force)

    listing = list_tifs(src)
    if listing.others:
        log.warning("%s: ignoring %d non-tif file(s): %s", src, len(listing.others), few(listing.others))
    if not listing.paths:
        raise ImageFolderError(f"{src}: no .tif files found")
    skipped: list[tuple[str, str]] = []
    # listed sorted by id: the store's row order
    tifs, stems = _refuse_undecodable(listing.paths, listing.ids, skip_bad, skipped)
    labels_path = Path(labels) if labels is not None else labels_beside(src)
    if labels is not None or labels_path.exists():
        table = read_labels(labels_path)
        tifs, stems, y = _match_labels(src, tifs, stems, table, labels_path, skip_bad, skipped)
        labels_source = str(labels_path.resolve())
    else:
        y = np.full(len(tifs), -1, np.int8)
        labels_source = ""
        log.info("%s: no labels file, packing unlabelled", labels_path)
    if not tifs:
        raise PcamError(f"{src}: no usable images left")

    stain_tf, stain_meta = _stain_setup(stain, stain_reference, len(tifs), _tif_sample(tifs),
                                        workers or cpu_threads(), "the packed folder")
    if stain_tf is not None:
        transform = stain_tf if transform is None else (lambda f, g: (lambda x: g(f(x))))(stain_tf, transform)

    message = f"{out_path}: pack interrupted, nothing written (the same command starts it again)"
    provenance = {"source": str(src.resolve()), "labels_source": labels_source,
                  "stain": json.dumps(stain_meta)}
    with deferred_interrupt() as interrupted, atomic_path(out_path, force=force) as tmp:
        count, labels_arr, mean, std = _write_store(
            tmp, src, tifs, stems, y, chunk=chunk, compression=compression, workers=workers,
            transform=transform, skip_bad=skip_bad, skipped=skipped, progress=progress,
            provenance=provenance, stop=lambda: _stop_if(interrupted(), message))
    for path, problem in skipped:
        log.warning("skipped %s: %s", path, problem)
    return PackResult(out_path, count, int((labels_arr == 1).sum()), int((labels_arr < 0).sum()),
                      tuple(mean), tuple(std), skipped, time.perf_counter() - t0)


def _stop_if(flag: bool, message: str) -> None:
    if flag:
        raise Interrupted(message)


def _write_store(tmp: Path, src: Path, paths: list[str], stems: list[str], y: np.ndarray, *, chunk: int,
                 compression: str, workers: Optional[int], transform: Optional[BatchTransform],
                 skip_bad: bool, skipped: list[tuple[str, str]], progress: bool, provenance: dict,
                 stop: Callable[[], None]) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Decode ``paths`` into a complete store at ``tmp``; returns (count, labels, mean, std).

    ``stop()`` is called between batches (and before the store is
    completed): it raises to abandon the store.
    """
    sums = np.zeros(3, np.uint64)
    sqsums = np.zeros(3, np.uint64)
    kept_ids: list[str] = []
    kept_labels: list[np.ndarray] = []
    with StoreWriter(tmp, len(paths), chunk, compression) as writer, \
            progress_bar(total=len(paths), desc=f"pack {named_folder(src).name}", enabled=progress) as bar:
        # Without a transform the pixels are final once decoded: the
        # workers compute their statistics and write them to the store
        # themselves, in place, while they are in cache (the kernels and
        # the writes release the GIL); rows of skipped files are closed
        # up at the end. With a transform, or into a compressed store
        # (written through h5py's filters), the main thread writes.
        in_place = transform is None and compression == "none"
        kept: list[np.ndarray] = []
        batches = iter_batches(paths, min(writer.chunk, DECODE_BATCH), workers or cpu_threads(),
                               stats=transform is None, reuse=True,
                               sink=writer.write_at if in_place else None)
        # closing(): on an error the generator is shut first, which waits
        # for the workers' writes, and only then the writer's file.
        with contextlib.closing(batches):
            for batch in batches:
                stop()
                keep = np.array([e is None for e in batch.errors])
                bad = [e for e in batch.errors if e is not None]
                if bad and not skip_bad:
                    raise bad[0]
                skipped.extend((e.path, e.problem) for e in bad)
                if transform is not None:
                    images = transform(batch.images if keep.all() else batch.images[keep])
                    images = np.ascontiguousarray(images)  # the kernel reads rows of bytes
                    channel_sums(images, np.ones(len(images), np.bool_), sums, sqsums)
                    writer.write(images)
                else:
                    sums += batch.sums
                    sqsums += batch.sqsums
                    if in_place:
                        kept.append(keep)
                    else:
                        writer.write(batch.images if keep.all() else batch.images[keep])
                sel = np.flatnonzero(keep) + batch.start
                kept_ids.extend(stems[i] for i in sel)
                kept_labels.append(y[sel])
                bar.update(len(batch.images))
        count = len(kept_ids)
        if in_place:
            writer.keep_rows(np.concatenate(kept))
        if count == 0:
            raise PcamError(f"{src}: every image was bad ({len(skipped)} skipped)")
        labels_arr = np.concatenate(kept_labels)
        mean, std = channel_stats(sums, sqsums, count)
        writer.images.resize(count, axis=0)
        writer.n = count
        attrs = _store_attrs(provenance, labels_arr, mean, std, skipped,
                             {"chunk": writer.chunk, "compression": compression, "skip_bad": skip_bad})
        stop()
        writer.finish(kept_ids, labels_arr, attrs)
    return count, labels_arr, mean, std


def _store_attrs(provenance: dict, labels: np.ndarray, mean: Any, std: Any, skipped: list,
                 options: dict) -> dict:
    """The store's root attributes, as every pack writes them (tifs or a PCam split)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pcamtool_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **provenance,
        "count": len(labels),
        "n_positive": int((labels == 1).sum()),
        "n_unlabelled": int((labels < 0).sum()),
        "mean": mean,
        "std": std,
        "options": json.dumps(options),
        "skipped": json.dumps(skipped),
    }


REFERENCE_SAMPLE = 2048  # patches the stain reference is fitted on


def _tif_sample(paths: list[str]) -> Callable[[np.ndarray], np.ndarray]:
    """Decode the tifs at the positions asked for (unreadable ones left out): a stain reference's sample."""
    def read(pick: np.ndarray) -> np.ndarray:
        sample = np.empty((len(pick), 96, 96, 3), np.uint8)
        errors = read_into([paths[i] for i in pick], sample)
        return sample[[e is None for e in errors]]
    return read


def _stain_setup(method: str, reference_store: Optional[str | os.PathLike], count: int,
                 read_sample: Callable[[np.ndarray], np.ndarray], workers: int,
                 where: str) -> tuple[Optional[BatchTransform], dict]:
    """The stain-normalizing transform and its description for the store.

    Without ``reference_store`` the reference is fitted on
    ``read_sample(rows)``: up to :data:`REFERENCE_SAMPLE` of the ``count``
    source images, spread evenly, in increasing order (``where`` names them in the log).
    """
    if method == "none":
        if reference_store is not None:
            raise PcamError("--stain-reference needs --stain reinhard or --stain macenko")
        return None, {"method": "none"}
    from ..stain import METHODS, StainReference, fit_reference, normalize

    if method not in METHODS:
        raise PcamError(f"unknown stain method {method!r} (choose from {', '.join(METHODS)})")
    if reference_store is not None:
        from .store import open_store

        ref_store = open_store(reference_store)
        recorded = ref_store.stain()
        if recorded.get("method") == method:
            # a store packed with this method: reuse its reference exactly, so a
            # test set packed against the train store matches it bit for bit
            log.info("stain normalization: %s with the reference recorded in %s", method, reference_store)
            ref = StainReference.from_dict(recorded)
            return (lambda images: normalize(images, ref, workers=workers)), ref.to_dict()
        idx = np.unique(np.linspace(0, len(ref_store) - 1, min(REFERENCE_SAMPLE, len(ref_store))).astype(np.int64))
        sample, where = ref_store.gather(idx), str(reference_store)
    else:
        pick = np.unique(np.linspace(0, count - 1, min(REFERENCE_SAMPLE, count)).astype(np.int64))
        sample = read_sample(pick)
    ref = fit_reference(sample, method)
    log.info("stain normalization: %s toward a reference from %d patches of %s", method, len(sample), where)
    return (lambda images: normalize(images, ref, workers=workers)), ref.to_dict()



# ---- PatchCamelyon's published files -------------------------------------------------

def default_pcam_store_path(x: Path, split: str) -> Path:
    """``.../camelyonpatch_level_2_split_valid_x.h5.gz`` packs to ``.../pcam_valid.h5`` beside it."""
    return x.parent / f"pcam_{split}.h5"


def pack_pcam(src: str | os.PathLike, split: Optional[str] = None, out: Optional[str | os.PathLike] = None,
              chunk: int = 512, compression: str = "none", force: bool = False, stain: str = "none",
              stain_reference: Optional[str | os.PathLike] = None, transform: Optional[BatchTransform] = None,
              workers: Optional[int] = None, progress: bool = True) -> PackResult:
    """Pack one split of the PCam benchmark (``_x.h5[.gz]`` + ``_y`` + ``_meta.csv``) into a store.

    The store is the ordinary one (:mod:`pcamtool.io.store`) with ids
    ``pcam-<split>-<row>``, labels from ``y``, and the meta CSV kept as its
    :class:`~pcamtool.io.store.PatchMeta` (format version 2), so training
    splits it by slide. Pixels are copied bit for bit (unless ``stain``),
    read in the source's chunk order on a helper thread while the main
    thread sums the channel statistics and writes the previous block; a
    ``.gz`` is decompressed as a stream, once (twice with ``stain`` and no
    ``stain_reference``: the reference sample is a pass of its own).

    Parameters
    ----------
    src
        The split's ``_x.h5`` or ``_x.h5.gz``, or the folder holding the
        files (then ``split`` says which).
    out
        Store path; default ``pcam_<split>.h5`` beside the x file.
    chunk, compression, force, stain, stain_reference, transform
        As in :func:`pack`.
    workers
        Threads inflating the chunks of a gzip-chunked x (and normalizing
        stains); default: the usable cores.

    Raises
    ------
    PcamError
        Missing or malformed files, named (see :class:`~pcamtool.io.pcam.PcamSource`);
        an output that exists, is being written, or cannot be written.
    Interrupted
        Ctrl-C (nothing was written).
    """
    from .pcam import PcamSource, find_split

    t0 = time.perf_counter()
    if compression not in COMPRESSIONS:
        raise PcamError(f"unknown compression {compression!r} (choose from {', '.join(COMPRESSIONS)})")
    if chunk < 1:
        raise PcamError(f"--chunk must be at least 1, got {chunk}")
    files = find_split(src, split)
    out_path = Path(out) if out is not None else default_pcam_store_path(files.x, files.split)
    check_writable(out_path, force)
    with PcamSource(files, workers=workers or cpu_threads()) as source:
        stain_tf, stain_meta = _stain_setup(stain, stain_reference, source.n, source.read_rows,
                                            workers or cpu_threads(), str(files.x))
        if stain_tf is not None:
            transform = stain_tf if transform is None else (lambda f, g: (lambda x: g(f(x))))(stain_tf, transform)
        provenance = {"source": str(files.x.resolve()), "labels_source": str(files.y.resolve()),
                      "stain": json.dumps(stain_meta)}
        message = f"{out_path}: pack interrupted, nothing written (the same command starts it again)"
        with deferred_interrupt() as interrupted, atomic_path(out_path, force=force) as tmp:
            mean, std = _write_pcam_store(tmp, source, chunk=chunk, compression=compression, transform=transform,
                                          progress=progress, provenance=provenance,
                                          stop=lambda: _stop_if(interrupted(), message))
        n, n_pos = source.n, int((source.labels == 1).sum())
    return PackResult(out_path, n, n_pos, 0, tuple(mean), tuple(std), [], time.perf_counter() - t0)


def _prefetched(source, depth: int = 2) -> Iterator[tuple[int, np.ndarray]]:
    """``source``'s blocks in order, each read on a helper thread ``depth`` blocks ahead of its use.

    A block's array is reused once the consumer asks for the next one.
    Closing the generator waits for the read under way (the file stays
    open until then).
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from .store import SHAPE

    rows = source.block_rows
    starts = range(0, source.n, rows)
    bufs = [np.empty((min(rows, source.n), *SHAPE), np.uint8) for _ in range(depth + 1)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pcam-read") as pool:
        pending: deque = deque()
        nxt = 0

        def submit() -> None:
            nonlocal nxt
            pending.append((starts[nxt], pool.submit(source.read_into, starts[nxt], bufs[nxt % len(bufs)])))
            nxt += 1

        try:
            while nxt < len(starts) and len(pending) < depth:
                submit()
            while pending:
                start, fut = pending.popleft()
                block = fut.result()
                yield start, block
                if nxt < len(starts):
                    submit()
        finally:
            for _, fut in pending:
                fut.cancel()


def _write_pcam_store(tmp: Path, source, *, chunk: int, compression: str, transform: Optional[BatchTransform],
                      progress: bool, provenance: dict, stop: Callable[[], None]) -> tuple[np.ndarray, np.ndarray]:
    """Copy ``source`` (a :class:`~pcamtool.io.pcam.PcamSource`) into a complete store at ``tmp``.

    Returns (mean, std).
    """
    sums = np.zeros(3, np.uint64)
    sqsums = np.zeros(3, np.uint64)
    n = source.n
    keep = np.ones(source.block_rows, np.bool_)
    with StoreWriter(tmp, n, chunk, compression) as writer, \
            progress_bar(total=n, desc=f"pack {source.files.split}", enabled=progress) as bar:
        blocks = _prefetched(source)
        with contextlib.closing(blocks):
            for _, images in blocks:
                stop()
                if transform is not None:
                    images = np.ascontiguousarray(transform(images))  # the kernel reads rows of bytes
                channel_sums(images, keep[:len(images)], sums, sqsums)
                writer.write(images)
                bar.update(len(images))
        source.verify()  # a .gz: the rest of the stream, its CRC and length
        mean, std = channel_stats(sums, sqsums, n)
        labels = source.labels
        attrs = _store_attrs(provenance, labels, mean, std, [],
                             {"chunk": writer.chunk, "compression": compression, "skip_bad": False,
                              "pcam_split": source.files.split})
        stop()
        writer.finish(list(source.ids), labels, attrs, meta=source.meta)
    return mean, std
