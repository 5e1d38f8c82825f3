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
  hour for 50, journaled; CG on H and on G there Gauss-Newton preconditioned);
- its wall time to score every training point for those test points.

For the Fig 6 spam model the criterion is the paper's use: 10% of the training labels are
flipped (seeded, 5 repeats; --quick 2) and the training points are checked in the order of
each estimator's |self-score| (exact self-influence, TracIn / gradient dot: the squared
gradient norm, TRAK's phi_i^T (Phi^T Phi)^-1 phi_i (1 - p_i), training loss, random); the
table gives the fraction of the flipped labels found in the first 10% checked.

The scoring, the estimators and the tables are :mod:`influence.evaluation.leaderboard`.
Writes ESTIMATORS.md (the tables, with dattri's MNIST logistic-regression figures quoted
beside ours), metrics.json, arrays.npz and a figure of LDS against cost.
--quick: 5 test points, 10 subsets, LiSSA depth 1,000, no exact Hessian for the 7,840-parameter model.
"""
from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from influence.experiment import run

NAME = "benchmark_estimators"
logger = logging.getLogger(NAME)


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


def sizes(args):
    return (args.lds_tests or (5 if args.quick else 20)), (args.lds_subsets or (10 if args.quick else 50))


def main(exp):
    from influence.datasets.manifest import DataError
    from influence.evaluation import leaderboard as lb
    from influence.utils import atomic_path

    args = exp.args
    boards, notes = {}, []
    for name in args.models:
        if name not in BUILDERS:
            raise ValueError(f"unknown model {name!r}; choose from {sorted(BUILDERS)}")
        try:
            board = BUILDERS[name](args)
        except DataError as exc:
            notes.append(f"{name}: data missing ({exc})")
            logger.warning("%s skipped: %s", name, exc)
            continue
        if board is None:
            notes.append(f"{name}: no stored fig2_cnn_loo output under {args.outputs}; skipped")
        else:
            boards[name] = board
    if not boards:
        raise DataError("; ".join(notes) or "no model ran")
    lines, metrics = lb.markdown(boards, notes)
    with atomic_path(exp.output("ESTIMATORS.md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    exp.save_figure(lb.plot(boards, args.quick))
    exp.save_arrays(**{f"{n}__{k}": np.array([r.get(k, np.nan) for r in b.rows.values()])
                       for n, b in boards.items() for k in ("seconds", "lds", "loo_pearson", "found_at_10pct")},
                    **{f"{n}__labels": np.array(list(b.rows)) for n, b in boards.items()})
    targets = {}
    if "fig2_lr" in boards and not args.quick:
        if "exact" in boards["fig2_lr"].rows:
            targets["fig2_lr.exact.lds"] = ">= 0.95"
        targets["fig2_lr.CG.lds"] = ">= 0.95"
    k, subsets = sizes(args)
    exp.write_metrics(metrics, paper={key: None for key in metrics}, targets=targets,
                      config={"models": list(boards), "lds_tests": k, "lds_subsets": subsets},
                      notes=" ".join(notes) + " The paper reports none of these; dattri's figures are quoted in "
                                              "ESTIMATORS.md with their different protocol.")


def convex(model, X_test, y_test, args, loo=None, point=None, **kw):
    from influence.evaluation.leaderboard import convex_board

    k, subsets = sizes(args)
    return convex_board(model, X_test, y_test, quick=args.quick, lds_tests=k, lds_subsets=subsets, seed=args.seed,
                        n_jobs=args.jobs, loo=loo, loo_point=point, **kw)


def own_loo(model, point, args, where):
    """(removed, actual) of re-fits made here once (no stored figure output), and the LOO line."""
    from influence.evaluation.leaderboard import Board, own_loo as refit

    k = args.loo_removals if args.loo_removals is not None else (10 if args.quick else 40)
    if k <= 0:
        return None, Board()
    idx, actual, secs = refit(model, *point, k, n_jobs=args.jobs)
    return (idx, actual), Board(source=f"{k} re-fits made here ({where}; the largest |CG influence|), no stored "
                                       f"figure output; {secs:.0f} s")


def fig2_lr(args):
    from influence import LogisticRegression
    from influence.datasets.mnist import load_mnist
    from influence.evaluation.leaderboard import Board
    from influence.evaluation.stored_runs import read_run

    data = load_mnist(args.data_dir)
    model = LogisticRegression(n_classes=10, weight_decay=0.01, seed=args.seed).fit(data.train.x, data.train.y)
    st = read_run(f"{args.outputs}/fig2_logreg_loo")
    if st is not None:
        arrays, metrics = st
        model.set_theta(arrays["theta"])
        t = metrics["config"]["test_idx"]
        board = Board(source=f"the {len(arrays['removed_indices'])} stored re-fits of {args.outputs}/fig2_logreg_loo")
        loo, point = (arrays["removed_indices"], arrays["actual_loss_diffs"]), (data.test.x[t:t + 1],
                                                                                 data.test.y[t:t + 1])
    else:
        point = (data.test.x[8:9], data.test.y[8:9])  # the figure's test point
        loo, board = own_loo(model, point, args, "test point 8, Fig 2's")
    return convex(model, data.test.x, data.test.y, args, loo, point, lissa_scale=25, board=board)


def fig3_svm(args):
    """The smooth-hinge SVM (t = 0.001) fitted at its own optimum for the LDS; LOO as Fig 3 does it:
    at the hinge SVM's stored weights, against the hinge SVM's stored re-fits."""
    from influence.datasets.mnist import load_binary_mnist
    from influence.evaluation.leaderboard import Board, estimators_for, loo_scores
    from influence.evaluation.stored_runs import read_run
    from influence.models.smooth_hinge import SmoothHingeSVM

    data = load_binary_mnist(args.data_dir, signed=True)
    model = SmoothHingeSVM(temp=0.001, weight_decay=0.01, seed=args.seed).fit(data.train.x, data.train.y)
    st = read_run(f"{args.outputs}/fig3_smooth_hinge")
    if st is None or st[1].get("quick"):  # no usable stored re-fits (a quick run re-fits a subset): made here once
        point = (data.test.x[1597:1598], data.test.y[1597:1598])  # the figure's test point
        loo, board = own_loo(model, point, args, "test point 1597, Fig 3's")
        return convex(model, data.test.x, data.test.y, args, loo, point, board=board)
    arrays, metrics = st
    board = convex(model, data.test.x, data.test.y, args, board=Board(
        source=f"the {len(arrays['removed_indices'])} stored re-fits of {args.outputs}/fig3_smooth_hinge, at the "
               f"hinge SVM's weights"))
    at_svm = SmoothHingeSVM(temp=0.001, weight_decay=0.01)
    at_svm.set_training_data(data.train.x, data.train.y).set_theta(arrays["theta_svm"])
    t = metrics["config"]["test_idx"]
    for label, (r, rho, _) in loo_scores(at_svm, estimators_for(at_svm, args.quick), data.test.x[t:t + 1],
                                         data.test.y[t:t + 1], arrays["removed_indices"],
                                         arrays["actual_loss_diffs"]).items():
        board.rows.setdefault(label, {"seconds": float("nan")}).update(loo_pearson=r, loo_spearman=rho)
    return board


def inception_head(args):
    """The Fig 4 / Fig 5 top model: logistic regression (wd 0.001) on the 2048-d Inception
    features of the dog-fish images (features read from the figures' cache when there)."""
    from pathlib import Path

    from inception import BinaryInceptionModel, prepare_dogfish

    prep = prepare_dogfish(args.data_dir, Path(args.outputs) / "cache", n_train=60 if args.quick else 900,
                           n_test=30 if args.quick else 300, seed=args.seed, progress=False)
    model = BinaryInceptionModel(weight_decay=0.001, seed=args.seed).fit(prep.F_train, prep.data.y_train)
    y = prep.data.y_test  # interleave the classes so that the first LDS test points are not all dogs
    dogs, fish = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    m = min(len(dogs), len(fish))
    order = np.concatenate([np.stack([dogs[:m], fish[:m]], axis=1).reshape(-1), dogs[m:], fish[m:]])
    X_test, y_test = prep.F_test[order], y[order]
    point = (X_test[:1], y_test[:1])  # Fig 4 makes no re-fits: LOO at the first LDS test point, made here once
    loo, board = own_loo(model, point, args, "the first LDS test point")
    return convex(model, X_test, y_test, args, loo, point, board=board)


def spam(args):
    from pathlib import Path

    from influence.datasets.spam import load_spam
    from influence.evaluation.leaderboard import spam_board

    data = load_spam(args.data_dir, seed=args.seed, cache_dir=Path(args.out).parent / "cache")
    return spam_board(data, quick=args.quick, seed=args.seed)


def cnn(args):
    from pathlib import Path

    from influence.evaluation.leaderboard import cnn_board
    from influence.evaluation.stored_runs import stored_cnn

    stored = stored_cnn(Path(args.outputs) / "fig2_cnn_loo", args.data_dir, with_refit_settings=True)
    if stored is None:
        return None
    k, subsets = sizes(args)
    return cnn_board(stored, quick=args.quick, out_dir=args.out, lds_tests=k, lds_subsets=subsets, seed=args.seed,
                     n_jobs=args.jobs, tracin=args.cnn_tracin, lds=args.cnn_lds)


BUILDERS = {"fig2_lr": fig2_lr, "fig3_svm": fig3_svm, "inception": inception_head, "spam": spam, "cnn": cnn}


if __name__ == "__main__":
    sys.exit(run(NAME, __doc__, main, add_arguments))
