#!/usr/bin/env python
"""Estimator leaderboard: influence functions vs TracIn, TRAK and gradient baselines on the paper's models.

For each model whose data is present (the Fig 2 logistic regression, the Fig 3 smooth-hinge
SVM at t = 0.001, the Fig 4 Inception head, the Fig 2 CNN), every estimator that applies (exact influence where the
Hessian fits, CG, LiSSA with the paper's settings, Arnoldi rank 50 with fill = wd,
Gauss-Newton CG for the CNN, K-FAC, EK-FAC, TracIn, TRAK, gradient dot and cosine, random)
is scored on

- leave-one-out: Pearson and Spearman of its predicted change in test loss against the
  re-fits the figure script made (read from ``--outputs``/<figure>/arrays.npz), at the
  figure's own parameters; where that output is absent (and for the Inception head, whose
  figure makes none), --loo-removals re-fits made here once by the figure's protocol and
  shared by every estimator (the CNN's are never re-made here);
- the linear datamodeling score (LDS) on ``--lds-tests`` test points over ``--lds-subsets``
  re-fits without a random half of the training set, the same subsets for every
  estimator (for the CNN: re-fits by the figure's protocol from its recorded fit, about an
  hour for 50, journaled; every estimator but CG, which takes ~25 min per test point there on
  H and G together: --cnn-cg-lds-tests K adds it on the first K test points, the others beside it);
- its wall time to score every training point for those test points.

For the Fig 6 spam model the criterion is the paper's use: 10% of the training labels are
flipped (seeded, 5 repeats; --quick 2) and the training points are checked in the order of
each estimator's |self-score| (exact self-influence, TracIn / gradient dot: the squared
gradient norm, TRAK's phi_i^T (Phi^T Phi)^-1 phi_i (1 - p_i), training loss, random); the
table gives the fraction of the flipped labels found in the first 10% checked.

Writes ESTIMATORS.md (the tables, with dattri's MNIST logistic-regression figures quoted
beside ours), metrics.json, arrays.npz and a figure of LDS against cost.
--quick: 5 test points, 10 subsets, LiSSA depth 1,000, no exact Hessian for the 7,840-parameter model.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

from influence.experiment import run

NAME = "benchmark_estimators"
logger = logging.getLogger(NAME)
DATTRI = {"fig2_lr": "dattri (MNIST LR, PyTorch; its own protocol): LOO Pearson about 0.87 for the influence "
                     "solvers, 0.27 Arnoldi, 0.28 TracIn, 0.78 TRAK with 50 models"}


def add_arguments(parser):
    parser.add_argument("--models", nargs="*", default=["fig2_lr", "fig3_svm", "inception", "spam", "cnn"],
                        help="models to benchmark (default: fig2_lr fig3_svm inception spam cnn)")
    parser.add_argument("--lds-tests", type=int, default=None, help="test points for the LDS (default 20; --quick 5)")
    parser.add_argument("--lds-subsets", type=int, default=None,
                        help="re-fits without a random half for the LDS (default 50; --quick 10)")
    parser.add_argument("--outputs", default="output",
                        help="folder with the figure scripts' outputs whose re-fits are reused (default: output)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel re-fitting processes (default: all CPUs)")
    parser.add_argument("--loo-removals", type=int, default=None,
                        help="where a figure's stored re-fits are absent, re-fit once without each of this many "
                             "training points (the largest |CG influence| at the figure's test point, as the figure "
                             "does) and score every estimator on them (default 40; --quick 10; 0: no LOO column)")
    parser.add_argument("--cnn-tracin", action=argparse.BooleanOptionalAction, default=True,
                        help="the CNN's TracIn over 10 checkpoints of the figure's fit run again with the same "
                             "configuration, data and seed (10 min for the full run; journaled); default on "
                             "(--no-cnn-tracin: the gradient dot product at the fit)")
    parser.add_argument("--cnn-lds", action=argparse.BooleanOptionalAction, default=True,
                        help="the CNN's LDS: --lds-subsets re-fits without a random half by the figure's protocol "
                             "(about an hour on 2 cores for 50; journaled, so a killed run resumes); default on")
    parser.add_argument("--cnn-cg-lds-tests", type=int, default=0, metavar="K",
                        help="also score CG on H and on the Gauss-Newton matrix for the CNN's LDS, on the first K "
                             "of its LDS test points (about 25 min per test point on 2 cores, so not in the default "
                             "3-hour run), every estimator's LDS over the same K beside it; default 0")


def estimators_for(model, quick: bool, nonconvex: bool = False, damping: float = 0.0, lissa_scale="auto"):
    """(label, estimator) pairs that apply to ``model``."""
    from influence.estimators import TRAK, GradientCosine, GradientDot, InfluenceFunction, RandomScores, TracIn
    from influence.generic_neural_net import GenericNeuralNet

    out = []
    if not nonconvex and model.n_params <= (2000 if quick else model.max_hessian_params):
        out.append(("exact", InfluenceFunction("exact")))
    out.append(("CG", InfluenceFunction("cg", tol=1e-8, damping=damping)))
    if nonconvex:  # LiSSA left out: the paper used CG here, and at its depth the series is far from converged (README)
        out.append(("CG, Gauss-Newton", "gauss-newton"))
        out.append(("Arnoldi rank 50, fill = wd", InfluenceFunction("arnoldi", rank=50, fill=model.weight_decay,
                                                                     damping=damping)))
    else:
        depth = 1000 if quick else 5000
        if lissa_scale == "auto":
            out.append(("LiSSA (scale='auto', batch 1)", InfluenceFunction("lissa", scale="auto", depth=depth,
                                                                          num_samples=10, batch_size=1, seed=17)))
        else:
            out.append(("LiSSA (paper's settings)", InfluenceFunction("lissa", scale=lissa_scale, depth=depth,
                                                                       num_samples=10, batch_size=1, seed=17)))
        out.append(("Arnoldi rank 50, fill = wd", InfluenceFunction("arnoldi", rank=50, fill=model.weight_decay)))
    if type(model)._kfac_taps is not GenericNeuralNet._kfac_taps:
        out += [("K-FAC", InfluenceFunction("kfac", damping=damping)),
                ("EK-FAC", InfluenceFunction("ekfac", damping=damping))]
    out += [("TracIn" + (" (checkpoints)" if getattr(model, "checkpoints_", None) else ": grad dot at the fit"),
             TracIn()), ("TRAK (proj 2048, 1 model)", TRAK(proj_dim=2048)), ("grad dot", GradientDot()),
            ("grad cos", GradientCosine()), ("random", RandomScores(seed=0))]
    return out


def score(model, est, X, y):
    """(matrix, seconds): an estimator's scores of every training point for test points X."""
    t0 = time.perf_counter()
    if est == "gauss-newton":
        model.curvature = "gauss-newton"
        try:
            M = model.influence_matrix(X, y, solver="cg", tol=1e-8, damping=0.01)
        finally:
            model.curvature = "hessian"
    else:
        M = est.influence_matrix(model, X, y)
    return np.asarray(M), time.perf_counter() - t0


