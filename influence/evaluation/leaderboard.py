"""The estimator leaderboard's logic: which estimators apply to a model, how each is scored
(leave-one-out on stored re-fits, the LDS over shared re-fits, cost), and its tables.

``scripts/benchmark_estimators.py`` is argument parsing and calls into this module. Every
estimator is built here with its options named (``InfluenceFunction(CGSolver(tol=1e-8,
damping=damping))``), so ``damping`` reaches the solver through named arguments only. A
"row" is a dict of one estimator's numbers; each model's rows come with a line saying where
its LOO re-fits came from (:class:`Board`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

DATTRI = {"fig2_lr": "dattri (MNIST LR, PyTorch; its own protocol): LOO Pearson about 0.87 for the influence "
                     "solvers, 0.27 Arnoldi, 0.28 TracIn, 0.78 TRAK with 50 models"}


@dataclass
class Board:
    """One model's leaderboard: rows by estimator label, and where its LOO re-fits came from."""

    rows: dict = field(default_factory=dict)
    source: str = ""

    def note(self, text: str) -> None:
        self.source = text if not self.source else f"{self.source}; {text}"


def has_kronecker_layers(model) -> bool:
    from ..generic_neural_net import GenericNeuralNet

    return type(model)._kfac_taps is not GenericNeuralNet._kfac_taps


def estimators_for(model, quick: bool, nonconvex: bool = False, damping: float = 0.0, lissa_scale="auto"):
    """``[(label, Estimator)]`` that apply to ``model`` (the leaderboard's columns)."""
    from ..estimators import TRAK, GradientCosine, GradientDot, InfluenceFunction, RandomScores, TracIn
    from ..solvers import ArnoldiSolver, CGSolver, EKFACSolver, ExactSolver, KFACSolver, LissaSolver

    out = []
    if not nonconvex and model.n_params <= (2000 if quick else model.max_hessian_params):
        out.append(("exact", InfluenceFunction(ExactSolver())))
    # non-convex networks: preconditioned CG (the same answer in fewer iterations): by the explicit Gauss-Newton
    # matrix where it fits (one iteration on G), else by the top 30 eigenpairs
    pc = {} if not nonconvex else ({"preconditioner": "gauss-newton"} if model.n_params <= model.max_hessian_params
                                   else {"preconditioner": "nystrom", "preconditioner_rank": 30})
    out.append(("CG", InfluenceFunction(CGSolver(tol=1e-8, damping=damping, **pc))))
    if nonconvex:  # LiSSA left out: the paper used CG here, and at its depth the series is far from converged
        out.append(("CG, Gauss-Newton", InfluenceFunction(CGSolver(tol=1e-8, damping=0.01, **pc),
                                                          curvature="gauss-newton")))
        out.append(("Arnoldi rank 50, fill = wd",
                    InfluenceFunction(ArnoldiSolver(rank=50, fill=model.weight_decay, damping=damping))))
    else:
        depth = 1000 if quick else 5000
        lissa = LissaSolver(scale=lissa_scale, depth=depth, num_samples=10, batch_size=1, seed=17)
        label = "LiSSA (scale='auto', batch 1)" if lissa_scale == "auto" else "LiSSA (paper's settings)"
        out.append((label, InfluenceFunction(lissa)))
        out.append(("Arnoldi rank 50, fill = wd", InfluenceFunction(ArnoldiSolver(rank=50, fill=model.weight_decay))))
    if has_kronecker_layers(model):
        out += [("K-FAC", InfluenceFunction(KFACSolver(damping=damping))),
                ("EK-FAC", InfluenceFunction(EKFACSolver(damping=damping)))]
    out += [("TracIn" + (" (checkpoints)" if getattr(model, "checkpoints_", None) else ": grad dot at the fit"),
             TracIn()), ("TRAK (proj 2048, 1 model)", TRAK(proj_dim=2048)), ("grad dot", GradientDot()),
            ("grad cos", GradientCosine()), ("random", RandomScores(seed=0))]
    return out


def score(model, est, X, y):
    """``(matrix, seconds)``: an estimator's scores of every training point for test points X."""
    t0 = time.perf_counter()
    M = est.fit(model).influence_matrix(X, y)
    return np.asarray(M), time.perf_counter() - t0


