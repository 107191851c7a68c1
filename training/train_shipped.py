"""Train the nucleus model shipped in ``src/qdplex/segment/models/`` (see README.md here).

    python training/train_shipped.py split   # writes training/split.json (deterministic, seed 0)
    python training/train_shipped.py train --minutes 60 --out src/qdplex/segment/models/nuclei.onnx

Data: ``../shared/data/nuclei_train`` (DSB2018 fluorescence, BBBC039; CC0) plus
synthetic crowded tissue from :func:`qdplex.synth.nuclear_field`. The split
(``split.json``) is by field of view:

- BBBC039: wells (``IXMtest_<well>_s<site>``, sites of a well neighbour each
  other) shuffled with seed 0, whole wells held out until ≥ 20 % of the images;
- DSB2018 stage1_train fluorescence: 10 % held out at random (seed 0); every DSB
  image that is the same field as a BBBC039 image (``DSB_BBBC039_OVERLAP.csv``)
  follows its BBBC039 twin to the same side;
- DSB2018 stage1_test fluorescence: all held out;
- validation (checkpoint choice only, never a gradient step): 5 % of the
  training side of each set.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "nuclei_train"
SPLIT = Path(__file__).resolve().parent / "split.json"
SEED = 0


def _names(set_name):
    return sorted(p.stem for p in (DATA / set_name / "images").glob("*.tif"))


def make_split() -> dict:
    rng = np.random.default_rng(SEED)
    bbbc = _names("bbbc039")
    wells = sorted({n.split("_")[1] for n in bbbc})
    rng.shuffle(wells)
    held_wells, n_held = set(), 0
    for w in wells:
        if n_held >= 0.2 * len(bbbc):
            break
        held_wells.add(w)
        n_held += sum(n.split("_")[1] == w for n in bbbc)
    bbbc_test = sorted(n for n in bbbc if n.split("_")[1] in held_wells)
    twins = {}
    with open(DATA / "DSB_BBBC039_OVERLAP.csv") as fh:
        for row in csv.DictReader(fh):
            twins[row["dsb_name"]] = row["bbbc039_name"]
    dsb = _names("dsb2018_fluo")
    free = [n for n in dsb if n not in twins]
    rng.shuffle(free)
    dsb_test = set(free[: int(round(0.1 * len(free)))])
    dsb_test |= {d for d, b in twins.items() if b in set(bbbc_test)}
    split = {
        "seed": SEED,
        "rule": "BBBC039 by well (>=20% held out); DSB stage1_train 10% random held out, DSB/BBBC039 twins follow BBBC039; DSB stage1_test all held out",
        "test": {
            "bbbc039": bbbc_test,
            "dsb2018_fluo": sorted(dsb_test),
            "dsb2018_stage1test_fluo": _names("dsb2018_stage1test_fluo"),
        },
    }
    train = {"bbbc039": [n for n in bbbc if n not in set(bbbc_test)], "dsb2018_fluo": [n for n in dsb if n not in dsb_test]}
    val = {}
    for k, names in train.items():
        r = list(names)
        rng.shuffle(r)
        val[k] = sorted(r[: max(2, len(r) // 20)])
        train[k] = sorted(set(names) - set(val[k]))
    split["train"], split["val"] = train, val
    return split


def synthetic(n: int, seed: int):
    """Synthetic crowded tissue nuclei: diameter 4–60 px, density, texture, blur, gradients, bit depth."""
    from qdplex.segment.train import Item
    from qdplex.synth import nuclear_field

    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        d = float(np.exp(rng.uniform(np.log(4.0), np.log(60.0))))
        px = 10.0 / d  # synthetic nuclei are ~8-12 µm
        side = int(np.clip(240 * d / 16.0, 48, 960))
        image, truth = nuclear_field(
            (side, side),
            pixel_size_um=px,
            crowded=bool(rng.random() < 0.7),
            uneven=bool(rng.random() < 0.6),
            photons=float(np.exp(rng.uniform(np.log(20), np.log(3000)))),
            read_noise=float(rng.uniform(0.5, 10.0)),
            psf_sigma_um=float(rng.uniform(0.15, 0.9)) * max(1.0, px / 0.5) ** 0.5,
            seed=int(rng.integers(2**31)),
        )
        bits = int(rng.choice([8, 12, 16]))
        top = (2**bits - 1) * rng.uniform(0.2, 1.0)
        offset = rng.uniform(0, 0.1) * top
        scaled = np.clip(image / max(float(np.percentile(image, 99.9)), 1e-6) * (top - offset) + offset, 0, 2**bits - 1)
        items.append(Item.make(np.round(scaled), truth, source="synthetic", name=f"synth{i}"))
    return items


def load(split: dict, part: str):
    from qdplex.segment.train import load_pairs

    out = {}
    for set_name, names in split[part].items():
        out[set_name] = load_pairs(DATA / set_name / "images", DATA / set_name / "masks", source=set_name, names=set(names))
    return out


def add_figures(model_path, results_path) -> None:
    """Write the benchmark's held-out F1 figures into the ONNX model's ``card`` metadata (weights unchanged)."""
    import onnx

    res = json.loads(Path(results_path).read_text())
    figures = {
        name: {m: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items() if k in ("f1", "precision", "recall", "mean_iou", "n_true", "n_pred", "n_images")}
               for m, r in per.items()}
        for name, per in res.items()
        if isinstance(per, dict) and "model" in per
    }
    proto = onnx.load(model_path)
    meta = {p.key: p for p in proto.metadata_props}
    card = json.loads(meta["card"].value)
    card["held_out_f1_iou0.5"] = figures
    card["benchmark"] = {"command": res.get("command"), "date": res.get("date")}
    if res.get("speed"):
        card["benchmark"]["throughput_mpx_per_s"] = round(res["speed"]["auto"]["mpx_per_s"], 3)
    meta["card"].value = json.dumps(card)
    tmp = Path(model_path).with_suffix(".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(model_path)
    print(f"added {len(figures)} data sets to the card of {model_path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("split")
    t = sub.add_parser("train")
    t.add_argument("--out", default=str(ROOT / "src/qdplex/segment/models/nuclei.onnx"))
    t.add_argument("--workdir", default=str(ROOT / "training/run"))
    t.add_argument("--minutes", type=float, default=60.0)
    t.add_argument("--synthetic", type=int, default=240)
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--init", default=None, help="fine-tune this exported model (e.g. the shipped nuclei.onnx) instead of starting from random weights")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3; 5e-4 suits fine-tuning)")
    t.add_argument("--weights", default="0.3,0.4,0.3", help="sampling probabilities of bbbc039,dsb2018_fluo,synthetic")
    t.add_argument("--seed", type=int, default=SEED, help=f"seed of the crops and augmentations (default {SEED}; "
                   "the data, split and synthetic fields keep theirs)")
    c = sub.add_parser("card", help="add held-out figures (bench_segment.py --json) to the model's metadata card")
    c.add_argument("results", help="JSON written by benchmarks/bench_segment.py --json")
    c.add_argument("--model", default=str(ROOT / "src/qdplex/segment/models/nuclei.onnx"))
    a = ap.parse_args(argv)
    if a.cmd == "card":
        add_figures(a.model, a.results)
        return
    if a.cmd == "split":
        SPLIT.write_text(json.dumps(make_split(), indent=1) + "\n")
        print(f"wrote {SPLIT}")
        return
    from qdplex.segment.train import train

    split = json.loads(SPLIT.read_text())
    t0 = time.time()
    sets = load(split, "train")
    val_sets = load(split, "val")
    sets["synthetic"] = synthetic(a.synthetic, SEED + 10)
    val = [it for v in val_sets.values() for it in v] + synthetic(12, SEED + 20)
    print(f"data ready in {time.time() - t0:.0f} s: " + ", ".join(f"{k}={len(v)}" for k, v in sets.items()) + f", val={len(val)}", flush=True)
    card = {
        "data": "nuclei_train (DSB2018 stage1_train fluorescence, BBBC039; CC0) + qdplex.synth crowded tissue",
        "split": split["rule"],
        "split_file": "training/split.json",
        "n_train_images": {k: len(v) for k, v in sets.items()},
        "n_val_images": len(val),
        "n_test_images": {k: len(v) for k, v in split["test"].items()},
        "command": "python training/train_shipped.py train " + " ".join(sys.argv[2:]),
    }
    rec = train(
        sets,
        a.out,
        weights=dict(zip(("bbbc039", "dsb2018_fluo", "synthetic"), (float(v) for v in a.weights.split(",")))),
        val=val,
        minutes=a.minutes,
        max_steps=a.max_steps,
        batch_size=8,
        crop=128,
        seed=a.seed,
        workdir=a.workdir,
        card=card,
        init=a.init,
        lr=a.lr,
        log=lambda s: print(s, flush=True),
    )
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