def stored(path):
    import json
    from pathlib import Path

    path = Path(path)
    if not (path / "arrays.npz").is_file() or not (path / "metrics.json").is_file():
        return None
    return dict(np.load(path / "arrays.npz")), json.loads((path / "metrics.json").read_text())


def loo_scores(model, estimators, x, y, removed, actual):
    """{label: (pearson, spearman, seconds)} of each estimator's prediction for the stored re-fits."""
    import scipy.stats

    out = {}
    for label, est in estimators:
        M, secs = score(model, est, x, y)
        pred = -M[0, removed] / model.n_train_
        out[label] = (float(scipy.stats.pearsonr(actual, pred)[0]), float(scipy.stats.spearmanr(actual, pred)[0]),
                      secs)
        logger.info("%s LOO: Pearson %.3f (%.1fs)", label, out[label][0], secs)
    return out


def bench_convex(name, model, X_test, y_test, args, loo=None, loo_point=None, lissa_scale="auto"):
    """Rows {label: dict} for a convex model: LDS over shared re-fits, cost, and LOO on stored re-fits."""
    from influence import linear_datamodeling_score

    quick = args.quick
    k = args.lds_tests or (5 if quick else 20)
    subsets = args.lds_subsets or (10 if quick else 50)
    ests = estimators_for(model, quick, lissa_scale=lissa_scale)
    # test points whose loss moves at all (a smooth hinge is flat beyond the margin): the first k
    # whose test-loss gradient is not negligible
    norms = np.linalg.norm(model.test_gradients(X_test[:50 * k], y_test[:50 * k]), axis=1)
    keep = np.flatnonzero(norms > 1e-3 * norms.max())[:k]
    X_test, y_test = X_test[keep], y_test[keep]
    rows, matrices = {}, {}
    for label, est in ests:
        M, secs = score(model, est, X_test[:k], y_test[:k])
        matrices[label] = M
        rows[label] = {"seconds": secs}
        logger.info("%s %s: %d test points scored in %.1fs", name, label, k, secs)
    lds = linear_datamodeling_score(model, X_test[:k], y_test[:k], matrices, n_subsets=subsets, seed=args.seed,
                                    n_jobs=args.jobs)
    for label in rows:
        rows[label].update(lds=float(lds[label].score), lds_min=float(np.min(lds[label].per_test)))
    if loo is not None:
        x, y = loo_point
        for label, (r, rho, _) in loo_scores(model, ests, x, y, *loo).items():  # at the figure's point
            rows[label].update(loo_pearson=r, loo_spearman=rho)
    return rows


