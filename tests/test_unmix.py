"""Unmixing: exactness against scipy, accuracy on measured-spectra mixtures, bad input, dask blocks."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from scipy.optimize import nnls

from qdplex.errors import InputError, SpectraError
from qdplex.model import Channel, MultiplexImage
from qdplex.spectra import SpectralLibrary, estimate_autofluorescence, lambda_grid
from qdplex.unmix import UnmixResult, unmix

QDS = {
    "QD525": "qdot525_em_pubspectra.csv",
    "QD565": "qdot565_em_pubspectra.csv",
    "QD585": "qdot585_em_pubspectra.csv",
    "QD605": "qdot605_em_pubspectra.csv",
    "QD655": "qdot655_em_pubspectra.csv",
    "QD705": "qdot705_em_thermo.csv",
    "QD800": "qdot800_em_thermo.csv",
}


@pytest.fixture(scope="module")
def measured(shared_data) -> SpectralLibrary:
    """Measured QD + DNA-bound DAPI spectra from ../shared/data/spectra."""
    lib = SpectralLibrary()
    for name, f in {"DAPI": "dapi_em_pubspectra.csv", **QDS}.items():
        d = pd.read_csv(shared_data / "spectra" / f)
        lib.add(name, d["wavelength_nm"], d["intensity"], source=f"measured: {f}")
    return lib


def _sparse_abundances(K, shape, rng, scale=50.0, p=0.5):
    return rng.gamma(0.7, scale, size=(K,) + shape) * (rng.random((K,) + shape) < p)


def _rel_err(a, b):
    return float(np.abs(a - b).max())


def test_nnls_equals_scipy_per_pixel():
    rng = np.random.default_rng(0)
    lib = SpectralLibrary.builtin(["DAPI", "QD525", "QD565", "QD605", "QD655", "QD705", "AF"])
    M = lib.matrix(lambda_grid())
    A = _sparse_abundances(7, (60, 60), rng)
    Y = rng.poisson(np.einsum("ck,kyx->cyx", M, A) + 20.0).astype(np.uint16)
    X = unmix(Y, M, "nnls", offset=20.0)
    assert X.shape == (7, 60, 60) and X.dtype == np.float32
    Yf = Y.reshape(31, -1).astype(float) - 20.0
    Xf = X.reshape(7, -1)
    neg = 0
    worst = 0.0
    for n in range(Yf.shape[1]):
        ref = nnls(M, Yf[:, n])[0]
        worst = max(worst, np.abs(Xf[:, n] - ref).max() / max(ref.max(), 1e-12))
        neg += np.any(np.linalg.lstsq(M, Yf[:, n], rcond=None)[0] < 0)
    assert neg > 1000  # most pixels really needed the constrained solver
    assert worst <= 1e-4, worst


def test_noise_free_mixtures_recovered_exactly(measured):
    rng = np.random.default_rng(1)
    chans = lambda_grid(420, 720, 10)
    M = measured.matrix(chans)
    A = _sparse_abundances(len(measured), (40, 40), rng)
    Y = np.einsum("ck,kyx->cyx", M, A).astype(np.float32)
    for method in ("ols", "nnls", "poisson"):
        X = unmix(MultiplexImage(Y, chans), measured, method, chunk=16).abundances.data.compute()
        assert _rel_err(X, A) <= 1e-4 * A.max(), method


def test_nnls_beats_ols_and_crosstalk_below_one_percent(measured):
    """Seven measured QD spectra on a λ-stack 420–850 nm (QD800 lies mostly beyond 720 nm)."""
    rng = np.random.default_rng(2)
    chans = lambda_grid(420, 850, 10)
    qds = measured.subset(list(QDS))
    M = qds.matrix(chans)
    K = len(qds)
    A = _sparse_abundances(K, (50, 50), rng, scale=200.0, p=0.4)
    Y = rng.poisson(np.einsum("ck,kyx->cyx", M, A) + 100.0).astype(np.uint16)
    img = MultiplexImage(Y, chans)
    err = {m: np.sqrt(np.mean((unmix(img, qds, m, offset=100).abundances.data.compute() - A) ** 2))
           for m in ("ols", "nnls")}
    assert err["nnls"] <= err["ols"], err
    # crosstalk: each QD alone (bright), the mean leakage into the other planes
    single = np.zeros((K, K, 30, 30))
    for k in range(K):
        single[k, k] = 2000.0
    Ys = rng.poisson(np.einsum("ck,jkyx->jcyx", M, single) + 100.0)
    for method in ("ols", "nnls"):
        xt = np.zeros((K, K))
        for k in range(K):
            X = unmix(MultiplexImage(Ys[k].astype(np.uint16), chans), qds, method, offset=100)
            means = X.abundances.data.mean(axis=(1, 2)).compute()
            xt[k] = np.abs(means) / means[k]
        np.fill_diagonal(xt, 0)
        assert xt.max() <= 0.01, (method, pd.DataFrame(xt, index=qds.names, columns=qds.names))


def test_poisson_beats_nnls_at_low_counts(measured):
    rng = np.random.default_rng(3)
    chans = lambda_grid(420, 720, 10)
    lib = measured.subset(["DAPI", "QD525", "QD605", "QD655"])
    M = lib.matrix(chans)
    A = _sparse_abundances(4, (60, 60), rng, scale=0.6, p=0.6)
    Y = rng.poisson(np.einsum("ck,kyx->cyx", M, A)).astype(np.uint16)
    img = MultiplexImage(Y, chans)
    err = {m: np.sqrt(np.mean((unmix(img, lib, m).abundances.data.compute() - A) ** 2))
           for m in ("nnls", "poisson")}
    assert err["poisson"] < err["nnls"], err


def test_autofluorescence_from_unstained_control_improves_unmixing(measured):
    """Tissue autofluorescence (two components, unknown to the built-ins) estimated from an
    unstained control: unmixing with it beats unmixing without it."""
    rng = np.random.default_rng(4)
    chans = lambda_grid(420, 720, 10)
    wl = np.arange(380, 760, 1.0)
    af_true = SpectralLibrary()
    af_true.add("flavin", wl, np.exp(-0.5 * ((wl - 530) / 40) ** 2), source="t")
    af_true.add("lipo", wl, np.exp(-0.5 * ((wl - 620) / 60) ** 2), source="t")
    Maf = af_true.matrix(chans)
    shape = (64, 64)
    af_ab = np.stack([rng.gamma(4.0, 8.0, shape), rng.gamma(2.0, 6.0, shape)])
    control = rng.poisson(np.einsum("ck,kyx->cyx", Maf, af_ab) + 100.0).astype(np.uint16)
    stain = measured.subset(["DAPI", "QD565", "QD605", "QD655", "QD705"])
    A = _sparse_abundances(5, shape, rng, scale=40.0, p=0.5)
    af_slide = np.stack([rng.gamma(4.0, 8.0, shape), rng.gamma(2.0, 6.0, shape)])
    Y = rng.poisson(np.einsum("ck,kyx->cyx", stain.matrix(chans), A)
                    + np.einsum("ck,kyx->cyx", Maf, af_slide) + 100.0).astype(np.uint16)
    img = MultiplexImage(Y, chans)
    af_est = estimate_autofluorescence(MultiplexImage(control, chans, name="unstained"), 2, offset=100)
    errs = {}
    for label, lib in {"none": stain, "generic": stain.merge(SpectralLibrary.builtin(["AF"])),
                       "estimated": stain.merge(af_est)}.items():
        X = unmix(img, lib, "nnls", offset=100).abundances.data.compute()[:5]
        errs[label] = np.sqrt(np.mean((X - A) ** 2))
    assert errs["estimated"] < 0.5 * errs["none"], errs
    assert errs["estimated"] < errs["generic"], errs


def test_multiplex_result_structure_and_dask_blocks():
    rng = np.random.default_rng(5)
    lib = SpectralLibrary.builtin(["DAPI", "QD605", "QD655", "AF"])
    chans = lambda_grid()
    A = _sparse_abundances(4, (70, 90), rng)
    Y = rng.poisson(np.einsum("ck,kyx->cyx", lib.matrix(chans), A) + 10).astype(np.uint16)
    img = MultiplexImage(da.from_array(Y, chunks=(5, 33, 41)), chans, pixel_size_um=0.5, name="s")
    res = unmix(img, lib, offset=10, chunk=32)
    assert isinstance(res, UnmixResult) and res.method == "nnls"
    ab = res.abundances
    assert ab.channel_names == ["DAPI", "QD605", "QD655", "AF"]
    assert ab.channels[1] == Channel("QD605", emission_nm=lib.peak_nm("QD605"), fluor="QD605")
    assert isinstance(ab.data, da.Array) and ab.data.dtype == np.float32
    assert ab.data.chunks[0] == (4,) and max(ab.data.chunks[1]) == 32
    assert ab.pixel_size_um == 0.5 and res.residual.shape == (70, 90) and res.saturated.dtype == bool
    whole = unmix(Y, lib.matrix(chans), offset=10)
    np.testing.assert_allclose(ab.data.compute(), whole, atol=1e-4 * whole.max())
    out = res.to_image()
    assert out.channel_names[-1] == "residual" and out.shape == (5, 70, 90)
    kept = res.persist()
    assert len(kept.abundances.data.dask) == len(ab.data.chunks[1]) * len(ab.data.chunks[2])  # in memory
    np.testing.assert_array_equal(kept.abundances.data.compute(), ab.data.compute())
    np.testing.assert_array_equal(kept.saturated.compute(), res.saturated.compute())
    rms = res.residual.compute()
    pred = np.einsum("ck,kyx->cyx", lib.matrix(chans), whole) + 10
    np.testing.assert_allclose(rms, np.sqrt(np.mean((Y - pred) ** 2, axis=0)), rtol=1e-3)


def test_uint16_offset_does_not_wrap_and_saturation():
    lib = SpectralLibrary.builtin(["QD605", "QD655"])
    chans = lambda_grid(560, 700, 10)
    M = lib.matrix(chans)
    Y = np.full((len(chans), 4, 4), 3, dtype=np.uint16)  # below the offset: noise around zero
    X = unmix(Y, M, "ols", offset=5)
    assert X.max() < 0 < 1  # -2 counts, not 65534
    # saturation: flagged; fitting the unsaturated channels recovers the truth
    a = np.array([3000.0, 2000.0])
    y = (M @ a).astype(np.float64)
    Ys = np.repeat(y[:, None, None], 4, axis=1).repeat(4, axis=2)
    Ys = np.minimum(Ys, 20000).astype(np.uint16)
    Ys[:, 0, 0] = (M @ np.array([100.0, 100.0])).astype(np.uint16)
    img = MultiplexImage(Ys, chans)
    assert (Ys >= 20000).any()
    res = unmix(img, lib, saturation=20000)
    sat = res.saturated.compute()
    assert sat.sum() == 15 and not sat[0, 0]
    clipped = res.abundances.data.compute()[:, 1, 1]
    fixed = unmix(img, lib, saturation=20000, exclude_saturated=True).abundances.data.compute()[:, 1, 1]
    assert np.abs(fixed - a).max() < 0.01 * a.max() < np.abs(clipped - a).max()


def test_nonfinite_pixels():
    lib = SpectralLibrary.builtin(["QD605", "QD655"])
    chans = lambda_grid(560, 700, 10)
    M = lib.matrix(chans)
    Y = np.repeat((M @ [10.0, 20.0])[:, None, None], 3, axis=1).repeat(3, axis=2).astype(np.float32)
    Y[2, 1, 1] = np.nan
    Y[5, 2, 2] = np.inf
    img = MultiplexImage(Y, chans, name="nan-slide")
    with pytest.raises(InputError, match="nan-slide.*2 pixels with NaN/inf"):
        unmix(img, lib).abundances.data.compute()
    res = unmix(img, lib, nonfinite="exclude")
    X = res.abundances.data.compute()
    np.testing.assert_allclose(X[:, 1, 1], [10, 20], rtol=1e-4)
    np.testing.assert_allclose(X[:, 2, 2], [10, 20], rtol=1e-4)
    assert np.isfinite(res.residual.compute()).all()


def test_bad_library_and_options():
    lib = SpectralLibrary.builtin(["QD605", "QD800"])
    with pytest.raises(SpectraError, match="QD800"):
        unmix(MultiplexImage(np.zeros((7, 4, 4)), lambda_grid(520, 580, 10)), lib)
    cut = SpectralLibrary().add("QD655", [600, 650, 700], [0.5, 1.0, 0.8], source="cut")
    with pytest.raises(SpectraError, match="QD655.*600–700 nm"):
        unmix(MultiplexImage(np.zeros((31, 4, 4)), lambda_grid()), cut)
    twin = SpectralLibrary.builtin(["QD605"]).merge(
        SpectralLibrary().add("Copy605", *(lambda s: (s.wavelength_nm, s.intensity))(
            SpectralLibrary.builtin(["QD605"])["QD605"]), source="copy"))
    with pytest.raises(SpectraError, match="QD605 and Copy605"):
        unmix(MultiplexImage(np.zeros((31, 4, 4)), lambda_grid()), twin)
    with pytest.raises(SpectraError, match="method"):
        unmix(np.zeros((3, 2, 2)), np.eye(3), "magic")


def test_synthetic_slide_unstained_control_af_beats_none_and_generic():
    """qdplex.synth slide whose tissue autofluorescence is red-shifted (not the generic
    built-in): its unstained control's estimated AF gives the best marker abundances."""
    from qdplex.panel import panel_from_dict
    from qdplex.synth import CAMERA_OFFSET, make_slide

    panel = panel_from_dict({"name": "t", "markers": [
        {"name": "HER2", "fluor": "QD655", "compartment": "membrane"},
        {"name": "ER", "fluor": "QD605", "compartment": "nucleus"},
        {"name": "PR", "fluor": "QD565", "compartment": "nucleus"},
        {"name": "mTOR", "fluor": "QD525", "compartment": "cytoplasm"}]})
    wl = np.arange(350.0, 900.0, 1.0)
    tissue_af = SpectralLibrary().add("AF", wl, np.exp(-0.5 * ((wl - 575) / 70) ** 2), source="lipofuscin-like")
    slide = make_slide(panel, shape=(128, 128), library=SpectralLibrary.builtin().merge(tissue_af),
                       autofluorescence=3.0, unstained=True, seed=3, name="afslide")
    truth = slide.abundances.data.compute()[1:5]  # the four markers' QDs (after DAPI)
    stain = SpectralLibrary.builtin(panel.fluors)
    est = estimate_autofluorescence(slide.unstained, offset=CAMERA_OFFSET)
    errs = {}
    for label, lib in {"none": stain, "generic": stain.merge(SpectralLibrary.builtin(["AF"])),
                       "estimated": stain.merge(est)}.items():
        ab = unmix(slide.image, lib, "nnls", offset=CAMERA_OFFSET).abundances.data.compute()[1:5]
        errs[label] = float(np.sqrt(np.mean((ab - truth) ** 2)))
    assert errs["estimated"] < 0.5 * errs["none"], errs
    assert errs["estimated"] < errs["generic"], errs


