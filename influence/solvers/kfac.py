"""Kronecker-factored curvature: K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse &
Martens 2016) and EK-FAC (George et al. 2018), as inverse-HVP solvers.

For a Dense or Conv2D layer with input ``a`` (a constant 1 appended when its bias is a
parameter) and pre-activation output ``s``, the curvature block of its weights
``W`` (rows: inputs, or im2col patch entries (kh, kw, c_in); columns: outputs) is
approximated as::

    G_W ~= A (x) S,   A = (1/n) sum_i sum_t a_it a_it^T,   S = (1/(n T)) sum_i sum_t g_it g_it^T

(``t``: the T spatial positions of a convolution, T = 1 for Dense; ``(x)``: Kronecker
product in the row-major order of ``W``). ``g`` is the gradient of the loss with respect
to ``s`` for targets in expectation over the model's own predictive distribution
(``fisher="expectation"``, default: with ``H_f = d^2 L/df^2 = R R^T`` at the outputs,
one backward pass per column of ``R``; deterministic, the Gauss-Newton form, for every
loss convex in the outputs), for targets sampled from it (``"mc"``, ``mc_samples`` per
point, seeded: the Monte Carlo Fisher) or for the true labels (``"empirical"``).

With ``A = Q_A diag(a) Q_A^T`` and ``S = Q_S diag(s) Q_S^T``, K-FAC's eigenvalues are
``a_i s_j``; EK-FAC replaces them by the second moments of the per-example gradients in
that eigenbasis, ``(1/n) sum_i (Q_A^T G_i Q_S)^2`` (one more pass), which is exactly
``diag(Q^T G_W Q)``. A block's inverse-HVP is ``Q (Lambda + reg + damping)^-1 Q^T v``,
applied as ``Q_A (Q_A^T V Q_S / (Lambda + ...)) Q_S^T`` without forming any Kronecker
product; the regulariser ``wd * mask`` enters as its diagonal in the eigenbasis (exact
when every row of the block is decayed). Blocks are independent: the curvature is
block-diagonal over layers. The factors are computed once per operator state and held by the solver.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from ..validation import check_choice, check_number
from .base import InverseHVPSolver, SolveResult, relative_residual

logger = logging.getLogger(__name__)

FISHERS = ("expectation", "mc", "empirical")


@dataclass
class BlockFactors:
    """The Kronecker factors of one layer and their eigendecompositions.

    ``kernel_block`` / ``bias_block``: the layer's blocks in theta (rows of the stacked
    ``[kernel; bias]`` matrix); ``A`` (d_in, d_in), ``S`` (d_out, d_out); ``qa``, ``qs``
    eigenvectors; ``ea``, ``es`` eigenvalues; ``corrected``: EK-FAC's eigenvalues
    (d_in, d_out) once computed.
    """

    name: str
    kind: str
    kernel_block: int
    bias_block: int | None
    A: np.ndarray
    S: np.ndarray
    ea: np.ndarray = None
    qa: np.ndarray = None
    es: np.ndarray = None
    qs: np.ndarray = None
    corrected: np.ndarray | None = None


def as_positions(t, d):
    """(batch, ..., d) -> (batch, T, d)."""
    import tensorflow as tf

    return tf.reshape(t, [tf.shape(t)[0], -1, d])


def tap_inputs(tap, kernel_shape, with_bias: bool):
    """The tap's input as (batch, T, d_in) rows of W (im2col patches for Conv2D), 1 appended for a bias."""
    import tensorflow as tf

    if tap.kind == "conv2d":
        kh, kw, strides, dilations, padding = tap.conv
        a = tf.image.extract_patches(tap.a, sizes=[1, kh, kw, 1], strides=[1, *strides, 1],
                                     rates=[1, *dilations, 1], padding=padding)
    else:
        a = tap.a
    d_in = int(np.prod(kernel_shape[:-1])) if len(kernel_shape) > 1 else int(kernel_shape[0])
    a = as_positions(a, d_in)
    if with_bias:
        a = tf.concat([a, tf.ones_like(a[..., :1])], axis=-1)
    return a


def kernel_matrix_shape(shape) -> tuple[int, int]:
    return (int(np.prod(shape[:-1])), int(shape[-1])) if len(shape) > 1 else (int(shape[0]), 1)