def loo_scores(model, estimators, x, y, removed, actual) -> dict:
    """``{label: (pearson, spearman, seconds)}`` of each estimator's predicted change in test loss
    (``-I / n``) against stored re-fits without each point of ``removed``."""
    import scipy.stats

    out = {}
    for label, est in estimators:
        M, secs = score(model, est, x, y)
        pred = -M[0, removed] / model.n_train_
        out[label] = (float(scipy.stats.pearsonr(actual, pred)[0]), float(scipy.stats.spearmanr(actual, pred)[0]),
                      secs)
        logger.info("%s LOO: Pearson %.3f (%.1fs)", label, out[label][0], secs)
    return out


def own_loo(model, x, y, k: int, n_jobs=None):
    """``(removed, actual, seconds)``: re-fits made once for every estimator by the figures'
    protocol (the ``k`` largest |CG influence| at ``(x, y)``), where no stored ones exist."""
    from ..refit_validation import leave_one_out

    pred = model.gradient_dots(model.s_test(x, y, solver="cg", tol=1e-8).x) / model.n_train_
    idx = np.argsort(-np.abs(pred))[:k]
    res = leave_one_out(model, x, y, idx, pred[idx], n_jobs=n_jobs)
    logger.info("%d LOO re-fits made here (no stored figure output): Pearson with CG %.3f, %.0fs", k, res.pearson,
                res.wall_time_s)
    return idx, res.actual, res.wall_time_s


def lds_test_points(model, X_test, y_test, k: int):
    """The first ``k`` test points whose loss moves at all (a smooth hinge is flat beyond the
    margin): test-loss gradient above 1e-3 of the largest among the first 50 k."""
    norms = np.linalg.norm(model.test_gradients(X_test[:50 * k], y_test[:50 * k]), axis=1)
    keep = np.flatnonzero(norms > 1e-3 * norms.max())[:k]
    return X_test[keep], y_test[keep]


def convex_board(model, X_test, y_test, *, quick: bool, lds_tests: int, lds_subsets: int, seed: int = 0,
                 n_jobs=None, loo=None, loo_point=None, lissa_scale="auto", board: Board | None = None) -> Board:
    """A convex model's rows: the LDS over shared re-fits, the cost, and (with ``loo`` =
    ``(removed, actual)`` at ``loo_point``) the LOO correlations."""
    from ..refit_validation import linear_datamodeling_score

    board = board or Board()
    ests = estimators_for(model, quick, lissa_scale=lissa_scale)
    X_test, y_test = lds_test_points(model, X_test, y_test, lds_tests)
    matrices = {}
    for label, est in ests:
        matrices[label], secs = score(model, est, X_test, y_test)
        board.rows.setdefault(label, {})["seconds"] = secs
        logger.info("%s: %d test points scored in %.1fs", label, len(X_test), secs)
    lds = linear_datamodeling_score(model, X_test, y_test, matrices, n_subsets=lds_subsets, seed=seed, n_jobs=n_jobs)
    for label in matrices:
        board.rows[label].update(lds=float(lds[label].score), lds_min=float(np.min(lds[label].per_test)))
    if loo is not None:
        for label, (r, rho, _) in loo_scores(model, ests, *loo_point, *loo).items():
            board.rows[label].update(loo_pearson=r, loo_spearman=rho)
    return board