def test_lazy_unmixing_is_blockwise_with_bounded_memory():
    """A 31×2048×2048 λ-stack (520 MB as float32) unmixes block by block: peak memory
    stays a small fraction of the image, and every pixel is recovered."""
    import tracemalloc

    lib = SpectralLibrary.builtin(["DAPI", "QD605", "QD655", "AF"])
    chans = lambda_grid()
    truth = np.array([50.0, 20.0, 30.0, 10.0])
    spec = (lib.matrix(chans) @ truth + 100.0).astype(np.float32)
    size = 2048
    data = da.broadcast_to(spec[:, None, None], (31, size, size), chunks=(31, 256, 256))
    full_bytes = 31 * size * size * 4
    res = unmix(MultiplexImage(data, chans), lib, offset=100.0, chunk=256)
    tracemalloc.start()
    try:
        sums, worst = da.compute(res.abundances.data.sum(axis=(1, 2), dtype=np.float64), res.residual.max(),
                                 scheduler="threads")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(sums / size**2, truth, rtol=1e-4)
    assert worst < 1e-2
    assert peak < 0.15 * full_bytes, f"peak {peak / 1e6:.0f} MB for a {full_bytes / 1e6:.0f} MB image"


def test_real_spectral_stack_blind_unmixing(shared_data):
    """Real data: the Leica 3-dye spectral stack (3 excitations × 4 bands). A 3-component NMF
    of its pixels gives the mixing matrix; qdplex NNLS equals scipy's on real pixels and the
    three endmembers explain the stack."""
    from sklearn.decomposition import NMF

    from qdplex.io import read_image

    img = read_image(shared_data / "spectral_stack" / "neherlab_leica_3dye")
    Y = np.asarray(img.data[:, ::2, ::2].compute(), dtype=np.float32)  # 12×256×256 uint8 → float
    C = Y.shape[0]
    pix = Y.reshape(C, -1)
    H = NMF(3, init="nndsvda", max_iter=500, random_state=0).fit(pix.T[::7]).components_  # 3×C
    X = unmix(Y, H.T, "nnls")
    assert X.shape == (3, 256, 256) and X.min() >= 0
    rng = np.random.default_rng(0)
    idx = rng.choice(pix.shape[1], 1500, replace=False)
    Xf = X.reshape(3, -1)
    for n in idx:
        ref = nnls(H.T, pix[:, n].astype(float))[0]
        assert np.abs(Xf[:, n] - ref).max() <= 1e-4 * max(ref.max(), 1e-9)
    fit = H.T @ Xf
    explained = 1.0 - np.sum((pix - fit) ** 2) / np.sum(pix.astype(float) ** 2)
    assert explained > 0.95, explained


