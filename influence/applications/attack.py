"""Training-set attacks with I_pert,loss (paper Sec. 5.2, Fig 5).

A model ``p(y | x) = sigmoid(w . f(x))`` is logistic regression on the features ``f`` of a
frozen network; only ``w`` is theta. Perturbing a training input x by delta changes the
fitted parameters, to first order, by ``-(1/n) H^-1 (grad_w L(x + delta) - grad_w L(x))``,
so the test loss changes by

    Delta L_test ~ (1/n) [I_up,loss(z_{x+delta}, z_test) - I_up,loss(z_x, z_test)],
    I_up,loss(z_x, z_test) = -s_test . grad_w L(z_x),   s_test = H^-1 grad_w L(z_test).

Its gradient with respect to the pixels, ``d I_up,loss / dx`` (the paper's I_pert,loss),
gives the direction that raises the test loss most. Each attack iteration:

1. ``s_test`` on the current top model (CG warm-started from the previous iteration's
   solution, to a relative residual of 1e-10, preconditioned by the Cholesky factor of the
   Hessian before the attack: only a few rows of the training features change, so a few
   CG steps suffice; ``solver="exact"`` for Cholesky solves of the current Hessian);
2. the pixel gradient for the attacked training images, through the whole network;
3. a signed step ``x <- x + step * sign(g)``, then the projection onto the box
   ``|x - x_orig| <= radius`` (radius just under half an 8-bit level, so every perturbed
   image rounds to its original 8-bit image) intersected with the valid input range;
4. the attacked images' features are recomputed and the top model re-trained (warm start);
5. stop when every target's predicted label has flipped, when the projected images stop
   changing (a fixed point: further iterations would repeat it), or at ``max_iter``.

Training images to attack are chosen per target by the size of the pixel gradient,
``sum |d I_up,loss / dx|`` (the paper's ranking), among a pool: the ``prefilter`` training
images of largest ``|I_up,loss|`` and the ``prefilter`` of largest feature-space gradient
``||d I_up,loss / d f||`` (closed form). The full ranking would need one backward pass
through the network per training image and target; the pool keeps it to at most
``2 * prefilter`` passes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

logger = logging.getLogger(__name__)


def box_around(x0: np.ndarray, radius: float, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel bounds ``[max(x0 - radius, lo), min(x0 + radius, hi)]``."""
    x0 = np.asarray(x0)
    return np.maximum(x0 - radius, lo).astype(x0.dtype), np.minimum(x0 + radius, hi).astype(x0.dtype)


