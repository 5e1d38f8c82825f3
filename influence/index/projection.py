"""Projections of per-example gradients that never form a p-sized object per example.

A projection is a fixed (p, k) matrix ``P`` (never held as one) that maps a parameter-space
vector ``g`` to ``phi = P^T g``. The index stores ``phi_i = P^T grad L(z_i)`` for every training
point and the projected curvature ``P^T C P``; influence in the projected space is
``-phi_t^T (P^T C P + d I)^-1 phi_i``.

- :class:`ExactProjection`: ``P = I`` (k = p): the per-example gradients themselves, so the
  index reproduces an exact solve. Used where ``proj_dim`` is None or at least p.
- :class:`KroneckerProjection` (LoGra, Choe et al. 2024): for each Dense / Conv2D layer the
  per-example gradient of its kernel (bias as an extra input row) is ``G = sum_t a_t g_t^T``
  (``a_t``: the layer's input at position t, im2col patches for a convolution; ``g_t``: the
  backward signal at its pre-activation). With seeded Gaussian ``P_in`` (d_in, k_in) and
  ``P_out`` (d_out, k_out), entries N(0, 1/k), the projection of the layer is
  ``(P_in (x) P_out)^T vec(G) = sum_t (P_in^T a_t) (P_out^T g_t)^T`` (row-major vec): the input
  and the signal are projected before the outer product, so no (d_in, d_out) gradient is
  formed per example. A side whose size is at most its budget is not projected (identity).
  Memory O(batch x positions x (d_in + d_out) + k_in k_out) per layer.
- :class:`PCAProjection` (LoGra's PCA variant): the same Kronecker structure, with ``P_in`` and
  ``P_out`` the top eigenvectors of the layer's K-FAC factors ``A = E[a a^T]`` and
  ``S = E[g g^T]`` (``g``: the curvature's backward signals), estimated on a seeded sample of
  the training set. The index then keeps each layer's most curved Kronecker directions
  (orthonormal: ``P^T P = I``), and the budget goes mostly to the input side: ``k_out =
  min(d_out, max(c, 8))`` output directions (``c``: the model's outputs; a per-example
  backward signal is the image of a c-dimensional output vector) and ``k_in`` the rest.
  Not a Johnson-Lindenstrauss map (``E[P P^T] != I``): gradient dot products (grad_dot,
  TracIn, TRAK) take the random ones.
- :class:`SparseSignProjection`: for models without Dense/Conv2D taps, a sparse random
  sign matrix (``s`` non-zeros of ``+-1/sqrt(s)`` per parameter row, seeded), applied to
  chunks of per-example gradients: O(p s) memory, never (p, k) dense.

Each projection also gives ``P^T v`` for a parameter vector (the regulariser's gradient
``wd D theta``) and ``P^T D P`` for a diagonal ``D`` (the regulariser's curvature ``wd D``),
so that the projected curvature is exactly ``P^T (G + wd D) P``.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ..validation import check_number

logger = logging.getLogger(__name__)

#: largest p for which ``proj_dim=None`` (no projection) is accepted without ``exact=True``
EXACT_MAX_PARAMS = 20000


def gaussian(rows: int, cols: int, seed, dtype) -> np.ndarray:
    """A seeded (rows, cols) matrix with N(0, 1/cols) entries (``E[P P^T] = I``)."""
    return (np.random.default_rng(seed).standard_normal((rows, cols)) / np.sqrt(cols)).astype(dtype)


class Projection:
    """Interface (module docstring). ``k``: the projected dimension; ``describe()``: what
    determines it (the index's manifest)."""

    kind = "base"
    k: int

    def describe(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def project_vector(self, v: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """``P^T v`` for a parameter-space vector (p,)."""
        raise NotImplementedError

    def gram_diagonal(self, d: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """``P^T diag(d) P`` (k, k)."""
        raise NotImplementedError

    def matrix(self) -> np.ndarray:
        """``P`` itself, (p, k): for tests on tiny models only."""
        p = self.n_params
        return np.stack([self.project_vector(e) for e in np.eye(p)])


class ExactProjection(Projection):
    """``P = I``: the index holds the per-example gradients themselves (k = p)."""

    kind = "exact"

    def __init__(self, model):
        self.n_params = self.k = int(model.n_params)

    def describe(self) -> dict:
        return {"kind": self.kind, "k": self.k}

    def project_vector(self, v):
        return np.asarray(v, dtype=np.float64)

    def gram_diagonal(self, d):
        return np.diag(np.asarray(d, dtype=np.float64))


class SparseSignProjection(Projection):
    """A seeded sparse sign projection (module docstring): parameter ``j`` goes to ``nnz``
    distinct columns with signs ``+-1/sqrt(nnz)``, so ``E[P P^T] = I``."""

    kind = "sparse-sign"

    def __init__(self, model, k: int, seed: int = 0, nnz: int = 8):
        import scipy.sparse

        self.n_params = p = int(model.n_params)
        self.k = check_number("proj_dim", k, low=1, integer=True)
        self.seed = check_number("seed", seed, low=0, integer=True)
        self.nnz = min(check_number("nnz", nnz, low=1, integer=True), self.k)
        rng = np.random.default_rng([self.seed, 7])
        cols = np.stack([rng.choice(self.k, self.nnz, replace=False) for _ in range(p)]) if p * self.nnz < 2e7 \
            else (rng.integers(0, self.k, (p, self.nnz)))
        signs = rng.choice([-1.0, 1.0], size=(p, self.nnz)) / np.sqrt(self.nnz)
        self.P = scipy.sparse.csr_matrix((signs.ravel(), cols.ravel(), np.arange(0, p * self.nnz + 1, self.nnz)),
                                         shape=(p, self.k))
        self.P.sum_duplicates()

    def describe(self) -> dict:
        return {"kind": self.kind, "k": self.k, "seed": self.seed, "nnz": self.nnz}

    def project_rows(self, G: np.ndarray) -> np.ndarray:
        return np.asarray(self.P.T @ np.asarray(G, dtype=np.float64).T).T

    def project_vector(self, v):
        return np.asarray(self.P.T @ np.asarray(v, dtype=np.float64)).ravel()

    def gram_diagonal(self, d):
        P = self.P
        return np.asarray((P.T @ P.multiply(np.asarray(d, dtype=np.float64)[:, None])).todense())


def equal_shares(budget: int, sizes: list[int]) -> list[int]:
    """``budget`` split equally over layers of the given sizes, none given more than its size
    (water-filling: a small layer is kept whole and its unused share goes to the others)."""
    shares = [0] * len(sizes)
    left, open_ = int(budget), list(range(len(sizes)))
    while open_:
        share = left // len(open_)
        small = [i for i in open_ if sizes[i] <= share]
        if not small:
            for i in open_:
                shares[i] = max(1, share)
            break
        for i in small:
            shares[i] = sizes[i]
            left -= sizes[i]
        open_ = [i for i in open_ if i not in small]
    return shares


class LayerPlan:
    """One Dense/Conv2D layer of a :class:`KroneckerProjection`: its blocks in theta, the
    kernel's matrix shape (d_in without the bias row, d_out), and its two projections."""

    def __init__(self, name, kernel_block, bias_block, d_in, d_out, k_in, k_out, seed, dtype, basis=None):
        self.name, self.kernel_block, self.bias_block = name, kernel_block, bias_block
        self.d_in, self.d_out = int(d_in), int(d_out)
        self.rows = self.d_in + (bias_block is not None)  # the bias as one more input row
        self.k_in, self.k_out = int(min(k_in, self.rows)), int(min(k_out, self.d_out))
        # basis(side, size, k) -> (size, k) matrix; default: seeded Gaussian
        make = basis or (lambda side, size, k: gaussian(size, k, [seed, side], dtype))
        self.P_in = None if self.k_in >= self.rows else np.asarray(make(0, self.rows, self.k_in), dtype=dtype)
        self.P_out = None if self.k_out >= self.d_out else np.asarray(make(1, self.d_out, self.k_out), dtype=dtype)
        if self.P_in is None:
            self.k_in = self.rows
        if self.P_out is None:
            self.k_out = self.d_out

    @property
    def k(self) -> int:
        return self.k_in * self.k_out

    def describe(self) -> dict:
        return {"layer": self.name, "d_in": self.rows, "d_out": self.d_out, "k_in": self.k_in, "k_out": self.k_out,
                "projected_in": self.P_in is not None, "projected_out": self.P_out is not None}


class KroneckerProjection(Projection):
    """LoGra's Kronecker-structured projection of every Dense/Conv2D layer (module docstring).

    ``k`` is split equally over the layers (as LoGra gives every layer the same k_in x k_out),
    a layer smaller than its share kept whole and the rest shared among the others
    (:func:`equal_shares`); each layer's budget ``k_l`` becomes ``k_out = min(d_out,
    2^round(log2 sqrt(k_l)))`` and ``k_in = min(d_in + 1, k_l // k_out)`` (a side no larger than
    its budget is kept whole).
    ``describe()`` lists each layer's (k_in, k_out); their products sum to the total k."""

    kind = "kronecker"

    def __init__(self, model, k: int, seed: int = 0):
        import tensorflow as tf

        from ..solvers.kfac import check_coverage, kernel_matrix_shape

        self.n_params = int(model.n_params)
        self.seed = check_number("seed", seed, low=0, integer=True)
        budget = check_number("proj_dim", k, low=1, integer=True)
        x = tf.constant(model.X_train_np_[:1])
        try:
            out, taps = model.kfac_taps(model.unflatten(tf.constant(model.theta_)), x)
        except NotImplementedError as exc:
            raise ValueError(f"projection={self.kind!r} needs Dense/Conv2D layers: {exc}; use "
                             f"projection='sparse-sign'") from None
        check_coverage(model, taps)  # every parameter in a Dense/Conv2D layer
        self.n_outputs = int(np.prod(out.shape[1:]))
        shapes = []
        for tap in taps:
            d_in, d_out = kernel_matrix_shape(model.blocks_[tap.kernel_block].shape)
            shapes.append((tap, d_in + (tap.bias_block is not None), d_out))
        dtype = np.dtype(model.dtype)
        bases = self._bases(model, taps)
        self.layers = []
        for j, ((tap, rows, d_out), (k_in, k_out)) in enumerate(zip(shapes, self._split(budget, shapes))):
            d_in = rows - (tap.bias_block is not None)
            self.layers.append(LayerPlan(tap.name, tap.kernel_block, tap.bias_block, d_in, d_out, k_in, k_out,
                                         [self.seed, j], dtype, bases[j]))
        self.k = int(sum(layer.k for layer in self.layers))
        bounds = np.cumsum([0] + [b.size for b in model.blocks_])
        self._block_ranges = [(int(bounds[i]), int(bounds[i + 1])) for i in range(len(model.blocks_))]
        self._decay = [bool(b.decay) for b in model.blocks_]

    def _split(self, budget, shapes):
        """Each layer's ``(k_in, k_out)`` (class docstring)."""
        shares = equal_shares(budget, [rows * d_out for _, rows, d_out in shapes])
        out = []
        for (_, rows, d_out), k_l in zip(shapes, shares):
            if k_l >= rows * d_out:  # small enough to keep whole
                out.append((rows, d_out))
            else:
                k_out = int(min(d_out, 2 ** int(round(np.log2(max(np.sqrt(k_l), 1))))))
                out.append((int(max(1, k_l // k_out)), k_out))
        return out

    def _bases(self, model, taps):
        """Per layer: a ``basis(side, size, k)`` for :class:`LayerPlan` (None: seeded Gaussian)."""
        return [None] * len(taps)

    def describe(self) -> dict:
        return {"kind": self.kind, "k": self.k, "seed": self.seed, "layers": [la.describe() for la in self.layers]}

    def _layer_matrix(self, layer, v, mask: bool = False):
        lo, hi = self._block_ranges[layer.kernel_block]
        W = np.asarray(v[lo:hi], dtype=np.float64).reshape(layer.d_in, layer.d_out)
        if mask and not self._decay[layer.kernel_block]:
            W = np.zeros_like(W)
        if layer.bias_block is not None:
            lo, hi = self._block_ranges[layer.bias_block]
            b = np.asarray(v[lo:hi], dtype=np.float64)[None, :]
            W = np.concatenate([W, b])
        return W

    def project_vector(self, v):
        v = np.asarray(v, dtype=np.float64)
        out = []
        for layer in self.layers:
            W = self._layer_matrix(layer, v)
            if layer.P_in is not None:
                W = layer.P_in.astype(np.float64).T @ W
            if layer.P_out is not None:
                W = W @ layer.P_out.astype(np.float64)
            out.append(W.ravel())
        return np.concatenate(out)

    def gram_diagonal(self, d):
        """``P^T diag(d) P``: block diagonal over the layers; a layer's block is the Kronecker
        product of its input side and output side when ``d`` is constant over each input row
        (the regulariser's mask: decayed kernel, undecayed bias), as here."""
        import scipy.linalg

        d = np.asarray(d, dtype=np.float64)
        blocks = []
        for layer in self.layers:
            D = self._layer_matrix(layer, d)  # (rows, d_out): the diagonal laid out as the layer's matrix
            row = D[:, 0]
            if not np.allclose(D, row[:, None]):
                raise ValueError("gram_diagonal: the diagonal must be constant over each input row of a layer")
            Pin = np.eye(layer.rows) if layer.P_in is None else layer.P_in.astype(np.float64)
            Pout = np.eye(layer.d_out) if layer.P_out is None else layer.P_out.astype(np.float64)
            blocks.append(np.kron(Pin.T @ (row[:, None] * Pin), Pout.T @ Pout))
        return scipy.linalg.block_diag(*blocks)

    def tensors(self):
        """The layers' projections as TF constants (None: identity), for the compiled pass."""
        import tensorflow as tf

        return [(None if la.P_in is None else tf.constant(la.P_in), None if la.P_out is None else tf.constant(la.P_out))
                for la in self.layers]


class PCAProjection(KroneckerProjection):
    """LoGra's PCA projection (module docstring): per layer, ``P_in`` / ``P_out`` are the top
    ``k_in`` / ``k_out`` eigenvectors of the K-FAC factors ``A`` / ``S`` (``fisher``: which
    backward signals, as for the index's curvature), estimated on ``factor_rows`` training
    rows drawn with ``seed`` (all rows when None or fewer). Eigenvectors are signed so that
    each one's largest entry is positive. ``state``: the matrices of an earlier build
    (:meth:`arrays`), reused instead of another pass. ``describe()`` carries a digest of the
    matrices (they depend on the data through floating-point sums)."""

    kind = "pca"
    MIN_OUT = 8  # output directions kept per layer at least (module docstring)

    def __init__(self, model, k: int, seed: int = 0, fisher: str = "expectation", factor_rows: int | None = 2500,
                 state: dict | None = None):
        self.fisher = fisher
        self.factor_rows = check_number("factor_rows", factor_rows, low=1, integer=True, allow_none=True)
        self._state = state
        super().__init__(model, k, seed)
        self._state = None
        from .store import checksum

        self.digest = checksum(*[m for la in self.layers for m in (la.P_in, la.P_out)])

    def _split(self, budget, shapes):
        k_out = [min(d_out, max(self.n_outputs, self.MIN_OUT)) for _, _, d_out in shapes]
        shares = equal_shares(budget, [rows * ko for (_, rows, _), ko in zip(shapes, k_out)])
        out = []
        for (_, rows, d_out), ko, k_l in zip(shapes, k_out, shares):
            out.append((rows, d_out) if k_l >= rows * d_out else (int(min(rows, max(1, k_l // ko))), ko))
        return out

    def _bases(self, model, taps):
        if self._state is not None:
            state = self._state
            return [lambda side, size, k, j=j: state[f"P{side}_{j}"] for j in range(len(taps))]
        from ..solvers.kfac import compute_factors

        n = int(model.n_train_)
        self.rows_used = n if self.factor_rows is None else min(n, self.factor_rows)
        sample = model
        if self.rows_used < n:
            idx = np.sort(np.random.default_rng([self.seed, 11]).choice(n, self.rows_used, replace=False))
            sample = model.on_training_subset(idx)
        t0 = time.perf_counter()
        factors = compute_factors(sample, self.fisher, seed=self.seed, decompose=False)
        logger.info("PCA projection: K-FAC factors of %d layers from %d training rows in %.1fs", len(factors),
                    self.rows_used, time.perf_counter() - t0)

        def basis(j):
            mats = (factors[j].A, factors[j].S)

            def top(side, size, k):
                t1 = time.perf_counter()
                V = top_eigenvectors(mats[side], k)
                logger.info("PCA projection: %s's top %d of %d %s directions in %.1fs", factors[j].name, k, size,
                            ("input", "output")[side], time.perf_counter() - t1)
                return V
            return top

        return [basis(j) for j in range(len(taps))]

    def describe(self) -> dict:
        return {**super().describe(), "fisher": self.fisher, "factor_rows": self.factor_rows, "digest": self.digest}

    def arrays(self) -> dict:
        """The matrices, by layer and side (``P0_j``: input side of layer j), to store and reuse."""
        return {f"P{side}_{j}": m for j, la in enumerate(self.layers) for side, m in enumerate((la.P_in, la.P_out))
                if m is not None}


def top_eigenvectors(M: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` leading eigenvectors of the symmetric ``M`` (largest eigenvalue first), each
    signed so that its largest-magnitude entry is positive. Lanczos (ARPACK, fixed start
    vector) where ``d > 2000`` and ``k < d / 4`` (a 9,217-wide factor: 12 s instead of 71 s for
    LAPACK's partial solver), else LAPACK."""
    import scipy.linalg
    import scipy.sparse.linalg

    M = np.asarray(M, dtype=np.float64)
    M = 0.5 * (M + M.T)
    d = M.shape[0]
    if d > 2000 and 4 * k < d:
        w, V = scipy.sparse.linalg.eigsh(M, k=k, which="LA", v0=np.ones(d))
        V = V[:, np.argsort(w)]
    else:
        _, V = scipy.linalg.eigh(M, subset_by_index=[d - k, d - 1])
    V = V[:, ::-1]
    top = np.abs(V).argmax(axis=0)
    return V * np.where(V[top, np.arange(k)] < 0, -1.0, 1.0)


def kronecker_layers(model):
    """The model's Dense/Conv2D taps when every parameter lies in one (a Kronecker projection
    applies), else None."""
    import tensorflow as tf

    from ..solvers.kfac import check_coverage

    try:
        _, taps = model.kfac_taps(model.unflatten(tf.constant(model.theta_)), tf.constant(model.X_train_np_[:1]))
        check_coverage(model, taps)
    except (ValueError, NotImplementedError):
        return None
    return taps


PROJECTIONS = ("auto", "random", "pca", "kronecker", "sparse-sign")


def make_projection(model, proj_dim: int | None, kind: str = "auto", seed: int = 0, **pca) -> Projection:
    """The projection for ``model``: exact where ``proj_dim`` is None or >= p; else ``kind``:
    "auto" or "random" (a Johnson-Lindenstrauss map: Kronecker where every parameter belongs
    to a Dense/Conv2D layer, else sparse sign), "pca" (:class:`PCAProjection`; ``pca``: its
    ``fisher``, ``factor_rows``, ``state``), "kronecker", "sparse-sign"."""
    p = model.n_params
    if kind not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {kind!r}")
    if proj_dim is None or int(proj_dim) >= p:
        return ExactProjection(model)
    if kind == "pca":
        return PCAProjection(model, proj_dim, seed, **pca)
    if kind == "kronecker":
        return KroneckerProjection(model, proj_dim, seed)
    if kind == "sparse-sign":
        return SparseSignProjection(model, proj_dim, seed)
    try:
        return KroneckerProjection(model, proj_dim, seed)
    except (ValueError, NotImplementedError):
        return SparseSignProjection(model, proj_dim, seed)