@pytest.mark.parametrize("K", [1, 14])
def test_nnls_exact_for_one_and_many_endmembers(K):
    """K = 1, and K = 14 (beyond the passive-set table: the Cholesky active-set path)."""
    rng = np.random.default_rng(K)
    wl = np.arange(400.0, 800.0, 1.0)
    lib = SpectralLibrary()
    for k in range(K):
        lib.add(f"F{k}", wl, np.exp(-0.5 * ((wl - 450 - 22 * k) / 14) ** 2), source="test")
    M = lib.matrix(lambda_grid(420, 780, 8))
    A = _sparse_abundances(K, (20, 30), rng, scale=30.0)
    Y = rng.poisson(M @ A.reshape(K, -1) + 50.0).astype(np.float32) - 50.0
    X = unmix(Y, M, "nnls")
    assert X.shape == (K, 600) and X.min() >= 0
    for n in range(0, 600, 3):
        ref = nnls(M, Y[:, n].astype(float))[0]
        assert np.abs(X[:, n] - ref).max() <= 1e-4 * max(ref.max(), 1e-9)


def test_compiled_pivot_table_equals_the_batched_solves():
    """The compiled passive-set table equals the batched numpy solves it replaces (K = 1…9),
    and a Gram matrix with a singular passive block falls back to them."""
    from qdplex.unmix._kernels import _pivot_table, _pivot_table_for

    rng = np.random.default_rng(3)
    for K in range(1, 10):
        G = (lambda M: M.T @ M)(rng.random((31, K)))
        ref = _pivot_table(G)
        got = _pivot_table_for(G.tobytes(), K).reshape(ref.shape)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    M = rng.random((6, 3))
    M[:, 2] = M[:, 0]  # two equal spectra: the passive set {0, 2} is singular
    G = M.T @ M
    with pytest.raises(np.linalg.LinAlgError):
        _pivot_table_for(G.tobytes(), 3)  # the numpy fallback's own error, as before


