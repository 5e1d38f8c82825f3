"""``GradientIndex``: one pass over the training set, a matrix product per query.

Building (:meth:`GradientIndex.fit`) computes, for every training point, its projected loss
gradient ``phi_i = P^T grad L(z_i)`` (:mod:`.projection`) and the projected curvature factors
of the same pass, and writes them to HDF5 shards (:mod:`.store`). The projected curvature is::

    C = (1/n) sum_i sum_c psi_ic psi_ic^T + wd P^T D P

with ``psi_ic = P^T J_i^T r_ic`` (``fisher="expectation"``: ``r_ic`` the columns of ``R_i``,
``R_i R_i^T`` the output Hessian, so ``C = P^T G P`` exactly; ``"mc"``: one label drawn from
the model's predictive distribution per point, an unbiased estimate of the same at one
backward pass; ``"empirical"``: ``psi_i = phi_i``, the empirical Fisher, no extra pass). It
is inverted once, by the generalised eigendecomposition of ``(C, B)`` with ``B = P^T P``
(``U^T C U = diag(lam)``, ``U^T B U = I``). A query is then ``I_up,loss(z_i, z_t) = -phi_t^T
(C + d B)^-1 (phi_i + P^T wd D theta)``: one product per block of stored rows, streamed from disk.

Damping ``d`` is the full space's: ``C + d B = P^T (G + wd D + d I) P``, the projection of
the damped matrix a solver would invert (a Gaussian P has ``B ~ (p / k) I``, so adding
``d I`` in the projected space would be a damping ~k/p times smaller). A number >= 0, or
``"auto"`` = ``damping_factor`` (default 0.1) times the mean eigenvalue ``tr(C) / tr(B)``
(Kronfluence's rule). With ``proj_dim=None`` (P = I, B = I) and ``fisher="expectation"`` the
index equals the exact solve on ``G`` at the same damping.

The projection (:mod:`.projection`) is by default LoGra's PCA variant: per Dense/Conv2D layer
the top eigenvectors of its K-FAC factors (one more pass, over a sample of ``factor_rows``
training rows), stored in ``projection.h5`` and reused while the manifest matches. On dattri's
MNIST MLP (issue #45's benchmark) it raises the LDS from 0.203 (random Kronecker projection, same
k) to 0.335, above CG on G's 0.308 (docs/index.md).

Scale-out: the shards are independent; ``fit(model, executor=...)`` builds them on any
``concurrent.futures.Executor`` (a local process pool, a Dask cluster's
``client.get_executor()``). The batch partition and the Monte Carlo seeds depend only on the
global row numbers, so a sharded build writes the same bytes as a local one.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..estimators.base import Estimator
from ..estimators.influence_function import InfluenceRanking
from ..model_kernels import quiet_member_traces
from ..utils import bar, hash_arrays, progress_on
from ..validation import check_choice, check_number
from . import store as S
from .projection import (EXACT_MAX_PARAMS, PROJECTIONS, ExactProjection, KroneckerProjection, PCAProjection,
                         SparseSignProjection, kronecker_layers, make_projection)

logger = logging.getLogger(__name__)

FISHERS = ("expectation", "mc", "empirical")
STORAGE = ("float32", "float16", "float64")
ON_MISMATCH = ("rebuild", "raise")


class IndexMismatchError(RuntimeError):
    """An index on disk was built for another model, data or setting (``on_mismatch="raise"``)."""


class GradientIndex(Estimator):
    """A training-gradient index (module docstring).

    Parameters
    ----------
    path : str or Path or None
        The index directory (created; reopened when its manifest matches). None: a new
        temporary directory, deleted when this object is garbage-collected.
    proj_dim : int or None
        The projected dimension k (default 4096); None: no projection (exact; refused above
        ``EXACT_MAX_PARAMS`` parameters unless ``exact=True``).
    projection : {"auto", "pca", "random", "kronecker", "sparse-sign"}
        "auto": "pca" (LoGra's PCA-initialised Kronecker projection) where every parameter lies
        in a Dense/Conv2D layer, else "sparse-sign"; "random": a seeded Johnson-Lindenstrauss
        map (Gaussian Kronecker, else sparse sign), as grad_dot / TracIn / TRAK need.
    factor_rows : int or None
        ``projection="pca"``: training rows (a seeded sample) that estimate the K-FAC factors
        whose eigenvectors project (default 2,500: on dattri's MNIST MLP as good as all 5,000,
        LDS 0.338 vs 0.335; 1,000: 0.326); None: all.
    seed : int
        Seed of the projection and of the Monte Carlo labels.
    damping : float or "auto"
        Added to the projected curvature before it is inverted.
    damping_factor : float
        ``damping="auto"``: this times the mean eigenvalue.
    fisher : {"expectation", "mc", "empirical"}
        The curvature (module docstring).
    storage : {"float32", "float16", "float64"}
        How rows are stored (float64 for exact comparisons).
    chunk_rows, shard_rows, batch_size : int
        Rows per checksummed chunk, per shard file, per compiled batch.
    include_regularizer : bool
        Training gradients include ``wd D theta`` (the library's default for ``g(z_i)``).
    on_mismatch : {"rebuild", "raise"}
        What a manifest mismatch does: rebuild from scratch, or raise :class:`IndexMismatchError`.
    """

    name = "index"

    def __init__(self, path=None, proj_dim: int | None = 4096, projection: str = "auto", seed: int = 0,
                 factor_rows: int | None = 2500,
                 damping: float | str = "auto", damping_factor: float = 0.1, fisher: str = "expectation",
                 storage: str = "float32", chunk_rows: int = 1024, shard_rows: int | None = None,
                 batch_size: int = 128, include_regularizer: bool = True, on_mismatch: str = "rebuild",
                 exact: bool = False):
        super().__init__()
        self._tmp = None
        if path is None:  # a fresh temporary directory (never reopened by a later index), removed with the object
            import tempfile

            self._tmp = tempfile.TemporaryDirectory(prefix="influence-index-")
            path = self._tmp.name
        self.path = Path(path)
        self.proj_dim = check_number("proj_dim", proj_dim, low=1, integer=True, allow_none=True)
        self.projection = check_choice("projection", projection, PROJECTIONS)
        self.factor_rows = check_number("factor_rows", factor_rows, low=1, integer=True, allow_none=True)
        self.seed = check_number("seed", seed, low=0, integer=True)
        if isinstance(damping, str):
            check_choice("damping", damping, ("auto",))
        else:
            damping = check_number("damping", damping, low=0.0)
        self.damping = damping
        self.damping_factor = check_number("damping_factor", damping_factor, low=0.0, low_open=True)
        self.fisher = check_choice("fisher", fisher, FISHERS)
        self.storage = check_choice("storage", storage, STORAGE)
        self.chunk_rows = check_number("chunk_rows", chunk_rows, low=1, integer=True)
        self.shard_rows = check_number("shard_rows", shard_rows, low=1, integer=True, allow_none=True)
        self.batch_size = check_number("batch_size", batch_size, low=1, integer=True)
        self.include_regularizer = bool(include_regularizer)
        self.on_mismatch = check_choice("on_mismatch", on_mismatch, ON_MISMATCH)
        self.exact = bool(exact)
        if self.shard_rows is not None and self.shard_rows % self.chunk_rows:
            raise ValueError(f"shard_rows must be a multiple of chunk_rows = {self.chunk_rows}, got {self.shard_rows}")

    # ------------------------------------------------------------------ building
    def fit(self, model, executor=None) -> "GradientIndex":
        """Build the index of ``model``'s training set, or reopen the one at ``path`` if its
        manifest matches (a mismatch rebuilds or raises, ``on_mismatch``; never reused).
        ``executor``: build the shards in parallel on it (``concurrent.futures.Executor``)."""
        super().fit(model)
        if self.proj_dim is None and model.n_params > EXACT_MAX_PARAMS and not self.exact:
            raise ValueError(f"proj_dim=None stores every per-example gradient (p = {model.n_params} numbers per "
                             f"training point) and inverts a (p, p) matrix; refused above {EXACT_MAX_PARAMS} "
                             f"parameters: give proj_dim (e.g. 4096), or exact=True")
        t0 = time.perf_counter()
        base = self._manifest(model)
        self.projection_, new_projection = self._make_projection(model, base)
        self.manifest_ = {**base, "projection": self.projection_.describe()}
        key = S.manifest_hash(self.manifest_)
        old = S.read_manifest(self.path)
        if old is not None and S.manifest_hash(old) != key:
            changed = sorted(k for k in set(old) | set(self.manifest_) if old.get(k) != self.manifest_.get(k))
            msg = (f"the index at {self.path} was built for another {', '.join(changed)}; its rows are not reused")
            if self.on_mismatch == "raise":
                raise IndexMismatchError(msg + " (on_mismatch='raise'; delete it or pass on_mismatch='rebuild')")
            logger.warning("%s: rebuilding", msg)
            S.remove_index_files(self.path)
        S.write_manifest(self.path, self.manifest_)
        if new_projection is not None:  # written only once the old index may be replaced
            S.write_keyed(*new_projection)
        self.shards_ = [S.Shard(self.path, j, lo, hi, self.chunk_rows, key)
                        for j, (lo, hi) in enumerate(self.manifest_["shards"])]
        todo = [s for s in self.shards_ if not s.finished()]
        computed = 0
        if todo:
            if executor is None:
                with quiet_member_traces():  # a new kernel per index (one per model of an ensemble)
                    computed = _build_local(model, self._spec(), self.projection_, todo)
            else:
                futures = [executor.submit(build_shard, model.on_training_subset(np.arange(s.start, s.stop)),
                                           self._spec(), self.projection_, s.number, s.start, s.stop,
                                           str(self.path), key)
                           for s in todo]
                computed = sum(f.result() for f in futures)
            bad = [s.number for s in todo if not s.finished()]
            if bad:
                raise RuntimeError(f"index shards {bad} did not finish")
        self._curvature = None
        self._inverse = None
        self.build_info_ = {"rows_computed": int(computed), "rows": int(model.n_train_), "k": self.projection_.k,
                            "seconds": time.perf_counter() - t0, "shards": len(self.shards_)}
        logger.info("gradient index %s: %d rows x k = %d (%d computed now) in %.1fs", self.path, model.n_train_,
                    self.projection_.k, computed, self.build_info_["seconds"])
        return self

    def _spec(self) -> dict:
        return {"seed": self.seed, "fisher": self.fisher, "storage": self.storage, "chunk_rows": self.chunk_rows,
                "batch_size": self.batch_size}

    def _make_projection(self, model, base: dict):
        """``(projection, to_store)``: a PCA projection is reused from ``projection.h5`` when it was
        made for the same model, data and settings (``base``: the manifest without the
        projection) and its checksum holds, else computed (a factor pass) and returned with
        ``(path, arrays, key)`` for :meth:`fit` to store once the old index may be replaced
        (``on_mismatch="raise"`` leaves it untouched); other projections: ``to_store`` None."""
        kind = self.projection
        if kind == "auto":
            kind = "pca" if kronecker_layers(model) is not None else "sparse-sign"
        if kind != "pca" or self.proj_dim is None or self.proj_dim >= model.n_params:
            return make_projection(model, self.proj_dim, kind, self.seed), None
        request = {**base, "projection": ["pca", self.proj_dim, self.seed, self.fisher, self.factor_rows]}
        key, path = S.manifest_hash(request), self.path / "projection.h5"
        opts = dict(fisher=self.fisher, factor_rows=self.factor_rows)
        state = S.read_keyed(path, key)
        if state is not None:
            return PCAProjection(model, self.proj_dim, self.seed, state=state, **opts), None
        if path.exists():
            logger.warning("index projection %s was made for another model, data or setting, or fails its "
                           "checksum: recomputed", path)
        proj = PCAProjection(model, self.proj_dim, self.seed, **opts)
        return proj, (path, proj.arrays(), key)

    def _manifest(self, model) -> dict:
        from .. import __version__

        n = model.n_train_
        per = self.shard_rows or max(self.chunk_rows, -(-n // self.chunk_rows) * self.chunk_rows)
        return {"format": S.FORMAT_VERSION, "library_version": __version__,
                "model": model.cache_identity(), "weights": hash_arrays(model.theta_),
                "data": model.data_fingerprint_, "n_train": int(n),
                "blocks": [[b.name, list(b.shape), bool(b.decay)] for b in model.blocks_],
                "fisher": self.fisher, "storage": self.storage,
                "chunk_rows": self.chunk_rows, "batch_size": self.batch_size,
                "shards": [[lo, min(lo + per, n)] for lo in range(0, n, per)]}

    # ------------------------------------------------------------------ curvature
    def curvature(self) -> np.ndarray:
        """``C`` (k, k): the projected curvature with the regulariser (module docstring)."""
        if self._curvature is None:
            self._curvature = self._load_or_compute_curvature()
        return self._curvature[0]

    def eigen(self) -> tuple[np.ndarray, np.ndarray]:
        """``(lam, U)``: the generalised eigenpairs of ``(C, B)``, ``B = P^T P`` (ascending;
        ``U^T B U = I``)."""
        self.curvature()
        return self._curvature[1], self._curvature[2]

    def damping_value(self) -> float:
        """The damping used: ``damping``, or ``"auto"``: ``damping_factor * tr(C) / tr(B)``."""
        if self.damping == "auto":
            C, B = self.curvature(), self._curvature[3]
            return float(self.damping_factor * max(float(np.trace(C) / np.trace(B)), 0.0))
        return float(self.damping)

    def _load_or_compute_curvature(self):
        path = self.path / "curvature.h5"
        key = hash_arrays(S.manifest_hash(self.manifest_), [_shard_sums(s) for s in self.shards_])
        names = ("C", "lam", "U", "B")
        stored = S.read_keyed(path, key, names)
        if stored is not None:
            return tuple(stored[n] for n in names)
        if path.exists():
            logger.warning("index curvature %s does not match the shards: recomputed", path)
        model = self.model_
        k, n = self.projection_.k, model.n_train_
        C = np.zeros((k, k))
        name = "rows" if self.fisher == "empirical" else "signals"
        for shard in self.shards_:
            for _, block in shard.read(name):
                block = np.asarray(block, dtype=np.float64).reshape(-1, k)
                C += block.T @ block
        C /= max(n, 1)
        C += model.weight_decay * self.projection_.gram_diagonal(model.decay_mask_)
        C = 0.5 * (C + C.T)
        B = self.projection_.gram_diagonal(np.ones(model.n_params))  # P^T P
        B = 0.5 * (B + B.T)
        import scipy.linalg

        lam, U = scipy.linalg.eigh(C, B)  # U^T C U = diag(lam), U^T B U = I
        S.write_keyed(path, {"C": C, "lam": lam, "U": U, "B": B}, key, names)
        return C, lam, U, B

    def solve(self, Phi: np.ndarray) -> np.ndarray:
        """``(C + d B)^-1 Phi^T`` for rows ``Phi`` (m, k): (k, m)."""
        lam, U = self.eigen()
        d = self.damping_value()
        denom = lam + d
        if not np.all(denom > 0):
            raise ValueError(f"the projected curvature plus damping {d:g} is not positive definite (smallest "
                             f"eigenvalue {float(lam[0]):.3g}); raise damping")
        return U @ ((U.T @ np.asarray(Phi, dtype=np.float64).T) / denom[:, None])

    # ------------------------------------------------------------------ projected gradients
    def _current_model(self):
        """The fitted model, checked to be the one the index was built from (its theta and data
        can change by ``set_theta`` / ``set_training_data``: the stored rows would then be stale)."""
        model = self.model_
        if hash_arrays(model.theta_) != self.manifest_["weights"] or model.data_fingerprint_ != self.manifest_["data"]:
            raise RuntimeError(f"the model's theta or training data changed since the index at {self.path} was built: "
                               f"call fit(model) again (the rows are rebuilt for the new state)")
        return model

    def project_test(self, X_test, y_test) -> np.ndarray:
        """``phi_t = P^T grad L(z_t)`` for each test point, (m, k) (no regulariser)."""
        model = self._current_model()
        X_test, y_test = model.as_batch(X_test, y_test)
        X_test, y_enc = model.check_xy(X_test, y_test, "X_test")
        if getattr(self, "_test_kernel", None) is None or self._test_kernel[0] is not self.projection_:
            self._test_kernel = (self.projection_, _row_kernel(model, self.projection_, "empirical", self.seed))
        kernel = self._test_kernel[1]
        out = []
        with quiet_member_traces():
            for s in range(0, len(X_test), self.batch_size):
                rows, _ = kernel(X_test[s:s + self.batch_size], y_enc[s:s + self.batch_size], 0)
                out.append(rows)
        return np.concatenate(out) if out else np.zeros((0, self.projection_.k))

    def _regularizer_row(self) -> np.ndarray:
        m = self.model_
        if not self.include_regularizer or m.weight_decay == 0:
            return np.zeros(self.projection_.k)
        return self.projection_.project_vector(m.weight_decay * m.decay_mask_ * np.asarray(m.theta_, np.float64))

    def _rows(self, block: int | None = None, regularizer: bool = True):
        """Yield ``(global slice, phi_i + regulariser)`` over every training row, in order."""
        self._current_model()
        reg = self._regularizer_row() if regularizer else 0.0
        for shard in self.shards_:
            for sl, rows in shard.read("rows", block):
                yield sl, np.asarray(rows, dtype=np.float64) + reg

    # ------------------------------------------------------------------ queries
    def _influence_matrix(self, X_test, y_test, indices=None) -> np.ndarray:
        """``I_up,loss(z_i, z_t)`` (n_test, m) for training points ``indices`` (default all)."""
        model = self.model_
        idx = model.check_indices(indices)
        W = self.solve(self.project_test(X_test, y_test))  # (k, n_test)
        full = np.empty((W.shape[1], model.n_train_))
        for sl, rows in self._rows():
            full[:, sl] = -(rows @ W).T
        return full[:, idx]

    def gradient_similarity(self, X_test, y_test, cosine: bool = False, indices=None) -> np.ndarray:
        """``-phi_t . phi_i`` (n_test, m): the gradient dot product of ``grad_dot`` in the projected space
        (``E[P P^T] = I``, so unbiased; exact for the exact projection), with the regulariser in the
        training rows as ``grad_dot``; ``cosine``: ``-cos(phi_t, phi_i)``. No curvature, no solve."""
        model = self.model_
        idx = model.check_indices(indices)
        if isinstance(self.projection_, PCAProjection):
            raise ValueError("gradient dot products need a Johnson-Lindenstrauss projection (E[P P^T] = I); this "
                             "index projects on the K-FAC factors' top eigenvectors (projection='pca', the 'auto' "
                             "choice for Dense/Conv2D models): build it with projection='random'")
        T = self.project_test(X_test, y_test).astype(np.float64)
        if cosine:
            T = T / np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-300)
        full = np.empty((len(T), model.n_train_))
        for sl, rows in self._rows():
            if cosine:
                rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-300)
            full[:, sl] = -T @ rows.T
        return full[:, idx]

    def _self_scores(self) -> np.ndarray:
        """``I_up,loss(z_i, z_i) = -phi_i^T (C + d I)^-1 phi_i`` for every training point, with the
        loss gradient alone (no regulariser: as :meth:`InfluenceFunction.self_scores`)."""
        out = np.empty(self.model_.n_train_)
        for sl, rows in self._rows(regularizer=False):
            out[sl] = -np.sum(rows * self.solve(rows).T, axis=1)
        return out

    def self_influence(self) -> np.ndarray:
        """Each training point's influence on its own loss (Fig 6's mislabel check order ranks
        by its magnitude): :meth:`self_scores`."""
        return self.self_scores()

    def most_influential(self, X_test, y_test, k: int = 10):
        """The ``k`` most helpful and most harmful training points of each test point, streamed
        over the index (no (n_test, n_train) matrix): a list of
        :class:`~influence.estimators.InfluenceRanking` (one per test point; a single test point
        gives one ranking). Changes are ``-I_up,loss / n`` (helpful: removal raises the loss)."""
        k = check_number("k", k, low=1, integer=True)
        model = self.model_
        single = np.ndim(X_test) == len(model.x_shape_)
        W = self.solve(self.project_test(X_test, y_test))
        m, n = W.shape[1], model.n_train_
        best = [np.zeros((m, 0)), np.zeros((m, 0), dtype=np.int64)]  # change, index: largest first
        worst = [np.zeros((m, 0)), np.zeros((m, 0), dtype=np.int64)]
        for sl, rows in self._rows():
            change = ((rows @ W) / n).T  # -I / n = phi W / n
            ids = np.broadcast_to(np.arange(sl.start, sl.stop), change.shape)
            for keep, sign in ((best, 1.0), (worst, -1.0)):
                vals = np.concatenate([keep[0], change], axis=1)
                where = np.concatenate([keep[1], ids], axis=1)
                top = np.argsort(-sign * vals, axis=1, kind="stable")[:, :k]
                keep[0], keep[1] = np.take_along_axis(vals, top, 1), np.take_along_axis(where, top, 1)
        out = []
        for t in range(m):
            up, down = best[0][t] > 0, worst[0][t] < 0
            out.append(InfluenceRanking(helpful=best[1][t][up], helpful_change=best[0][t][up],
                                        harmful=worst[1][t][down], harmful_change=worst[0][t][down]))
        return out[0] if single else out

    def config(self) -> dict:
        return {"estimator": self.name, **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self).items()
                                           if not k.startswith("_") and not k.endswith("_")}}


def _shard_sums(shard) -> list:
    import h5py

    with h5py.File(shard.path, "r") as f:
        return list(f.attrs["checksums"])


# ---------------------------------------------------------------------- the build pass
def _chunk_computer(model, projection, spec, offset: int):
    """``compute(lo, hi)`` over the model's training rows ``lo - offset .. hi - offset`` (global
    numbers lo, hi: batches and Monte Carlo seeds follow them, not the shard)."""
    kernel = _row_kernel(model, projection, spec["fisher"], spec["seed"])
    store = np.dtype(spec["storage"])
    bs = spec["batch_size"]
    X, Y = model.X_train_np_, model.y_train_.numpy()

    def compute(lo, hi):
        rows, sigs = [], []
        for a in range(lo, hi, bs):
            b = min(a + bs, hi)
            r, s = kernel(X[a - offset:b - offset], Y[a - offset:b - offset], a)
            rows.append(r.astype(store))
            if s is not None:
                sigs.append(s.astype(store))
        return np.concatenate(rows), (np.concatenate(sigs) if sigs else None)

    return compute


def _build_local(model, spec, projection, shards) -> int:
    compute = _chunk_computer(model, projection, spec, 0)
    total = sum(s.n_rows for s in shards)
    shown = bar(total=total, desc=f"gradient index (k = {projection.k})", enabled=progress_on(model.progress),
                unit="row")
    try:
        return sum(s.build(compute, shown.update) for s in shards)
    finally:
        shown.close()


def build_shard(model, spec: dict, projection, number: int, start: int, stop: int, path: str, key: str) -> int:
    """Build one shard in a worker: ``model`` holds the shard's rows only (rows ``start..stop``
    of the full training set); ``projection`` is the index's own (made once from the whole
    training set). Returns the rows computed."""
    shard = S.Shard(Path(path), number, start, stop, spec["chunk_rows"], key)
    return shard.build(_chunk_computer(model, projection, spec, start))


def project_gradients(model, projection, X, y_encoded, batch_size: int = 128, kernel=None) -> np.ndarray:
    """``P^T grad L(z_i)`` (no regulariser) for each example ``(X, y_encoded)``, (m, k), batch by
    batch (``kernel``: a :func:`row_kernel` of the same model and projection, to reuse its trace)."""
    kernel = row_kernel(model, projection) if kernel is None else kernel
    out = [kernel(X[s:s + batch_size], y_encoded[s:s + batch_size], 0)[0] for s in range(0, len(X), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, projection.k))


def row_kernel(model, projection):
    """The compiled projected-gradient pass of ``model`` (loss gradients only), for :func:`project_gradients`."""
    return _row_kernel(model, projection, "empirical", 0)


def _row_kernel(model, projection, fisher: str, seed: int):
    """``kernel(X, y_encoded, first_row) -> (rows (b, k), signals (b, c, k) or None)`` as numpy."""
    import tensorflow as tf

    theta = tf.constant(model.theta_)
    if isinstance(projection, KroneckerProjection):
        fn = _kronecker_kernel(model, projection, fisher)

        def run(X, Y, first):
            rows, sigs = fn(theta, tf.constant(X), tf.constant(Y), tf.constant([seed, first], tf.int32))
            return rows.numpy(), (None if sigs is None else sigs.numpy())
        return run
    # exact or sparse-sign: per-example gradients of all p parameters, projected after
    from ..curvature.kernels import gauss_newton_factor_kernel

    per_example = model.kernels.per_example_grads
    factor = tf.function(gauss_newton_factor_kernel(model), reduce_retracing=True) if fisher == "expectation" else None
    post = (lambda G: np.asarray(G, dtype=np.float64)) if isinstance(projection, ExactProjection) else \
        (lambda G: projection.project_rows(G))
    assert isinstance(projection, (ExactProjection, SparseSignProjection))

    def run(X, Y, first):
        x, y = tf.constant(X), tf.constant(Y)
        rows = post(per_example(theta, x, y).numpy())
        if fisher == "empirical":
            return rows, None
        if fisher == "expectation":
            A = factor(theta, x, y).numpy()  # (b, c, p)
            b, c, p = A.shape
            return rows, post(A.reshape(b * c, p)).reshape(b, c, -1)
        out = model.forward(model.unflatten(theta), x)
        ys = model.sample_targets(out, tf.constant([seed, first], tf.int32), y.dtype)
        return rows, post(per_example(theta, x, ys).numpy())[:, None, :]

    return run


def _kronecker_kernel(model, projection, fisher):
    """The compiled LoGra pass: taps, backward signals (the loss's, and the curvature's), each
    layer's input and signal projected before their per-example outer product."""
    import tensorflow as tf

    from ..solvers.kfac import as_positions, backward_signals, kernel_matrix_shape, tap_inputs

    mats = projection.tensors()
    layers = projection.layers
    blocks = model.blocks_

    def project(tap, layer, P, signal, a_proj):
        d_out = kernel_matrix_shape(blocks[tap.kernel_block].shape)[1]
        g = as_positions(signal, d_out)
        g = g if P[1] is None else tf.einsum("btj,jl->btl", g, tf.cast(P[1], g.dtype))
        r = tf.einsum("btk,btl->bkl", a_proj, g)
        return tf.reshape(r, [tf.shape(r)[0], layer.k])

    def kernel(theta, x, y, seed):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(theta)
            out, taps = model.kfac_taps(model.unflatten(theta), x)
            s_list = [t.s for t in taps]
            loss = tf.reduce_sum(model.pointwise_loss(out, y))
            sampled = None
            if fisher == "mc":
                sampled = tf.reduce_sum(model.pointwise_loss(out, model.sample_targets(tf.stop_gradient(out), seed,
                                                                                      y.dtype)))
        zero = tf.UnconnectedGradients.ZERO
        loss_sig = tape.gradient(loss, s_list, unconnected_gradients=zero)
        if fisher == "mc":
            curv = [tape.gradient(sampled, s_list, unconnected_gradients=zero)]
        elif fisher == "expectation":
            curv = backward_signals(model, tape, out, s_list, y, [])
        else:
            curv = []
        del tape
        rows, sig_rows = [], [[] for _ in curv]
        for i, (tap, layer, P) in enumerate(zip(taps, layers, mats)):
            a = tap_inputs(tap, blocks[tap.kernel_block].shape, tap.bias_block is not None)
            a = a if P[0] is None else tf.einsum("bti,ik->btk", a, tf.cast(P[0], a.dtype))
            rows.append(project(tap, layer, P, loss_sig[i], a))
            for c, sig in enumerate(curv):
                sig_rows[c].append(project(tap, layer, P, sig[i], a))
        rows = tf.concat(rows, axis=1)
        sigs = tf.stack([tf.concat(r, axis=1) for r in sig_rows], axis=1) if curv else None
        return rows, sigs

    return tf.function(kernel, reduce_retracing=True)