def main(exp):
    import matplotlib.pyplot as plt
    from pathlib import Path

    from influence.datasets.manifest import DataError

    args = exp.args
    results, notes = {}, []
    for name in args.models:
        try:
            if name == "fig2_lr":
                results[name] = fig2_lr(args)
            elif name == "fig3_svm":
                results[name] = fig3_svm(args)
            elif name == "spam":
                results[name] = spam(args)
            elif name == "inception":
                results[name] = inception_head(args)
            elif name == "cnn":
                res = cnn(args)
                if res is None:
                    notes.append(f"cnn: no stored fig2_cnn_loo output under {args.outputs}; skipped")
                else:
                    results[name] = res
            else:
                raise ValueError(f"unknown model {name!r}")
        except DataError as exc:
            notes.append(f"{name}: data missing ({exc})")
            logger.warning("%s skipped: %s", name, exc)
    if not results:
        raise DataError("; ".join(notes) or "no model ran")
    lines = ["# Estimator leaderboard", "",
             "Scores in I_up,loss's sign convention; LOO on the figure scripts' own re-fits where stored (else "
             "re-fits made here once by the figure's protocol, shared by every estimator: see each model's LOO "
             "line), LDS over "
             "re-fits without a random half (the same subsets for every estimator of a model); seconds: scoring "
             "every training point for the LDS test points (factor and decomposition passes included).", ""]
    metrics = {}
    for name, rows in results.items():
        if name == "spam":
            lines += ["## spam: finding flipped labels by self-score", "",
                      "| ranking by | flipped labels found in the top 10% (mean over repeats) | seconds |",
                      "|---|---|---|"]
            lines += [f"| {label} | {r['found_at_10pct']:.3f} | {r['seconds']:.1f} |" for label, r in rows.items()]
            metrics.update({f"{name}.{label}.{k}": v for label, r in rows.items() for k, v in r.items()})
            lines.append("")
            continue
        kf = max((int(r.get("lds_first_k", 0)) for r in rows.values()), default=0)
        extra = f" LDS, first {kf} test points, mean (min) |" if kf else ""
        lines += [f"## {name}", ""] + ([f"LOO: {LOO_SOURCE[name]}", ""] if name in LOO_SOURCE else []) + [
            "| estimator | LOO Pearson | LOO Spearman | LDS mean (min) | seconds |" + extra,
            "|---|---|---|---|---|" + ("---|" if kf else "")]
        for label, r in rows.items():
            loo_p = f"{r['loo_pearson']:.3f}" if "loo_pearson" in r else "–"
            loo_s = f"{r['loo_spearman']:.3f}" if "loo_spearman" in r else "–"
            lds = f"{r['lds']:.3f} ({r['lds_min']:.3f})" if "lds" in r else "–"
            first = ""
            if kf:
                first = f" {r['lds_first']:.3f} ({r['lds_first_min']:.3f})" if "lds_first" in r else " –"
                first += f"; {r['lds_first_seconds']:.0f} s |" if "lds_first_seconds" in r else " |"
            lines.append(f"| {label} | {loo_p} | {loo_s} | {lds} | {r['seconds']:.1f} |" + first)
            for key, v in r.items():
                metrics[f"{name}.{label}.{key}"] = v
        if name in DATTRI:
            lines += ["", f"For comparison, {DATTRI[name]}."]
        lines.append("")
    lines += [f"- {n}" for n in notes]
    (Path(exp.out) / "ESTIMATORS.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results.items()):
        key = next(k for k in ("lds", "loo_pearson", "found_at_10pct") if any(k in r for r in rows.values()))
        for label, r in rows.items():
            if key in r:
                ax.scatter(max(r["seconds"], 1e-3), r[key], s=25)
                ax.annotate(label, (max(r["seconds"], 1e-3), r[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set(xscale="log", xlabel="seconds to score every training point",
               ylabel={"lds": "LDS", "loo_pearson": "LOO Pearson", "found_at_10pct": "flips found at 10% checked"}[key],
               title=name + (" (quick)" if args.quick else ""))
    fig.tight_layout()
    exp.save_figure(fig)
    exp.save_arrays(**{f"{n}__{k}": np.array([r.get(k, np.nan) for r in rows.values()])
                       for n, rows in results.items() for k in ("seconds", "lds", "loo_pearson", "found_at_10pct")},
                    **{f"{n}__labels": np.array(list(rows)) for n, rows in results.items()})
    targets = {}
    if "fig2_lr" in results and not args.quick:
        r = results["fig2_lr"]
        if "exact" in r:
            targets["fig2_lr.exact.lds"] = ">= 0.95"
        targets["fig2_lr.CG.lds"] = ">= 0.95"
    exp.write_metrics(metrics, paper={k: None for k in metrics}, targets=targets,
                      config={"models": list(results), "lds_tests": args.lds_tests or (5 if args.quick else 20),
                              "lds_subsets": args.lds_subsets or (10 if args.quick else 50)},
                      notes=" ".join(notes) + " The paper reports none of these; dattri's figures are quoted in "
                                              "ESTIMATORS.md with their different protocol.")


def fig2_lr(args):
    from influence import LogisticRegression
    from influence.datasets.mnist import load_mnist

    data = load_mnist(args.data_dir)
    model = LogisticRegression(n_classes=10, weight_decay=0.01, seed=args.seed).fit(data.train.x, data.train.y)
    loo = loo_point = None
    st = stored(f"{args.outputs}/fig2_logreg_loo")
    if st is not None:
        arrays, metrics = st
        model.set_theta(arrays["theta"])
        t = metrics["config"]["test_idx"]
        LOO_SOURCE["fig2_lr"] = f"the {len(arrays['removed_indices'])} stored re-fits of {args.outputs}/fig2_logreg_loo"
        loo, loo_point = (arrays["removed_indices"], arrays["actual_loss_diffs"]), (data.test.x[t:t + 1],
                                                                                     data.test.y[t:t + 1])
    else:
        loo_point = (data.test.x[8:9], data.test.y[8:9])  # the figure's test point
        loo = own_loo(model, *loo_point, args, "fig2_lr", "test point 8, Fig 2's")
    return bench_convex("fig2_lr", model, data.test.x, data.test.y, args, loo, loo_point, lissa_scale=25)


LOO_SOURCE: dict[str, str] = {}  # model -> where its LOO re-fits came from (for ESTIMATORS.md)


def own_loo(model, x, y, args, name=None, where=""):
    """(removed indices, actual loss changes) of re-fits made here once, for every estimator:
    the figure's protocol (largest |predicted change| by CG) when its stored re-fits are absent."""
    from influence import leave_one_out

    k = args.loo_removals if args.loo_removals is not None else (10 if args.quick else 40)
    if k <= 0:
        return None
    pred = model.influence_scores(model.s_test(x, y, solver="cg", tol=1e-8).x) / model.n_train_
    idx = np.argsort(-np.abs(pred))[:k]
    res = leave_one_out(model, x, y, idx, pred[idx], n_jobs=args.jobs)
    if name:
        LOO_SOURCE[name] = (f"{k} re-fits made here ({where}; the largest |CG influence|), no stored figure output; "
                            f"{res.wall_time_s:.0f} s")
    logger.info("%d LOO re-fits made here (no stored figure output): Pearson with CG %.3f, %.0fs", k, res.pearson,
                res.wall_time_s)
    return idx, res.actual


def fig3_svm(args):
    """The smooth-hinge SVM (t = 0.001) fitted at its own optimum for the LDS; LOO as Fig 3 does it:
    at the hinge SVM's stored weights, against the hinge SVM's stored re-fits."""
    from influence.datasets.mnist import load_binary_mnist
    from influence.models.smooth_hinge import SmoothHingeSVM

    data = load_binary_mnist(args.data_dir, signed=True)
    model = SmoothHingeSVM(temp=0.001, weight_decay=0.01, seed=args.seed).fit(data.train.x, data.train.y)
    st = stored(f"{args.outputs}/fig3_smooth_hinge")
    if st is None or st[1].get("quick"):  # no usable stored re-fits: LOO of this model, made here once
        point = (data.test.x[1597:1598], data.test.y[1597:1598])  # the figure's test point
        return bench_convex("fig3_svm", model, data.test.x, data.test.y, args, own_loo(model, *point, args, "fig3_svm",
                                                                                    "test point 1597, Fig 3's"), point)
    rows = bench_convex("fig3_svm", model, data.test.x, data.test.y, args)
    if st is not None and not st[1].get("quick"):  # a quick Fig 3 run re-fits a subset: not comparable
        arrays, metrics = st
        LOO_SOURCE["fig3_svm"] = (f"the {len(arrays['removed_indices'])} stored re-fits of "
                                  f"{args.outputs}/fig3_smooth_hinge, at the hinge SVM's weights")
        at_svm = SmoothHingeSVM(temp=0.001, weight_decay=0.01)
        at_svm.set_training_data(data.train.x, data.train.y).set_theta(arrays["theta_svm"])
        t = metrics["config"]["test_idx"]
        for label, (r, rho, _) in loo_scores(at_svm, estimators_for(at_svm, args.quick), data.test.x[t:t + 1],
                                             data.test.y[t:t + 1], arrays["removed_indices"],
                                             arrays["actual_loss_diffs"]).items():
            rows.setdefault(label, {"seconds": float("nan")}).update(loo_pearson=r, loo_spearman=rho)
    return rows


def inception_head(args):
    """The Fig 4 / Fig 5 top model: logistic regression (wd 0.001) on the 2048-d Inception
    features of the dog-fish images (features read from the figures' cache when there)."""
    from pathlib import Path

    from inception import BinaryInceptionModel, prepare_dogfish

    prep = prepare_dogfish(args.data_dir, Path(args.outputs) / "cache", n_train=60 if args.quick else 900,
                           n_test=30 if args.quick else 300, seed=args.seed, progress=False)
    model = BinaryInceptionModel(weight_decay=0.001, seed=args.seed).fit(prep.F_train, prep.data.y_train)
    # interleave the classes so that the first LDS test points are not all dogs
    y = prep.data.y_test
    dogs, fish = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    m = min(len(dogs), len(fish))
    order = np.concatenate([np.stack([dogs[:m], fish[:m]], axis=1).reshape(-1), dogs[m:], fish[m:]])
    X_test, y_test = prep.F_test[order], y[order]
    point = (X_test[:1], y_test[:1])  # Fig 4 makes no re-fits: LOO at the first LDS test point, made here once
    loo = own_loo(model, *point, args, "inception", "the first LDS test point")
    return bench_convex("inception", model, X_test, y_test, args, loo, point)


def self_scores(model, est) -> np.ndarray:
    """Each training point's score for itself (the check order ranks by its magnitude)."""
    from influence.estimators import TRAK, GradientDot, InfluenceFunction, RandomScores, TracIn
    from influence.estimators.trak import gaussian_projection, projected_margin_gradients

    if isinstance(est, InfluenceFunction):
        return model.self_influence_closed_form()
    if isinstance(est, (GradientDot, TracIn)):  # TracIn without checkpoints: the loss-gradient dot at the fit
        reg = isinstance(est, GradientDot)
        n, c = model.n_train_, 2048
        return np.concatenate([-np.sum(model.per_example_gradients(np.arange(i, min(i + c, n)), reg) ** 2, axis=1)
                               for i in range(0, n, c)])
    if isinstance(est, TRAK):
        P = gaussian_projection(model.n_params, est.proj_dim, est.seed)
        Phi, Q = projected_margin_gradients(model, model.X_train_np_, model.y_train_.numpy(), P)
        w, U = np.linalg.eigh(Phi.T @ Phi + est.damping * np.eye(Phi.shape[1]))
        inv = np.where(w > 1e-12 * w.max(), 1 / np.where(w > 0, w, 1), 0.0)
        return -np.sum(((Phi @ U) * inv) * (Phi @ U), axis=1) * Q
    if isinstance(est, RandomScores):
        return np.random.default_rng(est.seed).standard_normal(model.n_train_)
    raise ValueError(f"no self-score for {est!r}")


def spam(args):
    """Fig 6's task: flip 10% of the spam training labels, rank training points by each
    estimator's |self-score| (and by training loss), count the flips in the top 10%."""
    from pathlib import Path

    from influence import BinaryLogisticRegression
    from influence.applications.mislabel import flip_labels
    from influence.datasets.spam import load_spam
    from influence.estimators import TRAK, GradientDot, InfluenceFunction, RandomScores, TracIn

    data = load_spam(args.data_dir, seed=args.seed, cache_dir=Path(args.out).parent / "cache")
    ests = [("influence (exact, closed form)", InfluenceFunction("exact")), ("TracIn: grad dot at the fit", TracIn()),
            ("grad dot (with regulariser)", GradientDot()), ("TRAK (proj 2048, 1 model)", TRAK(proj_dim=2048)),
            ("random", RandomScores(seed=args.seed))]
    repeats = 2 if args.quick else 5
    found = {label: [] for label, _ in ests + [("training loss", None)]}
    seconds = {label: 0.0 for label in found}
    for r in range(repeats):
        y_noisy, flipped = flip_labels(data.y_train, 0.1, np.random.default_rng(args.seed * 1000 + r))
        model = BinaryLogisticRegression(weight_decay=1e-4).fit(data.X_train, y_noisy)
        top = int(round(0.1 * model.n_train_))
        for label, est in ests + [("training loss", None)]:
            t0 = time.perf_counter()
            score = model.train_losses() if est is None else np.abs(self_scores(model, est))
            seconds[label] += time.perf_counter() - t0
            found[label].append(len(np.intersect1d(np.argsort(-score, kind="stable")[:top], flipped)) / len(flipped))
    return {label: {"found_at_10pct": float(np.mean(v)), "seconds": seconds[label] / repeats}
            for label, v in found.items()}


def cnn(args):
    """The Fig 2 CNN from its stored fit. LOO on the figure's stored re-fits, every estimator at
    the figure's test point (CG on H and on G: the figure's own solves, stored with it, scored
    here; their seconds are the figure's). LDS (unless --no-cnn-lds) over re-fits without a
    random half by the figure's protocol (Adam continued from the fitted state, which the
    figure's fit journal holds), journaled so that the hour of re-fits resumes; scored for the
    estimators that take minutes on 20 test points; CG (~25 min per test point on H and G together)
    only on the first --cnn-cg-lds-tests of them."""
    from pathlib import Path

    import scipy.stats

    from influence import linear_datamodeling_score
    from influence.datasets.mnist import load_mnist
    from influence.models.all_cnn import AllCNN

    folder = Path(args.outputs) / "fig2_cnn_loo"
    st = stored(folder)
    if st is None:
        return None
    arrays, metrics = st
    cfg, m = metrics["config"], metrics["metrics"]
    d = load_mnist(args.data_dir, flatten=False)
    sub = arrays["train_subset"]
    model = AllCNN(weight_decay=0.001, dtype=cfg.get("dtype", "float64"), train_batch_size=500, retrain="adam",
                   retrain_steps=cfg["retrain_steps"], retrain_learning_rate=cfg["retrain_learning_rate"],
                   seed=metrics.get("seed", 0))
    model.set_training_data(d.train.x[sub], d.train.y[sub])
    model.set_theta(arrays["theta"])
    t = cfg["test_idx"]
    x, y = d.test.x[t:t + 1], d.test.y[t:t + 1]
    damping = m.get("damping_used", cfg["damping"])
    removed, actual = arrays["removed_indices"], arrays["actual_loss_diffs"]
    LOO_SOURCE["cnn"] = (f"the {len(removed)} stored re-fits of {folder}"
                         + (" (a quick run: not comparable with the paper)" if metrics.get("quick") else ""))
    if args.cnn_tracin:
        model.checkpoints_, diff = replayed_checkpoints(cfg, metrics.get("seed", 0), d.train.x[sub], d.train.y[sub],
                                                        arrays["theta"], Path(args.out))
        LOO_SOURCE["cnn"] += (f"; TracIn over {len(model.checkpoints_)} checkpoints of the figure's fit run again "
                              f"(same configuration, data and seed; its end differs from the stored theta by at most "
                              f"{diff:.1e})")
    out = {}
    for label, key, secs in (("CG (the figure's solve)", "s_test", m.get("cg_seconds")),
                             ("CG, Gauss-Newton (the figure's solve)", "s_test_gauss_newton",
                              m.get("gauss_newton_cg_seconds"))):
        if key not in arrays:
            continue
        t0 = time.perf_counter()
        pred = model.influence_scores(arrays[key]) / model.n_train_
        secs = (float("nan") if secs is None else secs) + time.perf_counter() - t0
        out[label] = {"loo_pearson": float(scipy.stats.pearsonr(actual, pred[removed])[0]),
                      "loo_spearman": float(scipy.stats.spearmanr(actual, pred[removed])[0]), "seconds": secs}
    cheap = [(label, est) for label, est in estimators_for(model, args.quick, nonconvex=True, damping=damping)
             if not label.startswith("CG")]
    for label, (r, rho, secs) in loo_scores(model, cheap, x, y, removed, actual).items():
        out[label] = {"loo_pearson": r, "loo_spearman": rho, "seconds": secs}
    state = fitted_state(folder, arrays["theta"])
    if not args.cnn_lds:
        return out
    if state is None:
        LOO_SOURCE["cnn"] += ("; no LDS: the figure's fit journal (fit.jsonl and its npz, with the Adam state "
                              "that re-training continues) is not in the folder")
        return out
    model.adam_state_, model.final_learning_rate_ = state
    k = args.lds_tests or (5 if args.quick else 20)
    subsets = args.lds_subsets or (10 if args.quick else 50)
    Xk, yk = d.test.x[:k], d.test.y[:k]
    matrices = {}
    for label, est in cheap:
        matrices[label], secs = score(model, est, Xk, yk)
        out[label]["seconds"] = secs  # now: scoring every training point for the k LDS test points
    lds = linear_datamodeling_score(model, Xk, yk, matrices, n_subsets=subsets, seed=args.seed, n_jobs=args.jobs,
                                    journal=Path(args.out) / "cnn_lds_refits.jsonl")
    for label in matrices:
        out[label].update(lds=float(lds[label].score), lds_min=float(np.min(lds[label].per_test)))
    first = next(iter(lds.values()))
    LOO_SOURCE["cnn"] += (f"; LDS: {k} test points over {subsets} re-fits without a random half ({first.wall_time_s:.0f} s"
                          f", journaled in {Path(args.out) / 'cnn_lds_refits.jsonl'}), for every estimator but CG "
                          f"(about {m.get('cg_seconds', float('nan')):.0f} s per test point on this model); seconds "
                          f"of those rows: scoring all {model.n_train_} training points for the {k} test points")
    kcg = min(args.cnn_cg_lds_tests, k)
    if kcg > 0:  # the slow solvers join on the first kcg test points of the same re-fits (no re-fit runs)
        def on_first(pt):  # an estimator's LDS over the first kcg test points, as table columns
            return dict(lds_first=float(np.nanmean(pt)), lds_first_min=float(np.nanmin(pt)), lds_first_k=kcg)

        rows = {"CG": "CG (the figure's solve)", "CG, Gauss-Newton": "CG, Gauss-Newton (the figure's solve)"}
        for label, est in estimators_for(model, args.quick, nonconvex=True, damping=damping):
            if label in rows:
                M, secs = score(model, est, Xk[:kcg], yk[:kcg])
                pt = first.rescored(M, model.n_train_, tests=np.arange(kcg)).per_test
                out.setdefault(rows[label], {"seconds": float("nan")}).update(on_first(pt), lds_first_seconds=secs)
                logger.info("%s: LDS on the first %d test points %.3f (%.0fs)", label, kcg, np.nanmean(pt), secs)
        for label in matrices:
            out[label].update(on_first(lds[label].per_test[:kcg]))
        LOO_SOURCE["cnn"] += (f"; CG on H and on G (new solves at the figure's damping) scored on the first {kcg} "
                              f"LDS test points only, every estimator beside them on the same {kcg} "
                              f"(column 'LDS, first {kcg}'; CG's seconds there: its solves and scoring for them)")
    return out


def replayed_checkpoints(cfg, seed, X, y, theta, out, k=10):
    """TracIn's checkpoints for the figure's CNN, whose fit kept none: the fit run again with the
    figure's configuration, data and seed, recording ``(theta, learning rate)`` k times
    (journaled in ``<out>/cnn_tracin_checkpoints.jsonl``: once per stored fit). Returns the
    checkpoints and ``max |theta_end - theta_stored|`` (0 where the replay is bit for bit)."""
    from pathlib import Path

    from influence.models.all_cnn import AllCNN
    from influence.result_store import Journal
    from influence.utils import hash_arrays

    model = AllCNN(weight_decay=0.001, learning_rate=cfg["learning_rate"], adam_steps=cfg["adam_steps"],
                   train_batch_size=500, decay_fractions=tuple(cfg["decay_fractions"]), lbfgs_iter=cfg["lbfgs_iter"],
                   dtype=cfg.get("dtype", "float64"), seed=seed, checkpoints=k, progress=True)
    book = Journal(Path(out) / "cnn_tracin_checkpoints.jsonl",
                   {"what": "fig2 CNN fit replayed for TracIn", "model": model._cache_identity(),
                    "data": hash_arrays(np.asarray(X), np.asarray(y)), "theta": hash_arrays(theta)})
    saved = book.arrays("checkpoints") if "checkpoints" in book else None
    if saved is None:
        logger.info("TracIn: running the figure's fit again to record %d checkpoints", k)
        model.fit(X, y)
        saved = {"thetas": np.stack([th for th, _ in model.checkpoints_]),
                 "lrs": np.array([lr for _, lr in model.checkpoints_], dtype=float)}
        book.add("checkpoints", {"max_abs_theta_diff": float(np.max(np.abs(model.theta_ - theta)))}, arrays=saved)
    diff = book.get("checkpoints")["max_abs_theta_diff"]
    return [(th, float(lr)) for th, lr in zip(saved["thetas"], saved["lrs"])], diff


def fitted_state(folder, theta):
    """(Adam state, final learning rate) of the fit the figure recorded in its fit journal, if
    that fit's theta is the stored one bit for bit (else None)."""
    import json

    from pathlib import Path

    for npz in sorted(Path(folder).glob("fit-*-fit.npz")):
        try:
            with np.load(npz) as f:
                if not np.array_equal(f["theta"], theta):
                    continue
                adam = (f["m"], f["v"], int(f["t"]))
            key = npz.name.split("-")[1]
            for line in (Path(folder) / "fit.jsonl").read_text().splitlines():
                entry = json.loads(line)
                if entry["key"].startswith(key) and entry["name"] == "fit":
                    return adam, float(entry["record"]["final_learning_rate"])
        except (OSError, ValueError, KeyError):
            continue
    return None


if __name__ == "__main__":
    sys.exit(run(NAME, __doc__, main, add_arguments))