@pytest.mark.parametrize("damage", ["garbage", "dynamic-module", "stale-source"])
def test_damaged_kernel_cache_does_not_break_unmixing(tmp_path, monkeypatch, damage):
    """A corrupted or stale numba disk cache of a generated kernel (here: garbage bytes, an
    index whose pickle needs a module '<dynamic>' that cannot be imported, a truncated
    generated source) falls back to a fresh compile with equal results."""
    import importlib
    import sys
    import warnings

    U = importlib.import_module("qdplex.unmix._cache")
    monkeypatch.setenv("QDPLEX_KERNEL_DIR", str(tmp_path))
    rng = np.random.default_rng(7)
    lib = SpectralLibrary.builtin(["QD565", "QD605", "QD655"])
    M = lib.matrix(lambda_grid(520, 700, 10))
    Y = rng.poisson(M @ _sparse_abundances(3, (6, 40), rng).reshape(3, -1) + 5.0).reshape(-1, 6, 40).astype(np.uint16)

    def fresh_run():
        monkeypatch.setattr(U, "_KERNELS", {})
        for name in [m for m in sys.modules if m.startswith("qdplex_fused_k3_")]:
            monkeypatch.delitem(sys.modules, name)
        return unmix(Y, M, "nnls", offset=5.0)

    ref = fresh_run()
    (src,) = tmp_path.glob("qdplex_fused_k3_*.py")
    entries = sorted((tmp_path / "__pycache__").glob(src.stem + ".*"))
    assert {p.suffix for p in entries} == {".nbi", ".nbc"}  # machine code cached on disk
    if damage == "garbage":
        for p in entries:
            p.write_bytes(b"\x80\x04not a pickle")
    elif damage == "dynamic-module":
        for p in entries:
            p.write_bytes(b"c<dynamic>\n_fused\n.")  # unpickling imports the module '<dynamic>'
    else:
        src.write_text(src.read_text()[:200])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        X = fresh_run()
    np.testing.assert_array_equal(X, ref)
    fell_back = [w for w in caught if "unusable numba disk cache" in str(w.message)]
    assert len(fell_back) == (0 if damage == "stale-source" else 1)  # a stale source is rewritten
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = fresh_run()  # the damaged entry was replaced: a clean run from disk
    np.testing.assert_array_equal(again, ref)
    assert not [w for w in caught if "unusable numba disk cache" in str(w.message)]
    for ref_n in range(0, 240, 7):
        y = Y.reshape(len(M), -1)[:, ref_n].astype(float) - 5.0
        assert np.abs(X.reshape(3, -1)[:, ref_n] - nnls(M, y)[0]).max() <= 1e-4 * max(X.max(), 1e-9)