def compute_factors(model, fisher: str = "expectation", mc_samples: int = 1, seed: int = 0,
                    corrected: bool = False, kernels=None, decompose: bool = True) -> list[BlockFactors]:
    """The Kronecker factors of every factorable layer of ``model`` (its current theta and
    data), with their eigendecompositions (unless ``decompose`` is False); with ``corrected``,
    EK-FAC's eigenvalues too."""
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    kernels = kernels or _make_kernels(model, fisher, int(mc_samples))
    t0 = time.perf_counter()
    blocks = _factor_pass(model, kernels, fisher, int(mc_samples), int(seed))
    if not decompose:
        if corrected:
            raise ValueError("compute_factors: corrected=True needs decompose=True")
        return blocks
    for f in blocks:
        f.ea, f.qa = np.linalg.eigh(f.A)
        f.es, f.qs = np.linalg.eigh(f.S)
    logger.info("K-FAC factors of %d layers in %.2fs (%s)", len(blocks), time.perf_counter() - t0, fisher)
    if corrected:
        correct_eigenvalues(model, blocks, fisher, mc_samples, seed, kernels)
    return blocks


def correct_eigenvalues(model, blocks, fisher, mc_samples, seed, kernels=None) -> None:
    """EK-FAC: fill each block's ``corrected`` eigenvalues (one more pass over the data)."""
    kernels = kernels or _make_kernels(model, fisher, int(mc_samples))
    t0 = time.perf_counter()
    for f, lam in zip(blocks, _eigenvalue_pass(model, kernels, blocks, fisher, int(mc_samples), int(seed))):
        f.corrected = lam
    logger.info("EK-FAC eigenvalues in %.2fs", time.perf_counter() - t0)


def check_coverage(model, taps):
    covered = [t.kernel_block for t in taps] + [t.bias_block for t in taps if t.bias_block is not None]
    missing = [b.name for i, b in enumerate(model.blocks_) if i not in covered]
    if missing:
        raise ValueError(f"Kronecker-factored curvature covers Dense and Conv2D layers only; parameters {missing} "
                         f"belong to no factorable layer")


def targets_losses(model, out, y, fisher, mc_samples, seed):
    """Inside the tape: the summed losses whose gradients are the backward signals (empirical,
    Monte Carlo); none for the expectation form, which backpropagates ``R`` directly."""
    import tensorflow as tf

    if fisher == "empirical":
        return [tf.reduce_sum(model.pointwise_loss(out, y))]
    if fisher == "mc":
        return [tf.reduce_sum(model.pointwise_loss(out, model.sample_targets(
            tf.stop_gradient(out), tf.random.experimental.stateless_fold_in(seed, m), y.dtype)))
            for m in range(mc_samples)]
    return []


def backward_signals(model, tape, out, s_list, y, losses):
    """The list (one entry per backward pass) of gradients w.r.t. every tap's pre-activation."""
    import tensorflow as tf

    if losses:
        return [tape.gradient(total, s_list, unconnected_gradients=tf.UnconnectedGradients.ZERO) for total in losses]
    from ..curvature.kernels import output_hessians

    w, U = tf.linalg.eigh(output_hessians(model, out, y))
    R = U * tf.sqrt(tf.maximum(w, 0))[:, None, :]          # R R^T = H_f, per example
    return [tape.gradient(out, s_list, output_gradients=tf.reshape(R[:, :, c], tf.shape(out)),
                          unconnected_gradients=tf.UnconnectedGradients.ZERO) for c in range(R.shape[-1])]


def _make_kernels(model, fisher, mc_samples):
    """tf.functions for one batch: factor sums, and the EK-FAC eigenvalue sums."""
    import tensorflow as tf

    def taps_and_signals(theta, x, y, seed):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(theta)  # records the forward pass, so gradients reach every pre-activation
            out, taps = model.kfac_taps(model.unflatten(theta), x)
            s_list = [t.s for t in taps]
            losses = targets_losses(model, out, y, fisher, mc_samples, seed)
        signals = backward_signals(model, tape, out, s_list, y, losses)
        del tape
        return taps, signals

    def rows_and_grads(model_blocks, taps, signals):
        outs = []
        for i, tap in enumerate(taps):
            shape = model_blocks[tap.kernel_block].shape
            d_out = kernel_matrix_shape(shape)[1]
            a = tap_inputs(tap, shape, tap.bias_block is not None)
            gs = [as_positions(sig[i], d_out) for sig in signals]
            outs.append((a, gs))
        return outs

    blocks = model.blocks_

    def factor_sums(theta, x, y, seed):
        taps, signals = taps_and_signals(theta, x, y, seed)
        sums = []
        for a, gs in rows_and_grads(blocks, taps, signals):
            T = tf.cast(tf.shape(a)[1], a.dtype)
            A = tf.einsum("bti,btj->ij", a, a)
            S = tf.add_n([tf.einsum("bti,btj->ij", g, g) for g in gs]) / T
            sums.append((A, S))
        return sums

    def eigen_sums(theta, x, y, seed, qas, qss):
        taps, signals = taps_and_signals(theta, x, y, seed)
        sums = []
        for (a, gs), qa, qs in zip(rows_and_grads(blocks, taps, signals), qas, qss):
            ar = tf.einsum("bti,ij->btj", a, qa)
            total = 0.0
            for g in gs:
                gr = tf.einsum("bti,ij->btj", g, qs)
                if a.shape[1] == 1:
                    total += tf.einsum("bi,bj->ij", tf.square(ar[:, 0]), tf.square(gr[:, 0]))
                else:
                    total += tf.reduce_sum(tf.square(tf.einsum("bti,btj->bij", ar, gr)), axis=0)
            sums.append(total)
        return sums

    return (tf.function(factor_sums, reduce_retracing=True), tf.function(eigen_sums, reduce_retracing=True))


