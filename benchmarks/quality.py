"""Quality runs: AUC of a training recipe on a held-out split, with TTA 1/2/4/8.

Not a pytest benchmark (it trains for minutes): a script whose table goes
into ``benchmarks/RESULTS.md``. Two data sets:

* ``--data real``: the real Kaggle sample ``../shared/pcam-real`` (or ``$PCAMTOOL_REAL_DIR``) split 80/20
  (stratified, seed 0); validation is the held-back 20%, and "shift" the same
  20% re-stained as if scanned at another centre (:func:`restain_folder`).
* ``--data synth``: ``pcamtool synth`` data; validation is a 20% split of the
  train centres and "shift" is the synthetic test split (another centre).

Example::

    python benchmarks/quality.py --data real --stain macenko --tag macenko
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from pcamtool import open_store, pack
from pcamtool.config import TrainConfig
from pcamtool.io.csvio import read_labels
from pcamtool.evaluate import evaluate_arrays
from pcamtool.export import export_onnx
from pcamtool.infer import predict
from pcamtool.train.split import make_split
from pcamtool.train.loop import fit

# PCAMTOOL_REAL_DIR points elsewhere (the same rule as tests/helpers.py).
REAL = Path(os.environ.get("PCAMTOOL_REAL_DIR")
            or Path(__file__).resolve().parents[1].parent / "shared" / "pcam-real").expanduser()


def split_folder(src: Path, labels: dict[str, int], out: Path, seed: int = 0) -> tuple[Path, Path]:
    """Symlink an 80/20 stratified split of ``src`` into ``out/{train,val}`` with labels CSVs."""
    ids = sorted(labels)
    y = np.array([labels[i] for i in ids])
    tr, va = make_split(y, 0.2, seed)
    for name, idx in (("train", tr), ("val", va)):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        for i in idx:
            link = d / f"{ids[i]}.tif"
            if not link.exists():
                link.symlink_to(src / f"{ids[i]}.tif")
        rows = "\n".join(f"{ids[i]},{y[i]}" for i in idx)
        (out / f"{name}_labels.csv").write_text(f"id,label\n{rows}\n")
    return out / "train", out / "val"


# A simulated "other centre" for the real sample, whose validation split shares
# the training split's centres: every held-back patch re-stained in HED optical
# density (stronger hematoxylin, paler eosin, a faint brown cast: the kind of
# shift between labs), with a little per-patch variation like slides differ.
RESTAIN_SCALE = np.array([1.4, 0.65, 1.0])
RESTAIN_BIAS = np.array([0.0, 0.0, 0.05])


def restain_folder(src: Path, labels_csv: Path, out: Path, seed: int = 0) -> Path:
    """Write every tif of ``src`` re-stained into ``out`` (with its labels CSV beside it)."""
    import tifffile

    from pcamtool.augment import HED_FROM_RGB, RGB_FROM_HED

    if (out.parent / f"{out.name}_labels.csv").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for f in sorted(src.glob("*.tif")):
        od = -np.log((tifffile.imread(f).reshape(-1, 3).astype(np.float64) + 1) / 256)
        hed = od @ HED_FROM_RGB
        alpha = RESTAIN_SCALE * rng.uniform(0.95, 1.05, 3)
        od2 = (hed * alpha + RESTAIN_BIAS) @ RGB_FROM_HED
        img = np.clip(np.rint(256 * np.exp(-od2) - 1), 0, 255).astype(np.uint8).reshape(96, 96, 3)
        tifffile.imwrite(out / f.name, img, photometric="rgb")
    (out.parent / f"{out.name}_labels.csv").write_text(labels_csv.read_text())
    return out


def apply_overrides(cfg: TrainConfig, pairs: list[str]) -> TrainConfig:
    """``cfg`` with ``key=json`` overrides; ``a.b=v`` sets field ``b`` of dataclass or dict field ``a``."""
    d = cfg.to_dict()
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            node = node[p]
        node[leaf] = value
    return TrainConfig.from_dict(d)


def render_table(path: Path) -> str:
    """The rows of a results file as the markdown table of ``benchmarks/RESULTS.md``."""
    head = ("| data | recipe | stain | HED aug | epochs | train imgs | train s | val AUC tta1 / 2 / 4 / 8 "
            "| shifted-centre AUC tta1 / 2 / 4 / 8 |\n|---|---|---|---|---:|---:|---:|---|---|")
    lines = [head]
    for line in path.read_text().splitlines():
        r = json.loads(line)
        recipe = r["arch"] + (" " + " ".join(r["overrides"]) if r.get("overrides") else "") + f" ({r['tag']})"

        def aucs(name: str) -> str:
            vals = [r.get(f"{name}_auc_tta{t}") for t in (1, 2, 4, 8)]
            return "n/a" if vals[0] is None else " / ".join(f"{v:.4f}" for v in vals)

        lines.append(f"| {r['data']} | {recipe} | {r['stain']} | {'on' if r['hed'] else 'off'} | {r['epochs']} "
                     f"| {r['train_images']:,} | {r['train_seconds']:.0f} | {aucs('val')} | {aucs('shift')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["real", "synth"], default="real")
    ap.add_argument("--work", type=Path, default=Path("/tmp/pcam-quality"))
    ap.add_argument("--tag", default="default")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--stain", default="none")
    ap.add_argument("--hed", type=int, default=None, help="1/0: HED augmentation on/off (default: recipe's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=JSON",
                    help="override a TrainConfig field: epochs=30, augment.shift=true, model_kwargs.width=32")
    ap.add_argument("--synth-train", type=int, default=20000)
    ap.add_argument("--results", type=Path, default=Path("benchmarks/quality.jsonl"))
    ap.add_argument("--table", action="store_true", help="print the results file as a markdown table and exit")
    a = ap.parse_args()
    if a.table:
        print(render_table(a.results))
        return

    t0 = time.perf_counter()
    root = a.work / a.data
    if a.data == "real":
        train_dir, val_dir = split_folder(REAL / "train", read_labels(REAL / "train_labels.csv"), root / "split")
        shifted_dir = restain_folder(val_dir, root / "split" / "val_labels.csv", root / "split" / "restained")
    else:
        from pcamtool.synth import generate

        if not (root / "train_labels.csv").exists():
            generate(root, n_train=a.synth_train, n_test=max(2000, a.synth_train // 4), force=True, progress=False)
        train_dir, val_dir = split_folder(root / "train", read_labels(root / "train_labels.csv"), root / "split")
        shifted_dir = root / "test"
    tag = f"{a.tag}-{a.stain}" + ("-hed" if a.hed else "")
    tr = pack(train_dir, out=root / f"train-{a.stain}.h5", stain=a.stain, force=True, progress=False).path
    ref = tr if a.stain != "none" else None
    va = pack(val_dir, out=root / f"val-{a.stain}.h5", stain=a.stain, stain_reference=ref, force=True,
              progress=False).path
    shift_store = pack(shifted_dir, labels=shifted_dir.parent / f"{shifted_dir.name}_labels.csv",
                       out=root / f"shift-{a.stain}.h5", stain=a.stain, stain_reference=ref, force=True,
                       progress=False).path
    cfg = TrainConfig(store=str(tr), val_store=str(va), out=str(root / "runs" / tag))
    if a.arch:
        cfg = replace(cfg, arch=a.arch)
    if a.epochs:
        cfg = replace(cfg, epochs=a.epochs)
    if a.hed is not None:
        cfg = replace(cfg, augment=replace(cfg.augment, hed=bool(a.hed)))
    cfg = apply_overrides(cfg, a.overrides)
    if Path(cfg.out).exists():
        import shutil

        shutil.rmtree(cfg.out)
    t_train = time.perf_counter()
    res = fit(cfg, progress=False)
    train_s = time.perf_counter() - t_train
    model = export_onnx(res.run_dir, force=True).path
    row = {"data": a.data, "tag": a.tag, "overrides": a.overrides, "arch": cfg.arch,
           "epochs": json.loads((res.run_dir / "config.json").read_text())["epochs"], "stain": a.stain,
           "hed": cfg.augment.hed, "train_images": len(open_store(tr)), "best_val_auc_in_training": res.best_auc,
           "train_seconds": round(train_s, 1)}
    for name, store in (("val", va), ("shift", shift_store)):
        labels = open_store(store).labels
        for tta in (1, 2, 4, 8):
            pred = predict(store, [model], tta=tta, provider="cpu", progress=False)
            row[f"{name}_auc_tta{tta}"] = round(evaluate_arrays(pred.probs, labels).auc, 4)
    row["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row))
    with open(a.results, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