def spam_board(data, *, quick: bool, seed: int = 0) -> Board:
    """Fig 6's task: flip 10% of the spam training labels, rank training points by each
    estimator's |self-score| (and by training loss), count the flips in the top 10%."""
    from ..applications.mislabel import flip_labels
    from ..estimators import TRAK, GradientDot, InfluenceFunction, RandomScores, TracIn
    from ..models.logistic import BinaryLogisticRegression
    from ..solvers import ExactSolver

    ests = [("influence (exact, closed form)", InfluenceFunction(ExactSolver())),
            ("TracIn: grad dot at the fit", TracIn()), ("grad dot (with regulariser)", GradientDot()),
            ("TRAK (proj 2048, 1 model)", TRAK(proj_dim=2048)), ("random", RandomScores(seed=seed)),
            ("training loss", None)]
    repeats = 2 if quick else 5
    found = {label: [] for label, _ in ests}
    seconds = {label: 0.0 for label in found}
    for r in range(repeats):
        y_noisy, flipped = flip_labels(data.y_train, 0.1, np.random.default_rng(seed * 1000 + r))
        model = BinaryLogisticRegression(weight_decay=1e-4).fit(data.X_train, y_noisy)
        top = int(round(0.1 * model.n_train_))
        for label, est in ests:
            t0 = time.perf_counter()
            s = model.train_losses() if est is None else np.abs(est.self_scores(model))
            seconds[label] += time.perf_counter() - t0
            found[label].append(len(np.intersect1d(np.argsort(-s, kind="stable")[:top], flipped)) / len(flipped))
    return Board({label: {"found_at_10pct": float(np.mean(v)), "seconds": seconds[label] / repeats}
                  for label, v in found.items()})


def markdown(boards: dict, notes: list) -> tuple[list[str], dict]:
    """The leaderboard's markdown lines and its flat metrics ``{model.label.key: value}``."""
    lines = ["# Estimator leaderboard", "",
             "Scores in I_up,loss's sign convention; LOO on the figure scripts' own re-fits where stored (else "
             "re-fits made here once by the figure's protocol, shared by every estimator: see each model's LOO "
             "line), LDS over re-fits without a random half (the same subsets for every estimator of a model); "
             "seconds: scoring every training point for the LDS test points (factor and decomposition passes "
             "included).", ""]
    metrics = {}
    for name, board in boards.items():
        rows = board.rows
        metrics.update({f"{name}.{label}.{k}": v for label, r in rows.items() for k, v in r.items()})
        if name == "spam":
            lines += ["## spam: finding flipped labels by self-score", "",
                      "| ranking by | flipped labels found in the top 10% (mean over repeats) | seconds |",
                      "|---|---|---|"]
            lines += [f"| {label} | {r['found_at_10pct']:.3f} | {r['seconds']:.1f} |" for label, r in rows.items()]
            lines.append("")
            continue
        lines += [f"## {name}", ""] + ([f"LOO: {board.source}", ""] if board.source else []) + [
            "| estimator | LOO Pearson | LOO Spearman | LDS mean (min) | seconds |", "|---|---|---|---|---|"]
        for label, r in rows.items():
            loo_p = f"{r['loo_pearson']:.3f}" if "loo_pearson" in r else "–"
            loo_s = f"{r['loo_spearman']:.3f}" if "loo_spearman" in r else "–"
            lds = f"{r['lds']:.3f} ({r['lds_min']:.3f})" if "lds" in r else "–"
            lines.append(f"| {label} | {loo_p} | {loo_s} | {lds} | {r.get('seconds', float('nan')):.1f} |")
        if name in DATTRI:
            lines += ["", f"For comparison, {DATTRI[name]}."]
        lines.append("")
    lines += [f"- {n}" for n in notes]
    return lines, metrics