def _batches(model, per_example_size: int):
    bs = max(1, min(model.batch_size, int(2e7 // max(per_example_size, 1))))
    return model.slices(model.n_train_, bs)


def _batch_seed(seed, j):
    import tensorflow as tf

    return tf.constant([seed, j], dtype=tf.int32)


def _factor_pass(model, kernels, fisher, mc_samples, seed) -> list[BlockFactors]:
    from ..utils import progress, progress_on

    model.require_fit()
    th = model.theta_tensor()
    x0 = model.X_train_[:1]
    _, taps = model.kfac_taps(model.unflatten(th), x0)
    check_coverage(model, taps)
    size = sum(int(np.prod(t.s.shape[1:])) * 4 + int(np.prod(t.a.shape[1:])) * 4 for t in taps)
    totals = None
    slices = _batches(model, size)
    for j, sl in enumerate(progress(slices, total=len(slices), desc="K-FAC factors", enabled=progress_on(model.progress))):
        out = kernels[0](th, model.X_train_[sl], model.y_train_[sl], _batch_seed(seed, j))
        out = [(A.numpy(), S.numpy()) for A, S in out]
        totals = out if totals is None else [(A0 + A, S0 + S) for (A0, S0), (A, S) in zip(totals, out)]
    n = model.n_train_
    m = mc_samples if fisher == "mc" else 1
    return [BlockFactors(t.name, t.kind, t.kernel_block, t.bias_block, A / n, S / (n * m))
            for t, (A, S) in zip(taps, totals)]


def _eigenvalue_pass(model, kernels, blocks, fisher, mc_samples, seed) -> list[np.ndarray]:
    import tensorflow as tf

    from ..utils import progress, progress_on

    th = model.theta_tensor()
    qas = [tf.constant(f.qa) for f in blocks]
    qss = [tf.constant(f.qs) for f in blocks]
    size = sum(f.A.shape[0] * f.S.shape[0] for f in blocks) * 2
    totals = None
    slices = _batches(model, size)
    for j, sl in enumerate(progress(slices, total=len(slices), desc="EK-FAC eigenvalues", enabled=progress_on(model.progress))):
        out = [t.numpy() for t in kernels[1](th, model.X_train_[sl], model.y_train_[sl], _batch_seed(seed, j),
                                             qas, qss)]
        totals = out if totals is None else [a + b for a, b in zip(totals, out)]
    m = mc_samples if fisher == "mc" else 1
    return [t / (model.n_train_ * m) for t in totals]


class KFACSolver(InverseHVPSolver):
    """K-FAC inverse-HVPs: block-diagonal ``A (x) S`` per Dense/Conv2D layer (module docstring).

    Parameters: ``damping`` (added to every eigenvalue, or "auto"), ``fisher``
    ("expectation", "mc", "empirical"), ``mc_samples`` and ``seed`` (the Monte Carlo
    Fisher's targets). An approximation of ``H`` (exact for a single linear layer under
    a loss whose output Hessian does not vary between points): the returned residual is
    against the model's true ``H + damping I`` (or ``G``, see the model's ``curvature``).
    That check costs one HVP pass over the training set per column, more than the solve
    itself, so for many columns it is made on the first ``residual_columns`` (default 8;
    None: all) and ``info["residual_columns"]`` says how many.
    """

    name = "kfac"
    corrected = False
    approximate = True

    def __init__(self, damping: float | str = 0.0, fisher: str = "expectation", mc_samples: int = 1, seed: int = 0,
                 residual_columns: int | None = 8):
        super().__init__(damping)
        check_choice("fisher", fisher, FISHERS)
        self._residual_columns = check_number("residual_columns", residual_columns, low=1, integer=True,
                                              allow_none=True)  # not in cache keys
        self.fisher = fisher
        self.mc_samples = check_number("mc_samples", mc_samples, low=1, integer=True)
        self.seed = check_number("seed", seed, low=0, integer=True)

    def factors(self, operator=None) -> list[BlockFactors]:
        """The Kronecker factors at the operator's state (computed once, held by the solver;
        shared by :meth:`with_damping` copies)."""
        op = self.operator_ if operator is None else operator
        model = op.model
        kernels = self._memo("kernels", (id(op), self.fisher, self.mc_samples),
                             lambda: _make_kernels(model, self.fisher, self.mc_samples))
        key = (op.state_key(), self.fisher, self.mc_samples, self.seed)
        blocks = self._memo("factors", key, lambda: compute_factors(model, self.fisher, self.mc_samples, self.seed,
                                                                    kernels=kernels))
        if self.corrected and any(f.corrected is None for f in blocks):
            correct_eigenvalues(model, blocks, self.fisher, self.mc_samples, self.seed, kernels)
        return blocks

    def eigenvalues(self, f: BlockFactors) -> np.ndarray:
        """The block's eigenvalues in its Kronecker eigenbasis, (d_in, d_out)."""
        return f.corrected if self.corrected else np.outer(f.ea, f.es)

    def _block_slices(self, model, f):
        offsets = np.cumsum([0] + [b.size for b in model.blocks_])
        kb = model.blocks_[f.kernel_block]
        d_in, d_out = kernel_matrix_shape(kb.shape)
        rows = [(slice(offsets[f.kernel_block], offsets[f.kernel_block + 1]), d_in, kb.decay)]
        if f.bias_block is not None:
            rows.append((slice(offsets[f.bias_block], offsets[f.bias_block + 1]), 1,
                         model.blocks_[f.bias_block].decay))
        return rows, d_out

    def apply_inverse(self, v) -> tuple[np.ndarray, float]:
        """``(x, smallest)``: the Kronecker-factored ``(C~ + damping I)^-1 v`` for (p,) or (p, k)
        ``v``, and the smallest eigenvalue it divided by (no residual: no HVP)."""
        model = self.operator_.model
        blocks = self.factors()
        cols = v if v.ndim == 2 else v[:, None]
        x = np.zeros_like(cols)
        smallest = np.inf
        for f in blocks:
            rows, d_out = self._block_slices(model, f)
            mask = np.concatenate([np.full(r, float(decay)) for _, r, decay in rows])
            reg = model.weight_decay * np.einsum("ij,i,ij->j", f.qa, mask, f.qa)  # diag(Q_A^T diag(m) Q_A)
            lam = self.eigenvalues(f) + reg[:, None] + self.damping
            smallest = min(smallest, float(lam.min()))
            V = np.concatenate([cols[sl].reshape(r, d_out, -1) for sl, r, _ in rows], axis=0)  # (d_in', d_out, k)
            Vr = np.einsum("ia,ijk,jb->abk", f.qa, V, f.qs, optimize=True)
            Xr = Vr / lam[:, :, None]
            X = np.einsum("ia,abk,jb->ijk", f.qa, Xr, f.qs, optimize=True)
            start = 0
            for sl, r, _ in rows:
                x[sl] = X[start:start + r].reshape(-1, cols.shape[1])
                start += r
        return (x if v.ndim == 2 else x[:, 0]), smallest

    def _solve(self, v):
        x, smallest = self.apply_inverse(v)
        blocks = self.factors()
        if smallest <= 0:
            logger.warning("%s: an eigenvalue plus regulariser and damping is %.3g <= 0; add damping", self.name,
                           smallest)
        k = 1 if v.ndim == 1 else v.shape[1]
        checked = k if self._residual_columns is None else min(k, self._residual_columns)
        # the operator bounds its columns per pass
        res = relative_residual(self.operator_, *((x, v) if v.ndim == 1 else (x[:, :checked], v[:, :checked])), self.damping)
        return SolveResult(x=x, solver=self.name, iterations=1, residual=res, converged=res <= 1e-6,
                           damping=self.damping, info={"blocks": [f.name for f in blocks], "fisher": self.fisher,
                                                       "smallest_eigenvalue": smallest, "residual_columns": checked})


class EKFACSolver(KFACSolver):
    """EK-FAC: K-FAC's eigenbasis with the eigenvalues refitted to the per-example gradients'
    second moments in it (George et al. 2018; module docstring)."""

    name = "ekfac"
    corrected = True
