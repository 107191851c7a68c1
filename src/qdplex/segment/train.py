"""Train the nucleus model (PyTorch, the optional ``train`` extra) and export it to ONNX.

The network is a small U-Net (:func:`build_net`: 3 poolings, 16 base channels,
batch norm, ~0.47 M parameters) predicting per pixel background / interior /
boundary (:func:`qdplex.segment.model.targets`). Each training crop is cut
from an image rescaled so that its median nucleus is
:data:`~qdplex.segment.model.NOMINAL_DIAMETER` pixels across (with scale jitter),
randomly rotated and flipped; intensities are normalised as at inference and
then varied (gain, offset, gamma, gradients, blur, noise); a few crops are
blank or pure noise and must give no nuclei. The loss is class-weighted cross
entropy. Training is bounded by wall time with a cosine learning-rate decay
over that time, checkpoints every few minutes (and resumes from the
checkpoint), keeps the weights with the lowest loss on a fixed validation set
of crops, and exports them to ONNX with the model card in the metadata.

Run it with ``qdplex train-nuclei IMAGES MASKS --out model.onnx`` (see
``training/README.md`` for the shipped model).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..errors import InputError, SegmentationError
from .model import NOMINAL_DIAMETER, median_diameter, normalise, normalise_levels, targets

__all__ = ["Item", "build_net", "load_onnx_weights", "load_pairs", "train", "train_nuclei", "export_onnx", "require_torch"]

#: Cross-entropy weights of background, interior, boundary.
CLASS_WEIGHTS = (1.0, 1.0, 2.0)


def require_torch():
    """Import torch, or raise SegmentationError naming the ``train`` extra."""
    try:
        import onnx  # noqa: F401  (the export needs it)
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SegmentationError(
            f"expected PyTorch and onnx for training a nucleus model, found {exc.name!r} not installed "
            "(pip install 'qdplex[train]')"
        ) from exc
    return torch


@dataclass
class Item:
    """One annotated image: pixels, instance labels, its median nucleus diameter and its set."""

    image: np.ndarray
    labels: np.ndarray
    diameter: float
    source: str = ""
    name: str = ""
    levels: tuple = field(default=(0.0, 1.0))

    @classmethod
    def make(cls, image, labels, *, source="", name="", diameter=None):
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[-1] in (3, 4):
            image = image[..., :3].mean(axis=-1)
        labels = np.asarray(labels)
        if image.ndim != 2 or labels.shape != image.shape:
            raise InputError(
                f"expected a 2-D image and a mask of the same shape for {name or 'an item'}, "
                f"found {image.shape} and {labels.shape}"
            )
        d = diameter if diameter is not None else median_diameter(labels)
        return cls(
            image=image.astype(np.float32),
            labels=labels.astype(np.int32),
            diameter=float(d or NOMINAL_DIAMETER),
            source=source,
            name=name,
            levels=normalise_levels(image),
        )


def load_pairs(images_dir, masks_dir, *, source: str = "", names=None) -> list[Item]:
    """Items from ``images_dir/NAME.tif`` and ``masks_dir/NAME.tif`` (matching file names).

    ``names`` restricts the items to those stems. Masks are instance labels
    (0 background); images 2-D grey (RGB is averaged).
    """
    import tifffile

    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise InputError(f"expected folders of images and masks, found {images_dir} and {masks_dir}")
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in (".tif", ".tiff"))
    items = []
    for p in files:
        if names is not None and p.stem not in names:
            continue
        m = masks_dir / p.name
        if not m.is_file():
            cand = list(masks_dir.glob(p.stem + ".tif*"))
            if not cand:
                raise InputError(f"expected a mask for {p} in {masks_dir}, found none")
            m = cand[0]
        items.append(Item.make(tifffile.imread(p), tifffile.imread(m), source=source or images_dir.parent.name, name=p.stem))
    if not items:
        raise InputError(f"expected .tif images in {images_dir}, found none")
    return items


# --------------------------------------------------------------------------- network
def build_net(base: int = 16, depth: int = 3, *, norm: bool = True):
    """The U-Net: ``depth`` poolings, ``base`` channels at full resolution, doubling per level.

    ``norm=False`` builds the same network with the batch norms folded into
    the convolutions (biased convolutions, no normalisation layers): the form
    an exported model has, used to fine-tune from an ONNX file
    (:func:`load_onnx_weights`).
    """
    torch = require_torch()
    nn = torch.nn

    def block(cin, cout):
        if not norm:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True),
            )
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            ch = [base * 2**i for i in range(depth + 1)]
            self.enc = nn.ModuleList([block(1, ch[0])] + [block(ch[i - 1], ch[i]) for i in range(1, depth + 1)])
            self.up = nn.ModuleList([nn.ConvTranspose2d(ch[i], ch[i - 1], 2, stride=2) for i in range(depth, 0, -1)])
            self.dec = nn.ModuleList([block(2 * ch[i - 1], ch[i - 1]) for i in range(depth, 0, -1)])
            self.head = nn.Conv2d(ch[0], 3, 1)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            skips = []
            for i, enc in enumerate(self.enc):
                x = enc(x if i == 0 else self.pool(x))
                skips.append(x)
            x = skips.pop()
            for up, dec in zip(self.up, self.dec):
                x = dec(torch.cat([up(x), skips.pop()], dim=1))
            return self.head(x)

    return UNet()


def load_onnx_weights(net, path) -> None:
    """Copy the weights of an exported nucleus model (``path``) into ``net`` (a ``build_net(norm=False)``).

    The export folds each batch norm into its convolution, so the ONNX graph's
    convolutions, in order, are the network's ``Conv2d`` layers in order, and
    its transposed convolutions keep their names. Raises SegmentationError
    naming the file when the shapes do not match.
    """
    torch = require_torch()
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    try:
        proto = onnx.load(str(path))
    except Exception as exc:
        raise SegmentationError(f"expected an ONNX nucleus model in {path}, found an unreadable file ({exc})") from exc
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    layers = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    ups = {name: m for name, m in net.named_modules() if isinstance(m, torch.nn.ConvTranspose2d)}
    if len(convs) != len(layers):
        raise SegmentationError(f"expected {len(layers)} convolutions in {path} (a qdplex nucleus model of this size), found {len(convs)}")
    pairs = [(layer.weight, init.get(n.input[1])) for layer, n in zip(layers, convs)]
    pairs += [(layer.bias, init.get(n.input[2]) if len(n.input) > 2 else None) for layer, n in zip(layers, convs)]
    for name, m in ups.items():
        pairs += [(m.weight, init.get(f"inner.{name}.weight")), (m.bias, init.get(f"inner.{name}.bias"))]
    with torch.no_grad():
        for param, value in pairs:
            if value is None or tuple(value.shape) != tuple(param.shape):
                raise SegmentationError(
                    f"expected a weight of shape {tuple(param.shape)} in {path}, "
                    f"found {None if value is None else tuple(value.shape)}"
                )
            param.copy_(torch.from_numpy(np.array(value, dtype=np.float32)))


# --------------------------------------------------------------------------- crops
def _scale_jitter(rng) -> float:
    if rng.random() < 0.25:
        return float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
    return float(np.exp(rng.normal(0.0, 0.12)))


def sample_crop(rng, item: Item, crop: int, *, augment: bool = True):
    """One (image, class target) crop at the nominal nucleus scale, augmented."""
    s = NOMINAL_DIAMETER / max(item.diameter, 1.0)
    if augment:
        s *= _scale_jitter(rng)
    H, W = item.image.shape
    theta = rng.uniform(0, 2 * np.pi) if augment else 0.0
    c, si = math.cos(theta), math.sin(theta)
    flip = -1.0 if (augment and rng.random() < 0.5) else 1.0
    # output pixel o maps to input  centre_in + A (o - centre_out)
    A = np.array([[c, -si], [si, c]]) @ np.diag([1.0, flip]) / s
    half = crop / 2.0
    span = half / s
    cy = rng.uniform(min(span, H / 2), max(H - span, H / 2))
    cx = rng.uniform(min(span, W / 2), max(W - span, W / 2))
    offset = np.array([cy, cx]) - A @ np.array([half, half])
    lo, hi = item.levels
    img = ndi.affine_transform(item.image, A, offset, output_shape=(crop, crop), order=1, mode="constant", cval=lo)
    lab = ndi.affine_transform(item.labels, A, offset, output_shape=(crop, crop), order=0, mode="constant", cval=0)
    x = normalise(img, (lo, hi))
    if augment:
        x = _intensity_augment(rng, x)
    return x.astype(np.float32), targets(lab)


def _intensity_augment(rng, x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    if rng.random() < 0.3:  # optical blur
        x = ndi.gaussian_filter(x, rng.uniform(0.5, 1.8))
    x = np.clip(x, 0, None) ** np.float32(np.exp(rng.uniform(-0.35, 0.35)))
    low = 0.6 if rng.random() < 0.5 else 0.1  # half the crops as normalised, half dimmer (a dim region)
    gain = float(np.exp(rng.uniform(np.log(low), np.log(1.4))))
    x = x * gain
    if rng.random() < 0.35:  # illumination gradient / haze
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
        a = rng.uniform(0, 2 * np.pi)
        x = x + rng.uniform(0.0, 0.3) * gain * (np.cos(a) * xx + np.sin(a) * yy)
    if rng.random() < 0.5:
        x = x + rng.normal(0, rng.uniform(0.005, 0.06) * gain, x.shape).astype(np.float32)
    x = x + rng.uniform(-0.05, 0.05)
    return x


def _empty_crop(rng, crop: int):
    """A crop without nuclei: all zero (a flat tile after normalisation) or normalised noise."""
    if rng.random() < 0.4:
        x = np.zeros((crop, crop), np.float32)
    else:
        x = rng.normal(0, 1, (crop, crop)).astype(np.float32)
        if rng.random() < 0.5:
            x = ndi.gaussian_filter(x, rng.uniform(0.5, 3.0))
        x = normalise(x)
    return x, np.zeros((crop, crop), np.int64)


def batch(rng, sets, weights, size: int, crop: int, *, p_empty: float = 0.04):
    """A batch of crops drawn from ``sets`` (lists of Items) with probabilities ``weights``."""
    xs, ys = [], []
    for _ in range(size):
        if rng.random() < p_empty:
            x, y = _empty_crop(rng, crop)
        else:
            items = sets[rng.choice(len(sets), p=weights)]
            x, y = sample_crop(rng, items[rng.integers(len(items))], crop)
        xs.append(x)
        ys.append(y)
    return np.stack(xs)[:, None], np.stack(ys)


# --------------------------------------------------------------------------- training
def train(
    sets: dict[str, list[Item]],
    out,
    *,
    weights: dict[str, float] | None = None,
    val: list[Item] | None = None,
    minutes: float = 60.0,
    max_steps: int | None = None,
    batch_size: int = 8,
    crop: int = 160,
    lr: float = 2e-3,
    seed: int = 0,
    threads: int = 2,
    base: int = 16,
    workdir=None,
    card: dict | None = None,
    init=None,
    log=print,
    log_every: int = 50,
) -> dict:
    """Train the U-Net on ``sets`` and write the best weights as ONNX to ``out``.

    Parameters
    ----------
    sets : dict of str to list of Item
        Training images by data set (drawn with ``weights``, uniform otherwise).
    out : path
        The ONNX file to write.
    val : list of Item, optional
        Validation images (two fixed, unaugmented crops each) that choose the
        best weights; without them the last weights are kept.
    minutes : float
        Wall-time budget of the training loop; the learning rate decays over it.
    max_steps : int, optional
        Stop after this many steps (smoke tests).
    workdir : path, optional
        Where the checkpoint ``ckpt.pt`` lives (resumed when present); next to ``out`` by default.
    card : dict, optional
        Model-card entries written to the ONNX metadata (with the training record).
    init : path, optional
        Fine-tune: start from the weights of this exported nucleus model (e.g.
        the shipped one, :data:`qdplex.segment.infer.DEFAULT_MODEL`) instead of
        random ones; the network then has its batch norms folded in.
    log, log_every :
        ``log(json_line)`` with the mean training loss every ``log_every`` steps.

    Returns
    -------
    dict
        The training record (steps, wall time, losses, best validation loss).
    """
    torch = require_torch()
    torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    out = Path(out)
    workdir = Path(workdir) if workdir is not None else out.parent
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = workdir / (out.stem + ".ckpt.pt")
    names = [k for k in sets if sets[k]]
    if not names:
        raise InputError("expected at least one training image, found none")
    w = np.array([(weights or {}).get(k, 1.0) for k in names], float)
    w /= w.sum()
    set_list = [sets[k] for k in names]

    net = build_net(base=base, norm=init is None)
    if init is not None:
        load_onnx_weights(net, init)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    cw = torch.tensor(CLASS_WEIGHTS, dtype=torch.float32)
    state = {"step": 0, "elapsed": 0.0, "best": math.inf, "history": [], "best_state": None}
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False)
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        log(f"resumed from {ckpt_path} at step {state['step']} ({state['elapsed'] / 60:.1f} min)")
    rng = np.random.default_rng([seed, state["step"]])

    vx = vy = None
    if val:
        vr = np.random.default_rng(seed + 1)
        crops = [sample_crop(vr, it, crop, augment=False) for it in val for _ in range(2)]
        vx = torch.from_numpy(np.stack([c[0] for c in crops])[:, None])
        vy = torch.from_numpy(np.stack([c[1] for c in crops]))

    def val_loss():
        net.eval()
        with torch.no_grad():
            tot = 0.0
            for i in range(0, len(vx), 16):
                tot += float(torch.nn.functional.cross_entropy(net(vx[i : i + 16]), vy[i : i + 16], weight=cw)) * len(vx[i : i + 16])
        net.train()
        return tot / len(vx)

    def save():
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "state": state}, tmp)
        tmp.replace(ckpt_path)

    budget = 60.0 * float(minutes)
    t0 = time.time() - state["elapsed"]
    last_save = time.time()
    run_loss = []
    net.train()
    while True:
        elapsed = time.time() - t0
        if elapsed >= budget or (max_steps is not None and state["step"] >= max_steps):
            break
        frac = min(elapsed / budget, 1.0)
        warm = min(1.0, (state["step"] + 1) / (min(100.0, max_steps / 5.0) if max_steps else 100.0))
        for g in opt.param_groups:
            g["lr"] = lr * warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
        xb, yb = batch(rng, set_list, w, batch_size, crop)
        logits = net(torch.from_numpy(xb))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(yb), weight=cw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        state["step"] += 1
        run_loss.append(float(loss.detach()))
        if state["step"] % log_every == 0 or (max_steps is not None and state["step"] >= max_steps):
            rec = {"step": state["step"], "min": round(elapsed / 60, 2), "loss": round(float(np.mean(run_loss)), 4)}
            run_loss = []
            if vx is not None and (state["step"] % (4 * log_every) == 0 or frac > 0.8):
                vl = val_loss()
                rec["val"] = round(vl, 4)
                if vl < state["best"]:
                    state["best"] = vl
                    state["best_state"] = {k: v.detach().clone() for k, v in net.state_dict().items()}
            state["history"].append(rec)
            log(json.dumps(rec))
        state["elapsed"] = time.time() - t0
        if time.time() - last_save > 180:
            save()
            last_save = time.time()
    state["elapsed"] = time.time() - t0
    if vx is not None:
        vl = val_loss()
        if vl < state["best"]:
            state["best"], state["best_state"] = vl, {k: v.detach().clone() for k, v in net.state_dict().items()}
    save()
    if state["best_state"] is not None:
        net.load_state_dict(state["best_state"])
    record = {
        "steps": state["step"],
        "train_minutes": round(state["elapsed"] / 60, 1),
        "best_val_loss": None if not math.isfinite(state["best"]) else round(state["best"], 4),
        "batch": batch_size,
        "crop": crop,
        "lr": lr,
        "seed": seed,
        "base_channels": base,
        "init": None if init is None else Path(init).name,
        "nominal_diameter_px": NOMINAL_DIAMETER,
        "sets": {k: len(sets[k]) for k in names},
        "set_weights": dict(zip(names, [round(float(v), 3) for v in w])),
        "first_loss": state["history"][0]["loss"] if state["history"] else None,
        "last_loss": state["history"][-1]["loss"] if state["history"] else None,
    }
    export_onnx(net, out, card={**(card or {}), "training": record})
    return record


def export_onnx(net, out, *, card: dict | None = None) -> Path:
    """Write ``net`` (+ softmax) as ONNX (opset 17, dynamic N/H/W) with ``card`` in the metadata."""
    torch = require_torch()
    import onnx

    from ..io import atomic_path

    class WithSoftmax(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return torch.softmax(self.inner(x), dim=1)

    model = WithSoftmax(net).eval()
    out = Path(out)
    dummy = torch.zeros(1, 1, 64, 64)
    tmp = out.with_name(out.name + ".export.onnx")
    torch.onnx.export(
        model,
        dummy,
        str(tmp),
        input_names=["image"],
        output_names=["prob"],
        dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}, "prob": {0: "n", 2: "h", 3: "w"}},
        opset_version=17,
        dynamo=False,
    )
    proto = onnx.load(str(tmp))
    tmp.unlink()
    meta = {
        "qdplex_model": "nuclei-unet3",
        "nominal_diameter_px": json.dumps(NOMINAL_DIAMETER),
        "classes": json.dumps(["background", "interior", "boundary"]),
        "card": json.dumps(card or {}),
    }
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    with atomic_path(out) as p:
        onnx.save(proto, str(p))
    return out


def train_nuclei(images, masks, out, *, minutes: float = 60.0, max_steps: int | None = None, val_fraction: float = 0.1,
                 seed: int = 0, crop: int = 128, batch_size: int = 8, init=None, lr: float = 2e-3,
                 log=print, log_every: int = 50) -> dict:
    """Train a nucleus model on a user's annotated images (``qdplex train-nuclei``).

    Parameters
    ----------
    images, masks : path
        Folders of 2-D ``.tif`` images and instance masks with the same file names.
    out : path
        The ONNX model to write (use it with ``[segmentation] model = "..."``).
    minutes : float
        Wall-time budget.
    max_steps : int, optional
        Stop after this many steps.
    val_fraction : float
        Share of the images (at least one when there are two or more) held out
        to choose the best weights.
    seed : int
        Random seed of the split and the training.
    init : path, optional
        Fine-tune this exported model (e.g. the shipped one) instead of training from scratch.
    lr : float
        Peak learning rate (a lower one, e.g. 5e-4, suits fine-tuning).

    Returns
    -------
    dict
        The training record (also in the model's metadata).
    """
    items = load_pairs(images, masks, source="user")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    n_val = min(max(int(round(val_fraction * len(items))), 1 if len(items) > 1 else 0), len(items) - 1)
    val = [items[i] for i in order[:n_val]]
    tr = [items[i] for i in order[n_val:]]
    card = {
        "data": f"{len(items)} annotated images from {Path(images)} (masks {Path(masks)})",
        "split": f"{len(tr)} training, {len(val)} validation images (seed {seed})",
        "command": f"qdplex train-nuclei {images} {masks} --out {out} --minutes {minutes:g}"
                   + ("" if init is None else f" --init {init} --lr {lr:g}"),
    }
    return train({"user": tr}, out, val=val or None, minutes=minutes, max_steps=max_steps, crop=crop,
                 batch_size=batch_size, seed=seed, card=card, init=init, lr=lr, log=log, log_every=log_every)