def project(x: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the box ``[lower, upper]`` (elementwise clip)."""
    return np.minimum(np.maximum(x, lower), upper)


@dataclass
class AttackResult:
    train_indices: np.ndarray  # attacked training images
    test_indices: np.ndarray  # targets
    x_original: np.ndarray  # (k, ...) model-input units
    x_perturbed: np.ndarray
    flipped: np.ndarray  # (n_targets,) bool
    prob_true_before: np.ndarray  # (n_targets,) P(true label) before the attack
    prob_true_after: np.ndarray
    iterations: int
    stop_reason: str
    theta: np.ndarray  # top model after the attack
    history: list = field(default_factory=list)  # per iteration: mean P(true label) of the targets
    wall_time_s: float = 0.0

    @property
    def success(self) -> bool:
        return bool(np.all(self.flipped))


class TrainingSetAttack:
    """Iterative I_pert,loss attack on a top model over frozen features.

    ``model``: a fitted :class:`inception.BinaryInceptionModel` (or any
    :class:`~influence.models.logistic.BinaryLogisticRegression` with ``attach``-ed
    ``features(inputs)`` and ``influence_from_inputs(s, inputs, y, with_gradient=True)``),
    fitted on ``features_train``. ``inputs_train``: the training images in model-input
    units (e.g. ``preprocessing(uint8)``). ``level``: one 8-bit level in those units;
    ``bounds``: the valid input range.
    """

    def __init__(self, model, inputs_train: np.ndarray, features_train: np.ndarray, y_train: np.ndarray,
                 level: float, bounds: tuple[float, float], step: float = 0.02, radius_levels: float = 0.5,
                 max_iter: int = 100, solver: str = "cg", prefilter: int = 10, grad_batch_size: int = 8):
        self.model = model
        self.inputs_train = inputs_train
        self.features_train = np.asarray(features_train, dtype=np.float64)
        self.y_train = np.asarray(y_train)
        self.level = float(level)
        self.bounds = bounds
        self.step = float(step)
        # strictly inside half a level so the perturbed image rounds back to the original
        self.radius = float(radius_levels) * self.level * (1 - 1e-3)
        self.max_iter = int(max_iter)
        if solver not in ("cg", "exact"):
            raise ValueError(f"solver must be 'cg' or 'exact', got {solver!r}")
        self.solver = solver
        self.prefilter = int(prefilter)
        self.grad_batch_size = grad_batch_size
        self.theta0 = model.theta_.copy()
        # CG preconditioner: the Hessian of the unattacked model (fitted on features_train)
        self._h0_factor = scipy.linalg.cho_factor(model.hessian()) if solver == "cg" else None

    def _precondition(self, r: np.ndarray) -> np.ndarray:
        """``H0^-1 r`` with H0 the Hessian of the unattacked model."""
        return scipy.linalg.cho_solve(self._h0_factor, r)

    # ------------------------------------------------------------------ pieces
    def s_test(self, model, f_test, y_test, x0: np.ndarray | None = None) -> np.ndarray:
        """``H^-1 grad L(z_test)`` (mean over the targets): exact solve, or CG warm-started at ``x0``."""
        if self.solver == "exact":
            return model.s_test(f_test, y_test, solver="exact", use_cache=False).x
        from ..solvers import conjugate_gradient
        s, _, _ = conjugate_gradient(model.hvp, model.test_gradient(f_test, y_test), tol=1e-10, maxiter=2000, x0=x0,
                                     preconditioner=self._precondition)
        return s

    def rank_candidates(self, f_test, y_test, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` training images with the largest ``sum |d I_up,loss / dx|`` (see module doc)."""
        m = self.model
        m.set_theta(self.theta0)
        s = self.s_test(m, f_test, y_test)
        infl = -m.gradient_dots(s)
        n_pool = max(k, self.prefilter)
        pool = np.union1d(np.argsort(-np.abs(infl))[:n_pool],
                          np.argsort(-self.feature_gradient_norms(s))[:n_pool])
        _, g = m.influence_from_inputs(s, self.inputs_train[pool], self.y_train[pool], batch_size=self.grad_batch_size,
                                       with_gradient=True)
        size = np.abs(g.reshape(len(pool), -1)).sum(axis=1)
        order = np.argsort(-size)
        return pool[order[:k]], size[order[:k]]

    def feature_gradient_norms(self, s: np.ndarray) -> np.ndarray:
        """``|| d I_up,loss(z_j, z_test) / d f_j ||`` for every training point, in closed form.

        With ``r_j = sigmoid(w . f_j) - y_j`` and ``I_j = -r_j (s . f_j)``:
        ``dI_j / df_j = -r_j s - (s . f_j) sigmoid'(w . f_j) w``. The pixel gradient is this
        vector pulled back through the network, so its size tracks this norm (a cheap
        proxy for the paper's ranking of all training images by ``sum |dI/dx|``).
        """
        F, w = self.features_train, self.model.theta_
        z = F @ w
        sig = 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free sigmoid
        r = sig - self.y_train
        g = -r[:, None] * s[None, :] - ((F @ s) * sig * (1.0 - sig))[:, None] * w[None, :]
        return np.linalg.norm(g, axis=1)

    def _prob_true(self, f_test, y_test) -> np.ndarray:
        p1 = self.model.predict_proba(f_test)[:, 1]
        return np.where(np.asarray(y_test) == 1, p1, 1 - p1)

    # ------------------------------------------------------------------ the loop
    def attack(self, test_indices, train_indices, features_test: np.ndarray, y_test: np.ndarray) -> AttackResult:
        """Perturb ``train_indices`` to flip the predictions on ``test_indices`` (all at once)."""
        t0 = time.perf_counter()
        m = self.model
        test_indices = np.atleast_1d(np.asarray(test_indices))
        train_indices = np.atleast_1d(np.asarray(train_indices))
        f_test, y_t = self.features_test_of(features_test, y_test, test_indices)
        m.set_training_data(self.features_train, self.y_train)
        m.set_theta(self.theta0)
        p_before = self._prob_true(f_test, y_t)
        x0 = np.asarray(self.inputs_train[train_indices])
        lower, upper = box_around(x0, self.radius, *self.bounds)
        x = x0.copy()
        F = self.features_train.copy()
        y_att = self.y_train[train_indices]
        history, reason, it = [float(p_before.mean())], "max_iter", 0
        flipped = p_before < 0.5
        s = None
        try:
            for it in range(1, self.max_iter + 1):
                s = self.s_test(m, f_test, y_t, x0=s)
                _, g = m.influence_from_inputs(s, x, y_att, batch_size=self.grad_batch_size, with_gradient=True)
                x_new = project(x + self.step * np.sign(g).astype(x.dtype), lower, upper)
                unchanged = np.array_equal(x_new, x)
                x = x_new
                F[train_indices] = m.features(x)
                m.fit(F, self.y_train, theta0=m.theta_)
                p_true = self._prob_true(f_test, y_t)
                history.append(float(p_true.mean()))
                flipped = p_true < 0.5
                logger.debug("iteration %d: mean P(true) %.4f, flipped %d/%d", it, p_true.mean(), flipped.sum(),
                             len(flipped))
                if flipped.all():
                    reason = "flipped"
                    break
                if unchanged:
                    reason = "fixed point"
                    break
            p_after = self._prob_true(f_test, y_t)
            theta = m.theta_.copy()
        finally:  # leave the model as we found it
            m.set_training_data(self.features_train, self.y_train)
            m.set_theta(self.theta0)
        return AttackResult(train_indices, test_indices, x0, x, p_after < 0.5, p_before, p_after, it, reason, theta,
                            history, time.perf_counter() - t0)

    @staticmethod
    def features_test_of(features_test, y_test, idx):
        return np.asarray(features_test)[idx], np.asarray(y_test)[idx]

    def attack_target(self, test_idx: int, features_test, y_test, n_poison: int = 1,
                      candidates: np.ndarray | None = None) -> AttackResult:
        """Single-target mode: attack the ``n_poison`` highest-ranked training images."""
        f_t, y_t = self.features_test_of(features_test, y_test, [test_idx])
        if candidates is None:
            candidates, _ = self.rank_candidates(f_t, y_t, n_poison)
        return self.attack([test_idx], candidates[:n_poison], features_test, y_test)


@dataclass
class StratifiedTargets:
    """Targets drawn per confidence stratum (see :func:`stratified_targets`).

    ``targets[j]`` lies in stratum ``stratum[j]`` (0 = least confident); stratum ``s`` holds
    ``sizes[s]`` candidates with margins in ``[lows[s], highs[s]]`` (median ``medians[s]``).
    """

    targets: np.ndarray
    stratum: np.ndarray
    sizes: np.ndarray
    lows: np.ndarray
    highs: np.ndarray
    medians: np.ndarray

    def rates(self, flags) -> np.ndarray:
        """Per-stratum mean of ``flags`` (aligned with ``targets``; NaN where none drawn)."""
        flags = np.asarray(flags, dtype=float)
        return np.array([flags[self.stratum == s].mean() if np.any(self.stratum == s) else np.nan
                         for s in range(len(self.sizes))])

    def estimate(self, flags) -> float:
        """The mean of ``flags`` over every candidate, estimated by weighting each stratum's
        sample mean by the stratum's size (strata without a draw are left out)."""
        r = self.rates(flags)
        ok = ~np.isnan(r)
        return float(np.sum(r[ok] * self.sizes[ok]) / np.sum(self.sizes[ok])) if ok.any() else float("nan")


def stratified_targets(margins, candidates, n_strata: int = 10, per_stratum: int = 10, seed: int = 0,
                       strata=None) -> StratifiedTargets:
    """Rank ``candidates`` (indices into ``margins``) by margin, split them into
    ``n_strata`` groups of (nearly) equal size -- deciles for 10 -- and draw ``per_stratum``
    of each without replacement (all of a smaller group), seeded. ``strata``: draw only
    from these groups (0-based, 0 = smallest margin), e.g. for a partial run.
    """
    margins = np.asarray(margins, dtype=float)
    candidates = np.asarray(candidates, dtype=int).reshape(-1)
    if n_strata < 1 or per_stratum < 1:
        raise ValueError(f"n_strata and per_stratum must be >= 1, got {n_strata} and {per_stratum}")
    if len(candidates) < n_strata:
        raise ValueError(f"{len(candidates)} candidates cannot fill {n_strata} strata")
    if len(np.unique(candidates)) != len(candidates):
        raise ValueError("candidates must be distinct indices")
    wanted = set(range(n_strata)) if strata is None else {int(s) for s in strata}
    if not wanted <= set(range(n_strata)):
        raise ValueError(f"strata must lie in 0..{n_strata - 1}, got {sorted(wanted)}")
    rng = np.random.default_rng(seed)
    groups = np.array_split(candidates[np.argsort(margins[candidates], kind="stable")], n_strata)
    targets, labels = [], []
    for s, g in enumerate(groups):
        pick = rng.choice(g, min(per_stratum, len(g)), replace=False)  # drawn for every group: same seeds per group
        if s in wanted:
            targets.append(pick)
            labels.append(np.full(len(pick), s))
    m = [margins[g] for g in groups]
    return StratifiedTargets(np.concatenate(targets), np.concatenate(labels), np.array([len(g) for g in groups]),
                             np.array([x.min() for x in m]), np.array([x.max() for x in m]),
                             np.array([np.median(x) for x in m]))