def plot(boards: dict, quick: bool):
    """LDS (or LOO Pearson, or flips found) against seconds, one panel per model."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(boards), figsize=(5.5 * len(boards), 4.2), squeeze=False)
    for ax, (name, board) in zip(axes[0], boards.items()):
        rows = board.rows
        key = next(k for k in ("lds", "loo_pearson", "found_at_10pct") if any(k in r for r in rows.values()))
        for label, r in rows.items():
            if key in r:
                x = max(r.get("seconds", np.nan), 1e-3)
                ax.scatter(x, r[key], s=25)
                ax.annotate(label, (x, r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log", xlabel="seconds to score every training point",
               ylabel={"lds": "LDS", "loo_pearson": "LOO Pearson", "found_at_10pct": "flips found at 10% checked"}[key],
               title=name + (" (quick)" if quick else ""))
    fig.tight_layout()
    return fig


def cnn_board(cnn, *, quick: bool, out_dir, lds_tests: int, lds_subsets: int, seed: int = 0, n_jobs=None,
              tracin: bool = True, lds: bool = True) -> Board:
    """The Fig 2 CNN's rows from its stored run (:class:`~influence.evaluation.stored_runs.StoredCNN`,
    built ``with_refit_settings``).

    LOO on the figure's stored re-fits, every estimator at the figure's test point (CG on H
    and on G: the figure's own solves, stored with it; their seconds are the figure's). The
    LDS (``lds``) over re-fits without a random half by the figure's protocol (Adam continued
    from the fitted state in the figure's fit record), journaled in ``out_dir``, for every
    estimator: CG on H and on G are new solves at the figure's damping (Gauss-Newton
    preconditioned: one iteration on G), reported in the rows of the figure's solves.
    """
    from pathlib import Path

    import scipy.stats

    from ..refit_validation import linear_datamodeling_score
    from .fit_record import fitted_state
    from .stored_runs import replayed_checkpoints

    model, arrays, metrics, d = cnn.model, cnn.arrays, cnn.metrics, cnn.data
    m, cfg = metrics["metrics"], cnn.config
    removed, actual = cnn.removed, cnn.actual
    board = Board(source=f"the {len(removed)} stored re-fits of {cnn.folder}"
                  + (" (a quick run: not comparable with the paper)" if metrics.get("quick") else ""))
    if tracin:
        sub = arrays["train_subset"]
        model.checkpoints_, diff = replayed_checkpoints(cfg, metrics.get("seed", 0), d.train.x[sub], d.train.y[sub],
                                                        arrays["theta"], Path(out_dir))
        board.note(f"TracIn over {len(model.checkpoints_)} checkpoints of the figure's fit run again (same "
                   f"configuration, data and seed; its end differs from the stored theta by at most {diff:.1e})")
    for label, key, secs in (("CG (the figure's solve)", "s_test", m.get("cg_seconds")),
                             ("CG, Gauss-Newton (the figure's solve)", "s_test_gauss_newton",
                              m.get("gauss_newton_cg_seconds"))):
        if key not in arrays:
            continue
        t0 = time.perf_counter()
        pred = model.gradient_dots(arrays[key]) / model.n_train_
        secs = (float("nan") if secs is None else secs) + time.perf_counter() - t0
        board.rows[label] = {"loo_pearson": float(scipy.stats.pearsonr(actual, pred[removed])[0]),
                             "loo_spearman": float(scipy.stats.spearmanr(actual, pred[removed])[0]), "seconds": secs}
    damping = cnn.damping_used
    every = estimators_for(model, quick, nonconvex=True, damping=damping)
    cheap = [(label, est) for label, est in every if not label.startswith("CG")]
    for label, (r, rho, secs) in loo_scores(model, cheap, *cnn.test_point, removed, actual).items():
        board.rows[label] = {"loo_pearson": r, "loo_spearman": rho, "seconds": secs}
    if not lds:
        return board
    state = fitted_state(cnn.folder, arrays["theta"])
    if state is None:
        board.note("no LDS: the figure's fit journal (fit.jsonl and its npz, with the Adam state that re-training "
                   "continues) is not in the folder")
        return board
    model.restore_training_state(*state)
    Xk, yk = d.test.x[:lds_tests], d.test.y[:lds_tests]
    matrices = {}
    solves = {"CG": "CG (the figure's solve)", "CG, Gauss-Newton": "CG, Gauss-Newton (the figure's solve)"}
    for label, est in every:
        row = solves.get(label, label)
        matrices[row], secs = score(model, est, Xk, yk)
        board.rows.setdefault(row, {})["seconds"] = secs  # now: scoring every training point for the LDS test points
    journal = Path(out_dir) / "cnn_lds_refits.jsonl"
    result = linear_datamodeling_score(model, Xk, yk, matrices, n_subsets=lds_subsets, seed=seed, n_jobs=n_jobs,
                                       journal=journal)
    for label in matrices:
        board.rows[label].update(lds=float(result[label].score), lds_min=float(np.min(result[label].per_test)))
    first = next(iter(result.values()))
    board.note(f"LDS: {lds_tests} test points over {lds_subsets} re-fits without a random half "
               f"({first.wall_time_s:.0f} s, journaled in {journal}), for every estimator (CG on H and on G: new "
               f"solves at the figure's damping; their LOO: the figure's solves); seconds of the LDS rows: scoring "
               f"all {model.n_train_} training points for the {lds_tests} test points")
    return board
