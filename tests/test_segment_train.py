"""Training smoke test: a few steps on tiny crops, the loss falls, an ONNX model comes out and segments.

Needs the ``train`` extra (PyTorch, onnx); skips elsewhere. ``make test-train``
runs it in a venv that has them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs the 'train' extra (pip install 'qdplex[train]')")
pytest.importorskip("onnx", reason="the ONNX export needs the 'train' extra (pip install 'qdplex[train]')")
pytest.importorskip("onnxruntime", reason="loading the exported model needs onnxruntime")


def _write_pairs(folder, n=3, seed=0):
    import tifffile

    from qdplex.synth import nuclear_field

    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(n):
        image, truth = nuclear_field((96, 96), pixel_size_um=0.6, crowded=True, seed=seed + i)
        tifffile.imwrite(folder / "images" / f"f{i}.tif", np.clip(image, 0, 65535).astype(np.uint16))
        tifffile.imwrite(folder / "masks" / f"f{i}.tif", truth.astype(np.uint16))


def test_train_few_steps_loss_falls_and_onnx_loads(tmp_path):
    from qdplex.segment import infer
    from qdplex.segment.train import train_nuclei

    _write_pairs(tmp_path)
    out = tmp_path / "model.onnx"
    logs = []
    rec = train_nuclei(tmp_path / "images", tmp_path / "masks", out, minutes=30.0, max_steps=40,
                       crop=64, batch_size=4, log=logs.append, log_every=10)
    assert rec["steps"] == 40
    hist = [json.loads(s) for s in logs if s.startswith("{")]
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"], hist
    m = infer.load_model(out)  # loads with onnxruntime, card in the metadata
    assert m.card["training"]["steps"] == 40 and "train-nuclei" in m.card["command"]
    prob = m.probabilities(np.zeros((40, 56), np.float32))
    assert prob.shape == (3, 40, 56) and np.allclose(prob.sum(axis=0), 1, atol=1e-4)


def test_cli_train_nuclei(tmp_path):
    from qdplex.cli import main

    _write_pairs(tmp_path, n=2, seed=5)
    out = tmp_path / "cli.onnx"
    assert main(["train-nuclei", str(tmp_path / "images"), str(tmp_path / "masks"), "--out", str(out),
                 "--max-steps", "3", "--minutes", "1"]) == 0
    assert out.is_file()
    assert main(["train-nuclei", str(tmp_path / "nope"), str(tmp_path / "masks"), "--out", str(out)]) == 2


def test_fine_tune_starts_from_the_shipped_weights(tmp_path):
    """``init`` loads an exported model exactly (batch norms folded in) and fine-tunes it."""
    from qdplex.segment import infer
    from qdplex.segment.train import build_net, load_onnx_weights, train_nuclei

    net = build_net(norm=False)
    load_onnx_weights(net, infer.DEFAULT_MODEL)
    net.eval()
    x = np.random.default_rng(0).random((1, 1, 48, 64)).astype(np.float32)
    with torch.no_grad():
        mine = torch.softmax(net(torch.from_numpy(x)), 1).numpy()[0]
    assert np.abs(mine - infer.load_model().probabilities(x[0, 0])).max() < 1e-4

    _write_pairs(tmp_path, n=2, seed=7)
    out = tmp_path / "ft.onnx"
    rec = train_nuclei(tmp_path / "images", tmp_path / "masks", out, max_steps=2, crop=64, batch_size=2,
                       init=infer.DEFAULT_MODEL, lr=5e-4, log=lambda s: None)
    m = infer.load_model(out)
    assert rec["init"] == "nuclei.onnx" and "--init" in m.card["command"]


def test_fine_tune_refuses_a_model_of_another_shape(tmp_path):
    from qdplex.errors import SegmentationError
    from qdplex.segment import infer
    from qdplex.segment.train import build_net, load_onnx_weights

    with pytest.raises(SegmentationError, match="expected a weight of shape"):
        load_onnx_weights(build_net(base=8, norm=False), infer.DEFAULT_MODEL)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(SegmentationError, match="bad.onnx"):
        load_onnx_weights(build_net(norm=False), bad)