def test_lazy_blocks_cut_from_larger_chunks_are_views():
    """An in-memory image chunked coarser than ``chunk`` is cut into blocks without copies
    (dask's rechunk would copy every piece), with the same abundances as the array path."""
    import importlib

    U = importlib.import_module("qdplex.unmix")
    rng = np.random.default_rng(11)
    lib = SpectralLibrary.builtin(["DAPI", "QD605", "QD655", "AF"])
    chans = lambda_grid()
    A = _sparse_abundances(4, (100, 90), rng)
    Y = rng.poisson(np.einsum("ck,kyx->cyx", lib.matrix(chans), A) + 10).astype(np.uint16)
    data = da.from_array(Y, chunks=(31, 64, 64))
    assert U._blocks(data, 32).chunks[1:] == ((32, 32, 32, 4), (32, 32, 26))
    one = da.Array({("y", 0, 0, 0): Y}, "y", chunks=tuple((n,) for n in Y.shape), dtype=Y.dtype)  # Y itself
    blocks = U._blocks(one, 32)
    assert blocks.chunks[1:] == ((32, 32, 32, 4), (32, 32, 26))
    shared = blocks.map_blocks(lambda b: np.full((1, 1, 1), np.shares_memory(b, Y)), chunks=(1, 1, 1),
                               dtype=bool).compute(scheduler="sync")
    assert shared.all()
    np.testing.assert_array_equal(blocks.compute(), Y)
    res = unmix(MultiplexImage(data, chans), lib, offset=10, chunk=32)
    assert res.abundances.data.chunks[1] == (32, 32, 32, 4)
    whole = unmix(Y, lib.matrix(chans), offset=10)
    np.testing.assert_allclose(res.abundances.data.compute(), whole, atol=1e-5 * whole.max())


def test_kernel_cache_key_is_the_kernel_code_only():
    """The disk-cache key of a generated kernel hashes its code, not its docstrings or
    comments: editing documentation never recompiles users' kernels, editing code does."""
    from qdplex.unmix import _cache
    from qdplex.unmix._codegen import kernel_source

    body, name = kernel_source("fused", 3)
    src = body + f"\n\n{name} = numba.njit(cache=True)({name})\n"
    key = _cache._cache_key(src)
    documented = src.replace("def _fused(", '"""module doc"""\n\ndef _fused(', 1).replace(
        "    CS = C", '    """a docstring"""\n    # a comment\n    CS = C', 1)
    assert documented != src and _cache._cache_key(documented) == key
    assert _cache._cache_key(src.replace("T = 256", "T = 128", 1)) != key
    assert _cache._cache_key(kernel_source("fused", 4)[0]) != key
