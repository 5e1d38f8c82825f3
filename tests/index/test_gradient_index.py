"""The training-gradient index (issue #44): exact where unprojected, the Kronecker projection
equal to its explicit matrix, the projected inverse equal to a dense solve, resumable and
checksummed on disk, never served for another model, data or seed, and the same bytes when
its shards are built on a Dask cluster."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from influence import ExactSolver, InfluenceFunction, LogisticRegression
from influence.index import GradientIndex, IndexMismatchError, KroneckerProjection
from influence.index.gradient_index import _row_kernel

REPO = Path(__file__).resolve().parents[2]


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def lr(digits):
    X, y = digits
    return LogisticRegression(weight_decay=0.01).fit(X[:300], y[:300]), X[400:405], y[400:405]


def stored_rows(index):
    return np.concatenate([np.asarray(r) for s in index.shards_ for _, r in s.read("rows")])


def test_unprojected_index_equals_the_exact_solve_on_a_softmax_model(lr, tmp_path):
    m, xt, yt = lr
    exact = InfluenceFunction(ExactSolver(damping=0.0), curvature="gauss-newton").fit(m).influence_matrix(xt, yt)
    index = GradientIndex(tmp_path / "idx", proj_dim=None, damping=0.0, storage="float64", chunk_rows=128).fit(m)
    assert index.projection_.kind == "exact" and index.projection_.k == m.n_params
    assert rel(index.influence_matrix(xt, yt), exact) < 1e-8
    # self-influence and the ranking agree with the dense answers too
    self_exact = InfluenceFunction(ExactSolver(damping=0.0), curvature="gauss-newton").fit(m).self_scores()
    assert rel(index.self_influence(), self_exact) < 1e-8
    ranking = index.most_influential(xt[0], yt[0], k=5)
    change = -exact[0] / m.n_train_
    assert np.array_equal(ranking.helpful, np.argsort(-change)[:5])
    assert np.array_equal(ranking.harmful, np.argsort(change)[:5])
    # the registry's name
    from influence.estimators import get_estimator

    again = get_estimator("index", path=tmp_path / "idx", proj_dim=None, damping=0.0, storage="float64",
                          chunk_rows=128).fit(m)
    assert again.build_info_["rows_computed"] == 0  # reopened, not rebuilt


def test_unprojected_index_equals_the_exact_solve_on_g_of_a_keras_mlp(digits, tmp_path):
    import keras

    from influence import KerasModel

    X, y = digits
    keras.utils.set_random_seed(1)
    net = keras.Sequential([keras.Input((64,), dtype="float64"), keras.layers.Dense(6, activation="tanh",
                                                                                    dtype="float64"),
                            keras.layers.Dense(10, dtype="float64")])
    net.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    net.fit(X[:120], y[:120], epochs=5, verbose=0)
    m = KerasModel(net, loss="softmax", weight_decay=1e-3).set_training_data(X[:120], y[:120])
    xt, yt = X[300:303], y[300:303]
    damping = 1e-3
    exact = InfluenceFunction(ExactSolver(damping=damping), curvature="gauss-newton").fit(m).influence_matrix(xt, yt)
    index = GradientIndex(tmp_path / "mlp", proj_dim=None, damping=damping, storage="float64").fit(m)
    assert rel(index.influence_matrix(xt, yt), exact) < 1e-8


def tiny_convnet():
    import keras

    from influence import KerasModel

    keras.utils.set_random_seed(3)
    net = keras.Sequential([keras.Input((6, 6, 1), dtype="float64"),
                            keras.layers.Conv2D(8, 3, activation="relu", dtype="float64"),
                            keras.layers.Flatten(dtype="float64"), keras.layers.Dense(6, dtype="float64")])
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((20, 6, 6, 1)), rng.integers(0, 6, 20)
    return KerasModel(net, loss="softmax", weight_decay=1e-3).set_training_data(X, y)


def test_kronecker_projection_of_dense_and_conv_layers_equals_its_explicit_matrix():
    m = tiny_convnet()
    proj = KroneckerProjection(m, 24, seed=5)
    kinds = [layer.describe() for layer in proj.layers]
    assert all(d["projected_in"] and d["projected_out"] for d in kinds), kinds  # both sides of both layers
    P = proj.matrix()  # (p, k): P_in (x) P_out per layer, placed by the kernel and bias blocks
    assert P.shape == (m.n_params, proj.k)
    G = m.per_example_gradients(include_regularizer=False)
    rows, _ = _row_kernel(m, proj, "empirical", 0)(m.X_train_np_, m.y_train_.numpy(), 0)
    np.testing.assert_allclose(rows, G @ P, rtol=1e-10, atol=1e-12)
    # and per layer, against np.kron formed by hand on the layer's (d_in + 1, d_out) gradient
    layer = proj.layers[0]
    lo = sum(b.size for b in m.blocks_[:layer.kernel_block])
    W = G[0, lo:lo + (layer.rows - 1) * layer.d_out].reshape(layer.rows - 1, layer.d_out)
    blo = sum(b.size for b in m.blocks_[:layer.bias_block])
    full = np.vstack([W, G[0, blo:blo + layer.d_out]])
    np.testing.assert_allclose(rows[0, :layer.k], np.kron(layer.P_in, layer.P_out).T @ full.ravel(), rtol=1e-10)
    # the regulariser's projected curvature is P^T D P
    np.testing.assert_allclose(proj.gram_diagonal(m.decay_mask_), P.T @ (m.decay_mask_[:, None] * P),
                               rtol=1e-10, atol=1e-12)


def test_projected_inverse_equals_a_dense_solve(lr, tmp_path):
    m, xt, yt = lr
    index = GradientIndex(tmp_path / "p", proj_dim=64, projection="kronecker", fisher="mc", damping="auto").fit(m)
    C = index.curvature()
    P = index.projection_.matrix()
    B = P.T @ P  # the damping is the full space's: C + d P^T P = P^T (G + d I) P
    d = index.damping_value()
    assert d == pytest.approx(0.1 * np.trace(C) / np.trace(B))
    Phi = index.project_test(xt, yt)
    np.testing.assert_allclose(index.solve(Phi), np.linalg.solve(C + d * B, Phi.T), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="damping"):
        GradientIndex(tmp_path / "q", damping=-1.0)
    with pytest.raises(ValueError, match="fisher must be one of"):
        GradientIndex(tmp_path / "q", fisher="hessian")


@pytest.mark.parametrize("change", ["weights", "data", "seed"])
def test_an_index_is_never_served_for_another_model_data_or_seed(lr, tmp_path, change):
    m, xt, yt = lr
    path = tmp_path / "idx"
    GradientIndex(path, proj_dim=32, seed=0).fit(m)
    other, seed = m, 0
    if change == "weights":
        other = m.at_theta(m.theta_ * 1.01)
    elif change == "data":
        other = m.on_training_subset(np.arange(1, m.n_train_ + 0) [::-1])  # same size, other order
    else:
        seed = 1
    stored = (path / "projection.h5").read_bytes()  # the lr's default projection: PCA, stored
    with pytest.raises(IndexMismatchError, match="built for another"):
        GradientIndex(path, proj_dim=32, seed=seed, on_mismatch="raise").fit(other)
    assert (path / "projection.h5").read_bytes() == stored  # refused: the old index is left as it was
    rebuilt = GradientIndex(path, proj_dim=32, seed=seed).fit(other)
    assert rebuilt.build_info_["rows_computed"] == other.n_train_
    fresh = GradientIndex(tmp_path / "fresh", proj_dim=32, seed=seed).fit(other)
    np.testing.assert_array_equal(stored_rows(rebuilt), stored_rows(fresh))
    want = fresh.influence_matrix(xt, yt)
    np.testing.assert_allclose(rebuilt.influence_matrix(xt, yt), want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def test_an_index_refuses_queries_once_its_model_has_moved(lr, tmp_path):
    m, xt, yt = lr
    moved = m.with_config()  # a copy at the same theta and data
    index = GradientIndex(tmp_path / "stale", proj_dim=32).fit(moved)
    before = index.influence_matrix(xt, yt)
    moved.set_theta(m.theta_ * 1.01)
    with pytest.raises(RuntimeError, match="changed since the index"):
        index.influence_matrix(xt, yt)
    with pytest.raises(RuntimeError, match="changed since the index"):
        index.self_influence()
    moved.set_theta(m.theta_)
    np.testing.assert_array_equal(index.influence_matrix(xt, yt), before)


KILLED_BUILD = textwrap.dedent('''
    import os, signal, sys
    import numpy as np
    from sklearn.datasets import load_digits
    from influence import LogisticRegression
    from influence.index import GradientIndex, store

    X, y = load_digits(return_X_y=True)
    m = LogisticRegression(weight_decay=0.01).fit(X[:300] / 16.0, y[:300])
    written = [0]
    real = store._write_h5

    def dying(path, arrays, attrs):
        written[0] += 1
        if written[0] == 7:  # mid-way (projection and shard 0 done, shard 1 two chunks in): half a file, SIGKILL
            with open(str(path) + ".%d.x.tmp" % os.getpid(), "wb") as f:
                f.write(b"\\x89HDF partial")
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, arrays, attrs)

    store._write_h5 = dying
    GradientIndex(sys.argv[1], proj_dim=48, fisher="mc", chunk_rows=40, shard_rows=120).fit(m)
''')


def test_a_build_killed_mid_way_resumes_to_the_fresh_build(digits, tmp_path):
    X, y = digits
    script = tmp_path / "killed.py"
    script.write_text(KILLED_BUILD)
    path = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", "INFLUENCE_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed, by SIGKILL
    parts = sorted(path.glob("shard-*.parts/chunk-*.h5"))
    assert [p.parent.name for p in parts] == ["shard-00001.parts"] * 2  # two chunks of shard 1 done
    assert [p.name for p in path.glob("shard-*.h5")] == ["shard-00000.h5"]  # shard 0 finished, 1 and 2 not
    assert list(path.glob("shard-00001.parts/*.tmp"))  # the half-written file the kill left behind
    with open(parts[1], "r+b") as f:  # and one finished chunk truncated on disk
        f.truncate(100)
    m = LogisticRegression(weight_decay=0.01).fit(X[:300], y[:300])
    resumed = GradientIndex(path, proj_dim=48, fisher="mc", chunk_rows=40, shard_rows=120).fit(m)
    assert resumed.build_info_["rows_computed"] == 300 - 120 - 40  # shard 0 and the intact chunk were kept
    fresh = GradientIndex(tmp_path / "fresh", proj_dim=48, fisher="mc", chunk_rows=40, shard_rows=120).fit(m)
    np.testing.assert_array_equal(stored_rows(resumed), stored_rows(fresh))
    for a, b in zip(resumed.shards_, fresh.shards_):
        np.testing.assert_array_equal(np.concatenate([s for _, s in a.read("signals")]),
                                      np.concatenate([s for _, s in b.read("signals")]))
    # a finished shard altered on disk is found by its checksums and rebuilt, never read
    with h5py.File(resumed.shards_[0].path, "r+") as f:
        f["rows"][3, 0] += 1.0
    again = GradientIndex(path, proj_dim=48, fisher="mc", chunk_rows=40, shard_rows=120).fit(m)
    assert again.build_info_["rows_computed"] == 120
    np.testing.assert_array_equal(stored_rows(again), stored_rows(fresh))
    assert json.loads((path / "manifest.json").read_text())["n_train"] == 300


def test_a_dask_cluster_build_equals_the_local_one_byte_for_byte(lr, tmp_path):
    from dask.distributed import Client, LocalCluster

    m, xt, yt = lr
    opts = dict(proj_dim=48, fisher="mc", chunk_rows=50, shard_rows=100)
    local = GradientIndex(tmp_path / "local", **opts).fit(m)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        remote = GradientIndex(tmp_path / "dask", **opts).fit(m, executor=client.get_executor())
    assert len(remote.shards_) == 3
    for a, b in zip(local.shards_, remote.shards_):
        for name in ("rows", "signals"):
            with h5py.File(a.path, "r") as fa, h5py.File(b.path, "r") as fb:
                assert fa[name][()].tobytes() == fb[name][()].tobytes()
    np.testing.assert_array_equal(local.influence_matrix(xt, yt), remote.influence_matrix(xt, yt))


def test_gradient_baselines_served_by_the_index_equal_the_direct_ones(multiclass_model, digits, tmp_path):
    """grad_dot / grad_cos through an unprojected index equal the per-example-gradient ones; a
    projected index keeps their ranking (Johnson-Lindenstrauss, E[P P^T] = I)."""
    import scipy.stats

    from influence import GradientIndex
    from influence.estimators import get_estimator

    m = multiclass_model
    X, y = digits
    xt, yt = X[-4:], y[-4:]
    for name in ("grad_dot", "grad_cos"):
        want = get_estimator(name).fit(m).influence_matrix(xt, yt)
        exact = GradientIndex(tmp_path / f"exact-{name}", proj_dim=None, storage="float64")
        got = get_estimator(name, index=exact).fit(m).influence_matrix(xt, yt)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
        sub = get_estimator(name, index=exact).fit(m).influence_matrix(xt, yt, indices=[7, 2])
        np.testing.assert_allclose(sub, want[:, [7, 2]], rtol=1e-9, atol=1e-12 * np.abs(want).max())
        proj = GradientIndex(tmp_path / f"proj-{name}", proj_dim=256, seed=1, projection="random")
        approx = get_estimator(name, index=proj).fit(m).influence_matrix(xt, yt)
        rho = np.mean([scipy.stats.spearmanr(a, b)[0] for a, b in zip(approx, want)])
        assert rho > 0.9, rho
        # the PCA projection (the index's default) is no Johnson-Lindenstrauss map: refused, not served
        with pytest.raises(ValueError, match="projection='random'"):
            get_estimator(name, index=GradientIndex(tmp_path / "pca", proj_dim=256)).fit(m).influence_matrix(xt, yt)
    with pytest.raises(ValueError, match="GradientIndex"):
        get_estimator("grad_dot", index="yes")


def test_pca_projection_keeps_each_layers_top_kfac_eigenvectors_and_is_stored(tmp_path, monkeypatch, caplog):
    """The default projection of a Dense/Conv2D model: per layer, P_in and P_out span the top
    eigenvectors of the K-FAC factors A and S (P^T M P = the top eigenvalues, P^T P = I); the
    rows equal the explicit projection of the per-example gradients; the matrices are stored
    and reopened without a factor pass, and recomputed when the file is altered."""
    import keras

    from influence import KerasModel
    from influence.solvers import kfac

    keras.utils.set_random_seed(4)
    net = keras.Sequential([keras.Input((6, 6, 1), dtype="float64"),
                            keras.layers.Conv2D(12, 3, activation="tanh", dtype="float64"),
                            keras.layers.Flatten(dtype="float64"), keras.layers.Dense(6, dtype="float64")])
    rng = np.random.default_rng(1)
    m = KerasModel(net, loss="softmax", weight_decay=1e-3).set_training_data(rng.standard_normal((30, 6, 6, 1)),
                                                                             rng.integers(0, 6, 30))
    index = GradientIndex(tmp_path / "pca", proj_dim=60, storage="float64", factor_rows=None).fit(m)
    proj = index.projection_
    assert proj.kind == "pca"
    conv, dense = proj.layers
    assert (conv.k_out, dense.k_out) == (8, 6)  # max(c = 6 outputs, 8) output directions, the rest on the inputs
    assert conv.P_in is not None and conv.P_out is not None and dense.P_in is not None and dense.P_out is None
    factors = kfac.compute_factors(m, "expectation")
    for layer, f in zip(proj.layers, factors):
        for P, M in ((layer.P_in, f.A), (layer.P_out, f.S)):
            if P is None:
                continue
            top = np.linalg.eigvalsh(M)[::-1][:P.shape[1]]
            np.testing.assert_allclose(P.T @ P, np.eye(P.shape[1]), atol=1e-10)
            np.testing.assert_allclose(P.T @ M @ P, np.diag(top), atol=1e-9 * top[0])
    G = m.per_example_gradients(include_regularizer=False)
    np.testing.assert_allclose(stored_rows(index), G @ proj.matrix(), rtol=1e-9, atol=1e-12 * np.abs(G).max())
    scores = index.influence_matrix(m.X_train_np_[:3], m.y_train_np_[:3])

    def no_pass(*args, **kwargs):
        raise AssertionError("a factor pass on reopening")

    monkeypatch.setattr(kfac, "compute_factors", no_pass)
    again = GradientIndex(tmp_path / "pca", proj_dim=60, storage="float64", factor_rows=None).fit(m)
    assert again.build_info_["rows_computed"] == 0
    np.testing.assert_allclose(again.influence_matrix(m.X_train_np_[:3], m.y_train_np_[:3]), scores, rtol=1e-12,
                               atol=1e-13 * np.abs(scores).max())
    with h5py.File(tmp_path / "pca" / "projection.h5", "r+") as f:
        f["P0_0"][0, 0] += 1e-3
    with pytest.raises(AssertionError, match="factor pass"):  # altered on disk: never read, recomputed
        GradientIndex(tmp_path / "pca", proj_dim=60, storage="float64", factor_rows=None).fit(m)
    monkeypatch.undo()
    with caplog.at_level("WARNING"):
        third = GradientIndex(tmp_path / "pca", proj_dim=60, storage="float64", factor_rows=None).fit(m)
    assert "recomputed" in caplog.text
    np.testing.assert_allclose(third.influence_matrix(m.X_train_np_[:3], m.y_train_np_[:3]), scores,
                               rtol=1e-9, atol=1e-12 * np.abs(scores).max())
    # a seeded sample of the rows estimates the factors: another projection, so no old row is served
    sampled = GradientIndex(tmp_path / "pca", proj_dim=60, storage="float64", factor_rows=12).fit(m)
    assert sampled.build_info_["rows_computed"] == m.n_train_
    assert sampled.manifest_["projection"]["digest"] != third.manifest_["projection"]["digest"]


def test_top_eigenvectors_by_lanczos_span_the_leading_eigenspace():
    """Wide factors take ARPACK's Lanczos (d > 2000, k < d / 4): the same leading eigenspace as
    LAPACK's dense solver, orthonormal, largest first, signed deterministically."""
    from influence.index.projection import top_eigenvectors

    rng = np.random.default_rng(0)
    d, k = 2100, 12
    Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    w = np.r_[np.linspace(50.0, 20.0, k), rng.uniform(0.0, 1.0, d - k)]
    M = (Q * w) @ Q.T
    V = top_eigenvectors(M, k)
    np.testing.assert_allclose(V.T @ V, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(V.T @ M @ V, np.diag(w[:k]), atol=1e-8)
    assert np.all(V[np.abs(V).argmax(axis=0), np.arange(k)] > 0)
    np.testing.assert_array_equal(top_eigenvectors(M, k), V)


def test_a_temporary_index_directory_goes_with_its_index(lr):
    """path=None (TracIn's per-checkpoint indexes, quick looks): the directory is removed when the
    index is garbage-collected, so repeated use does not fill the disk."""
    import gc

    m, xt, yt = lr
    index = GradientIndex(proj_dim=32, projection="random").fit(m)
    where = index.path
    assert where.is_dir() and list(where.glob("shard-*.h5"))
    del index
    gc.collect()
    assert not where.exists()
