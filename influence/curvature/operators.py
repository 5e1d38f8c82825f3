"""Curvature operators: the matrix every solver inverts, as an object over a fitted model.

``HessianOperator(model)`` is ``H = (1/n) sum_i nabla^2 L(z_i) + wd * diag(mask)``, the
Hessian of the training objective at the model's current ``theta``;
``GaussNewtonOperator(model)`` is ``G = (1/n) sum_i J_i^T [d^2 L / d f^2] J_i + wd *
diag(mask)`` (see :mod:`influence.generic_neural_net`), positive semi-definite for every
loss convex in the outputs. With ``indices``, the loss part averages over those training
points only (a sub-sampled operator); the regulariser is always whole.

An operator owns its compiled kernels and its caches (the explicit matrix, the extreme
eigenvalues, each training point's curvature), each keyed by :meth:`state_key` (theta,
the training data, the model's hyperparameters, the operator): a model re-fitted or given
new data gets fresh values. The model itself is never modified; an operator may be taken at
another theta than the model's (``theta=``, :meth:`CurvatureOperator.at`). Where the model
offers a closed form of its curvature (:meth:`GenericNeuralNet.closed_form_curvature`: the
linear models), products and the explicit matrix use it. There is no module-level cache:
a model's shared operators belong to its :class:`~influence.facade.Influence`.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import tensorflow as tf

from ..utils import bar, frozen_copy, hash_arrays, memo, progress, progress_on
from ..validation import check_choice
from . import kernels as K

logger = logging.getLogger(__name__)

CURVATURES = ("hessian", "gauss-newton")


def check_curvature(curvature: str) -> str:
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    return curvature


class CurvatureOperator:
    """A symmetric (p, p) curvature matrix of a fitted model, applied by batched passes.

    Parameters
    ----------
    model : GenericNeuralNet
        A model with training data; read at each call (its current theta and data).
    indices : array of int or None
        Training points the loss part averages over (None: all).
    theta : array or None
        The parameters it is taken at (None: the model's ``theta_``, read at each call).
    closed_form : object or None
        The model's closed-form curvature to use (None: ``model.closed_form_curvature()``; an
        :class:`~influence.facade.Influence` passes one to both of its operators, so that they
        share its column split).
    """

    kind = "base"

    def __init__(self, model, indices=None, *, theta=None, closed_form=None):
        model.require_fit()
        self.model = model
        self.indices = None if indices is None else model.check_indices(indices)
        self._theta = None if theta is None else self._check_theta(theta)
        forms = closed_form if closed_form is not None else model.closed_form_curvature()
        self._forms = forms if forms is not None and (self.kind == "hessian" or model.linear_outputs) else None
        one, many = (K.closed_form_kernels(self._forms.batch_sum) if self._forms is not None
                     else self._make_kernels(model))
        self._one, self._many = K.compiled(one), K.compiled(many)
        self._batch_many = many  # uncompiled: for loops that compile it inside their own tf.function
        self._eigmax = None
        self._factor = None
        self._caches: dict[str, tuple] = {}
        self._owned: dict[str, object] = {}

    # ------------------------------------------------------------------ identity
    def _check_theta(self, theta) -> np.ndarray:
        m = self.model
        theta = np.asarray(theta, dtype=m.dtype).reshape(-1)
        if theta.shape != (m.n_params,) or not np.all(np.isfinite(theta)):
            raise ValueError(f"theta must be {m.n_params} finite numbers, got shape {theta.shape}")
        return frozen_copy(theta, theta)

    @property
    def theta(self) -> np.ndarray:
        """The parameters this operator is taken at (the model's ``theta_`` unless given)."""
        return self.model.theta_ if self._theta is None else self._theta

    def _theta_tensor(self) -> tf.Tensor:
        return tf.constant(self.theta)

    def at(self, theta) -> "CurvatureOperator":
        """The same operator at another theta: a new object sharing the compiled products (its
        caches start empty); this one is left as it is."""
        new = copy.copy(self)
        new._theta = self._check_theta(theta)
        new._caches = {}
        return new

    @property
    def n_params(self) -> int:
        return self.model.n_params

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_params, self.n_params

    @property
    def n_points(self) -> int:
        return self.model.n_train_ if self.indices is None else len(self.indices)

    def state_key(self) -> tuple:
        """What every value this operator computes depends on: theta, the training data, the
        model's class and hyperparameters (weight decay, dtype, ...), the operator's kind and
        its sub-sample."""
        m = self.model
        return (hash_arrays(self.theta), m.data_fingerprint_, hash_arrays(m.cache_identity()), self.kind,
                None if self.indices is None else hash_arrays(self.indices))

    def _cached(self, name: str, key, compute):
        return memo(self._caches, name, key, compute)

    def owned(self, name: str, build):
        """A value another component builds once for this operator and leaves in its keeping
        (LiSSA's compiled series loop: it depends on the operator alone, its inputs are arguments)."""
        found = self._owned.get(name)
        if found is None:
            found = self._owned[name] = build()
        return found

    #: whether a training point's curvature from the Gauss-Newton form is exact for this operator
    def _example_curvature_exact(self) -> bool:
        return self.model.linear_outputs

    def _make_kernels(self, model):  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ products
    def columns_per_pass(self) -> int:
        """Most columns one batched pass carries (the model's ``hvp_max_columns``; default
        1024 where the outputs are linear in theta, else 8: a many-column pass holds one copy
        of the batch's activations per column)."""
        cols = self.model.hvp_max_columns
        if cols is not None:
            if int(cols) < 1:
                raise ValueError(f"hvp_max_columns must be >= 1, got {cols}")
            return int(cols)
        return 1024 if self.model.linear_outputs else 8

    def hvp(self, v: np.ndarray, indices=None) -> np.ndarray:
        """``C v`` (or ``C V`` for a (p, k) matrix). ``indices``: average the loss part over
        those training points instead of the operator's own."""
        m = self.model
        v = np.asarray(v, dtype=m.dtype)
        if v.shape[0] != m.n_params or v.ndim not in (1, 2):
            raise ValueError(f"v must have shape ({m.n_params},) or ({m.n_params}, k), got {v.shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError("v contains NaN or infinite values")
        step = self.columns_per_pass()
        if v.ndim == 2 and v.shape[1] > step:  # bounded memory: a block of columns per pass over the data
            return np.concatenate([self.hvp(v[:, j:j + step], indices) for j in range(0, v.shape[1], step)], axis=1)
        idx = self.indices if indices is None else m.check_indices(indices)
        n = m.n_train_ if idx is None else len(idx)
        if self._numpy_closed_form():
            out = self._closed_form_sum(v if v.ndim == 2 else v[:, None], idx)
            out = out if v.ndim == 2 else out[:, 0]
            mask = m.decay_mask_ if v.ndim == 1 else m.decay_mask_[:, None]
            return out / n + m.weight_decay * mask * v
        out = m.map_train(self._one if v.ndim == 1 else self._many, self._theta_tensor(), tf.constant(v), indices=idx)
        mask = m.decay_mask_ if v.ndim == 1 else m.decay_mask_[:, None]
        return out / n + m.weight_decay * mask * v

    matvec = hvp

    def low_precision(self) -> "CurvatureOperator":
        """A float32 twin of this float64 operator (a float32 copy of the model at the same theta
        and data; cached per state), for mixed-precision solves: its products are cheaper
        on a CPU and agree with this operator's to ~1e-6 relative."""
        m = self.model
        if m.dtype != "float64":
            raise ValueError(f"low_precision: the model already computes in {m.dtype}")

        def make():
            cfg = m.get_config()
            if "dtype" not in cfg or "model" in cfg:  # a wrapped Keras network keeps its layers' dtype
                raise ValueError(f"precision='mixed' needs a model that can be rebuilt in float32 from its "
                                 f"configuration; {type(m).__name__} cannot (build a float32 network instead)")
            twin = m.with_config(dtype="float32", cache_dir=None)
            return type(self)(twin, indices=self.indices, theta=np.asarray(self.theta, np.float32))

        return self._cached("low_precision", self.state_key(), make)

    def _numpy_closed_form(self) -> bool:
        return self._forms is not None and self.model.strategy is None

    def _closed_form_weights(self):
        """What the closed-form products need of theta (softmax regression: ``softmax(X W)``)
        for every training point, once per state; None for a model without them."""
        m = self.model
        if self._forms is None:
            return None
        X, theta = m.X_train_np_, np.asarray(self.theta)
        rows = int(max(512, 2 ** 22 // max(1, m.n_params // max(1, X.shape[1]) * X.shape[1])))
        return self._cached("closed_form_weights", self.state_key(), lambda: np.concatenate(
            [self._forms.weights(theta, np.asarray(X[s:s + rows], dtype=m.dtype))
             for s in range(0, X.shape[0], rows)]))

    def _refuse_explicit(self):
        m = self.model
        if m.n_params > m.max_hessian_params:
            raise ValueError(f"explicit Hessian refused ({self.kind}) for p = {m.n_params} > max_hessian_params = "
                             f"{m.max_hessian_params}: use solver='cg' or 'lissa' (with CG's Nystrom "
                             f"preconditioner, a preconditioner_rank below p - 1 = {m.n_params - 1}), or raise "
                             f"max_hessian_params")

    def _closed_form_sum(self, V, idx):
        """``sum_i C_i V`` by the model's numpy closed form (``closed_form.numpy_sum(theta, x, V)``),
        over row blocks of ~32 MB of intermediate products."""
        m = self.model
        X = m.X_train_np_
        theta = np.asarray(self.theta)
        width = V.shape[1] * max(1, m.n_params // max(1, X.shape[1])) + 1  # outputs x (columns + 1)
        rows = int(max(512, min(m.batch_size, 2 ** 22 // width)))  # ~32 MB of products per block
        n = X.shape[0] if idx is None else len(idx)
        weights = self._closed_form_weights()
        if idx is None and weights is not None and self._forms.has_split_sum:
            split = self._forms.split()  # shared by the operators given the same closed form
            if split is not None:  # None: dense data, where the plain pass reads about as much
                return self._forms.split_sum(split, V, weights, rows)
        out = None
        for start in range(0, n, rows):
            block = slice(start, start + rows) if idx is None else idx[start:start + rows]
            x = X[block]
            part = self._forms.numpy_sum(theta, np.asarray(x, dtype=m.dtype), V,
                                         None if weights is None else weights[block])
            out = part if out is None else out + part
        return np.zeros_like(V) if out is None else out

    def __matmul__(self, v):
        return self.hvp(v)

    def batch_sum_many(self, theta, x, y, V):
        """``sum_{i in batch} C_i V`` (no regulariser) as TF ops, for loops compiled elsewhere (LiSSA)."""
        return self._batch_many(theta, x, y, V)

    # ------------------------------------------------------------------ explicit matrix & spectrum
    def dense(self) -> np.ndarray:
        """The explicit (p, p) matrix (cached; refused above the model's ``max_hessian_params``):
        the model's closed form if it has one; the Gauss-Newton matrix from per-example output
        Jacobians (k reverse passes per example, :meth:`_dense_from_factors`); else p products."""
        self._refuse_explicit()

        def compute():
            if self._forms is not None:
                return self._forms.matrix(np.asarray(self.theta), self.indices)
            return self._dense_from_factors() if self._dense_by_factors() else self._dense_from_products()

        return self._cached("dense", self.state_key(), compute)

    def explicit_blocks(self, dtype: str = "float64") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The explicit matrix ``C`` as ``(index, B, rest)``: ``C`` restricted to the parameters
        ``index`` is ``B``; every other parameter ``j`` has only its diagonal ``rest`` (the
        regulariser: no loss curvature, no coupling), in the order of ``np.setdiff1d(arange(p),
        index)``. ``dtype="float32"`` forms ``B`` in single precision (a preconditioner's
        matrix: cheaper, equal to the float64 one to ~1e-7 relative). The models with a
        structured closed form (:meth:`LogisticRegression._closed_form_curvature`) skip the
        parameters of all-zero inputs; others return :meth:`dense` (``float32``: the float32
        twin's, :meth:`low_precision`) with ``index`` all parameters. Not cached."""
        check_choice("dtype", dtype, ("float64", "float32"))
        m = self.model
        self._refuse_explicit()
        p = m.n_params
        if self._forms is not None and self._forms.has_blocks:
            split = self._forms.split() if self.indices is None else None  # the products' split, if made
            weights = self._closed_form_weights()
            index, B = self._forms.blocks(np.asarray(self.theta), self.indices, dtype=np.dtype(dtype),
                                          split=None if split is None else split.astype(dtype),
                                          weights=weights if self.indices is None else weights[self.indices])
            reg = (m.weight_decay * m.decay_mask_).astype(np.float64)
            B[np.diag_indices(len(index))] += reg[index].astype(B.dtype)
            rest = reg[np.setdiff1d(np.arange(p), index)]
            return index, B, rest
        if dtype == "float32" and m.dtype == "float64":
            try:
                B = self.low_precision().dense().astype(np.float32)
            except ValueError:  # a model that cannot be rebuilt in float32: round the float64 matrix
                B = self.dense().astype(np.float32)
        else:
            B = self.dense().astype(dtype, copy=True)
        return np.arange(p), B, np.zeros(0)

    def _dense_from_products(self) -> np.ndarray:
        """The explicit matrix column by column: products with blocks of unit vectors."""
        m = self.model
        p = m.n_params
        chunk = min(p, 128)
        H = np.empty((p, p))
        for j in progress(range(0, p, chunk), total=-(-p // chunk), desc="Hessian", enabled=progress_on(m.progress)):
            E = np.zeros((p, min(chunk, p - j)))
            E[np.arange(j, j + E.shape[1]), np.arange(E.shape[1])] = 1.0
            H[:, j:j + E.shape[1]] = self.hvp(E)
        return 0.5 * (H + H.T)

    def _dense_by_factors(self) -> bool:
        """Whether :meth:`dense` builds the matrix from per-example output Jacobians (k reverse
        passes per example) rather than p products: the Gauss-Newton operator, or the Hessian
        where the outputs are linear in theta (the two are then equal), with k < p outputs,
        unless the model's products are closed-form numpy (p of them cost less than the n k p^2
        of the factors' Gram matrix: the linear models)."""
        m = self.model
        if not ((self.kind == "gauss-newton" or m.linear_outputs) and m.strategy is None):
            return False
        if self._numpy_closed_form():
            return False
        return self._n_outputs() < m.n_params

    def _n_outputs(self) -> int:
        m = self.model
        return int(np.prod(m.outputs(m.X_train_np_[:1]).shape[1:]))

    def _dense_from_factors(self) -> np.ndarray:
        """``(1/n) sum_i A_i^T A_i + wd diag(mask)`` with ``A_i = R_i^T J_i`` (``S_i = R_i R_i^T``,
        :func:`~influence.curvature.kernels.gauss_newton_factor_kernel`): the explicit
        Gauss-Newton matrix in k reverse passes per training point. The factor rows of a batch of
        ~128 MB are multiplied out in float64 and not kept."""
        m = self.model
        if self._factor is None:
            self._factor = K.compiled(K.gauss_newton_factor_kernel(m))
        p, k = m.n_params, self._n_outputs()
        rows = int(max(1, min(m.batch_size, 2 ** 24 // max(1, k * p))))  # ~128 MB of factor rows
        n = self.n_points
        rows = min(rows, max(n, 1))
        theta = self._theta_tensor()
        G = np.zeros((p, p))
        batches = m.train_batches(self.indices, rows)
        for x, y in progress(batches, total=-(-n // rows), desc="Gauss-Newton matrix (Jacobians)",
                              enabled=progress_on(m.progress)):
            b = int(x.shape[0])
            if b < rows:  # the last batch padded with its own rows (dropped below): one trace for every batch
                reps = tf.range(rows) % b
                x, y = tf.gather(x, reps), tf.gather(y, reps)
            A = np.asarray(self._factor(theta, x, y).numpy()[:b], dtype=np.float64).reshape(-1, p)
            G += A.T @ A
        G /= max(n, 1)
        G[np.diag_indices(p)] += m.weight_decay * m.decay_mask_
        return 0.5 * (G + G.T)

    def gauss_newton(self) -> "CurvatureOperator":
        """The Gauss-Newton operator of the same model and training points (this operator if it
        is one; otherwise one held by this operator, so its explicit matrix is cached here)."""
        if self.kind == "gauss-newton":
            return self
        return self._cached("gauss_newton", self.state_key(),
                            lambda: GaussNewtonOperator(self.model, indices=self.indices, theta=self._theta,
                                                        closed_form=self._forms))

    def eigenvalue_bounds(self, tol: float = 1e-4, maxiter: int | None = None) -> tuple[float, float]:
        """(smallest, largest) eigenvalue by Lanczos (ARPACK) on products, cached per state.

        Good to about ``tol * largest`` in absolute terms: a small positive smallest value does
        not prove the matrix positive definite (``damping="auto"`` allows for this).
        """
        return self._cached("bounds", (self.state_key(), float(tol), maxiter),
                            lambda: self._lanczos_bounds(tol, maxiter))

    def _lanczos_bounds(self, tol, maxiter):
        import scipy.sparse.linalg as spla

        m = self.model
        p = m.n_params
        if p <= 2:
            w = np.linalg.eigvalsh(self.dense())
            return float(w[0]), float(w[-1])
        shown = bar(desc="Lanczos (eigenvalue bounds)", enabled=progress_on(m.progress), unit="HVP")

        def product(v):
            shown.update(1)
            return self.hvp(np.ravel(v))

        op = spla.LinearOperator((p, p), matvec=product, dtype=np.float64)
        v0 = np.random.default_rng(m.seed).standard_normal(p)
        maxiter = maxiter or max(100, 10 * p)
        try:
            lmax = spla.eigsh(op, k=1, which="LA", tol=tol, v0=v0, maxiter=maxiter, return_eigenvectors=False)[0]
            # smallest via the largest of (lmax I - C), which converges faster than which="SA"
            shifted = spla.LinearOperator((p, p), matvec=lambda v: lmax * np.ravel(v) - product(v), dtype=np.float64)
            top = spla.eigsh(shifted, k=1, which="LA", tol=tol, v0=v0, maxiter=maxiter, return_eigenvectors=False)[0]
        finally:
            shown.close()
        lmin = float(lmax - top)
        if lmin < 0:
            self._warn_negative(lmin)
        return lmin, float(lmax)

    def top_eigenpairs(self, rank: int, tol: float = 1e-6, seed: int = 0,
                       maxiter: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(lambda, V)``: the ``rank`` largest eigenvalues (descending) and orthonormal
        eigenvectors (p, rank) of the operator, by Lanczos on products (ARPACK's ``eigsh``; the
        explicit matrix's ``eigh`` where ``rank >= p - 1``). Cached per state, tolerance and
        seed; a request for fewer pairs than are held is served from them (the leading pairs
        of a larger Lanczos run). Shared by ``solver="arnoldi"`` and the Nystrom preconditioner.
        """
        rank = int(min(rank, self.n_params))
        key = (self.state_key(), float(tol), int(seed), maxiter)
        hit = self._caches.get("eigenpairs")
        if hit is not None and hit[0] == key and hit[1][1].shape[1] >= rank:
            lam, V, _ = hit[1]
            return lam[:rank], V[:, :rank]
        value = self._lanczos_pairs(rank, tol, seed, maxiter)
        self._caches["eigenpairs"] = (key, value)
        return value[0], value[1]

    def eigenpairs_cost(self) -> dict:
        """What the cached eigenpairs cost: ``{"rank", "hvps", "seconds"}`` (empty if none)."""
        hit = self._caches.get("eigenpairs")
        return {} if hit is None else dict(hit[1][2], rank=int(hit[1][1].shape[1]))

    def _lanczos_pairs(self, rank, tol, seed, maxiter):
        import time

        p = self.n_params
        t0 = time.perf_counter()
        if rank >= p - 1:
            m = self.model
            if p > m.max_hessian_params:
                raise ValueError(f"{rank} eigenpairs of a p = {p} operator (rank >= p - 1) need the explicit matrix, "
                                 f"refused above max_hessian_params = {m.max_hessian_params}: ask for at most "
                                 f"{p - 2} (ArnoldiSolver's rank, CG's preconditioner_rank with "
                                 f"preconditioner='nystrom'), or raise max_hessian_params")
            lam, V = np.linalg.eigh(self.dense())
            lam, V = lam[::-1][:rank], V[:, ::-1][:, :rank]
            matvecs = p
        else:
            import scipy.sparse.linalg as spla

            count = [0]
            shown = bar(desc=f"Lanczos ({rank} eigenpairs)", enabled=progress_on(self.model.progress), unit="HVP")

            def matvec(u):
                count[0] += 1
                shown.update(1)
                return self.hvp(np.ravel(u))

            lin = spla.LinearOperator((p, p), matvec=matvec, dtype=np.float64)
            v0 = np.random.default_rng(seed).standard_normal(p)
            try:
                lam, V = spla.eigsh(lin, k=rank, which="LA", tol=tol, v0=v0, maxiter=maxiter)
            finally:
                shown.close()
            order = np.argsort(lam)[::-1]
            lam, V = lam[order], V[:, order]
            matvecs = count[0]
        seconds = time.perf_counter() - t0
        logger.info("%s: %d eigenpairs in %.2fs (%d HVPs); eigenvalues %.3g .. %.3g", self.kind, rank, seconds,
                    matvecs, lam[0], lam[-1])
        return lam, V, {"hvps": int(matvecs), "seconds": float(seconds)}

    def _warn_negative(self, lmin):
        logger.warning("Gauss-Newton matrix has a negative eigenvalue (%.3g), which only round-off can give "
                       "(or a loss that is not convex in the outputs)", lmin)

    def dense_eigenvalue_bounds(self) -> tuple[float, float]:
        """(smallest, largest) eigenvalue of the explicit matrix (cached)."""
        def compute():
            w = np.linalg.eigvalsh(self.dense())
            return float(w[0]), float(w[-1])
        return self._cached("dense_bounds", self.state_key(), compute)

    def per_example_curvature(self, refine: int = 8) -> np.ndarray:
        """Largest eigenvalue of each training point's loss curvature (no regulariser), (n,).

        One vectorised pass: for each point, the largest eigenvalue of ``J_i^T S_i J_i`` from a
        (k, k) eigenproblem. That is the point's exact curvature for the Gauss-Newton operator
        and where the outputs are linear in theta; for the Hessian of other models it is the
        Gauss-Newton part: the ``refine`` points with the largest values get 30 power
        iterations on their own Hessian, and every value is scaled by the largest ratio found
        (at least 1). Cached per state.
        """
        return self._cached("example_curvature", (self.state_key(), int(refine)),
                            lambda: self._example_curvature(int(refine)))

    def _example_curvature(self, refine):
        m = self.model
        if self._eigmax is None:
            self._eigmax = K.compiled(K.per_example_gn_eigmax_kernel(m))
        k = self._n_outputs()
        bs = max(1, min(m.batch_size, m.rows_per_chunk() // max(k, 1)))
        lam = m.map_train(self._eigmax, self._theta_tensor(), reduce="concat", batch_size=bs, desc="per-example curvature")
        lam = np.maximum(lam, 0.0)
        if not self._example_curvature_exact() and refine > 0:
            ratio = 1.0
            rng = np.random.default_rng(m.seed)
            for i in np.argsort(-lam)[:refine]:
                u = rng.standard_normal(m.n_params)
                u /= np.linalg.norm(u)
                for _ in range(30):
                    w = self.hvp(u, indices=[i])
                    est = float(np.linalg.norm(w))
                    u = w / max(est, 1e-300)
                if lam[i] > 0:
                    ratio = max(ratio, est / lam[i])
            logger.info("per-example curvature: Gauss-Newton part scaled by %.3g from power iterations on the %d "
                        "largest", ratio, refine)
            lam = lam * ratio
        return lam

    def __repr__(self):
        return f"{type(self).__name__}({type(self.model).__name__}, p={self.n_params}, n={self.n_points})"


class HessianOperator(CurvatureOperator):
    """``H``: the Hessian of the training objective (double backprop)."""

    kind = "hessian"

    def _make_kernels(self, model):
        return K.hessian_kernels(model)

    def _warn_negative(self, lmin):
        logger.warning("Hessian has a negative eigenvalue (%.3g): the objective is not convex at theta; "
                       "use damping of at least %.3g for CG or LiSSA, or curvature='gauss-newton'", lmin, -lmin)


class GaussNewtonOperator(CurvatureOperator):
    """``G``: the generalised Gauss-Newton matrix (forward mode for ``J v``, reverse for ``J^T``)."""

    kind = "gauss-newton"

    def _make_kernels(self, model):
        return K.gauss_newton_kernels(model)

    def _example_curvature_exact(self) -> bool:
        return True


OPERATORS = {cls.kind: cls for cls in (HessianOperator, GaussNewtonOperator)}

def make_operator(model, curvature: str | None = None, **options) -> CurvatureOperator:
    """A new operator of ``model`` for ``curvature`` (default: the model's ``curvature``)."""
    curvature = check_curvature(model.curvature if curvature is None else curvature)
    return OPERATORS[curvature](model, **options)


def as_operator(obj, curvature: str | None = None) -> CurvatureOperator:
    """An operator as it is; for a model, the model's own shared operator where it offers one
    (``model.curvature_operator``, the concrete models' :class:`~influence.facade.Influence`),
    else a new one."""
    if isinstance(obj, CurvatureOperator):
        if curvature is not None and check_curvature(curvature) != obj.kind:
            raise ValueError(f"curvature={curvature!r} given with a {obj.kind} operator")
        return obj
    shared = getattr(obj, "curvature_operator", None)
    if shared is not None:
        return shared(curvature)
    return make_operator(obj, curvature)
