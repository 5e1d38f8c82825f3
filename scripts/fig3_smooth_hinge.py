#!/usr/bin/env python
"""Fig 3: influence on a non-differentiable loss, smoothed (linear SVM, MNIST 1 vs 7).

A linear SVM with the plain hinge (t = 0, weight decay 0.01, no bias) is trained with
LinearSVC. For one test point (default: index 1597 of the 1-vs-7 test set), the
influence of every training point is computed with the SmoothHinge loss at temperature
t in {0, 0.001, 0.1}, *evaluated at the SVM's weights* (not re-fitted, as the original
code did): gradients and Hessian are those of the smoothed objective at theta_svm. The
100 training points of largest |influence| under t = 0.001 are removed one at a time and
the t = 0 SVM is re-trained with LinearSVC (objective normalised over n - 1); the actual
change in the SVM's (hinge) test loss is compared with each t's prediction.

Panels: (a) SmoothHinge(s, t) for t in {0, 0.001, 0.01, 0.1}; (b-d) actual vs predicted
for t = 0, 0.001, 0.1. --quick: 30 removals and a 3,000-point training subset.
"""
from __future__ import annotations

import logging
import sys

import numpy as np

from influence.datasets.mnist import load_binary_mnist
from influence.experiment import index_in, run

NAME = "fig3_smooth_hinge"
logger = logging.getLogger(NAME)
TEMPS = (0.0, 0.001, 0.1)


def add_arguments(parser):
    parser.add_argument("--test-idx", type=index_in(2163, "the 1-vs-7 test set"), default=1597, help="index into the 1-vs-7 test set (paper: 1597)")
    parser.add_argument("--num-remove", type=int, default=None, help="default 100 (--quick: 30)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="L2 weight decay wd (default: 0.01)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel re-training processes (default: all CPUs)")


def main(exp):
    from influence import leave_one_out
    from influence.models.smooth_hinge import SmoothHingeSVM, smooth_hinge
    import matplotlib.pyplot as plt
    import scipy.stats as st

    args = exp.args
    data = load_binary_mnist(args.data_dir, signed=True)
    Xtr, ytr = data.train.x, data.train.y
    if args.quick:
        sub = np.random.default_rng(args.seed).choice(len(ytr), 3000, replace=False)
        Xtr, ytr = Xtr[np.sort(sub)], ytr[np.sort(sub)]
    num_remove = args.num_remove or (30 if args.quick else 100)
    xt, yt = data.test.x[args.test_idx:args.test_idx + 1], data.test.y[args.test_idx:args.test_idx + 1]

    svm = SmoothHingeSVM(temp=0.0, weight_decay=args.weight_decay, seed=args.seed).fit(Xtr, ytr)
    acc = svm.score(data.test.x, data.test.y)
    margin = float(yt[0] * svm.decision_function(xt)[0])
    logger.info("SVM test accuracy %.4f; test point %d margin %.3f", acc, args.test_idx, margin)

    preds = {}
    for t in TEMPS:
        smooth = SmoothHingeSVM(temp=t, weight_decay=args.weight_decay)
        smooth.set_training_data(Xtr, ytr).set_theta(svm.theta_)  # evaluated at the SVM's weights
        res = smooth.s_test(xt, yt, solver="cg", tol=1e-10)
        preds[t] = smooth.gradient_dots(res.x) / smooth.n_train_  # -I_up,loss / n
        logger.info("t=%g: CG %d iterations, residual %.1e", t, res.iterations, res.residual)

    idx = np.argsort(-np.abs(preds[0.001]))[:num_remove]
    loo = leave_one_out(svm, xt, yt, idx, n_jobs=args.jobs)
    actual = loo.actual
    metrics = {}
    for t in TEMPS:
        p = preds[t][idx]
        metrics[f"pearson_t{t:g}"] = float(st.pearsonr(actual, p)[0]) if np.std(p) > 0 else float("nan")
        metrics[f"spearman_t{t:g}"] = float(st.spearmanr(actual, p)[0]) if np.std(p) > 0 else float("nan")
    metrics.update(svm_test_accuracy=acc, test_margin=margin, num_removed=int(num_remove), n_train=len(ytr),
                   num_nonzero_actual=int(np.sum(np.abs(actual) > 1e-9)))
    exp.save_arrays(removed_indices=idx, actual_loss_diffs=actual, theta_svm=svm.theta_,
                    **{f"predicted_t{t:g}": preds[t] for t in TEMPS})

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    s = np.linspace(0.8, 1.2, 401)
    for t, style in ((0.001, "-"), (0.01, "-"), (0.1, "-"), (0, "k:")):
        axes[0].plot(s, smooth_hinge(s, t), style, label=f"t = {t:g}")
    axes[0].set(xlabel="s", ylabel="SmoothHinge(s, t)", title="(a) smooth hinge")
    axes[0].legend()
    for ax, t, letter in zip(axes[1:], TEMPS, "bcd"):
        p = preds[t][idx]
        lim = 1.1 * max(np.abs(actual).max(), np.abs(p).max(), 1e-12)
        ax.plot([-lim, lim], [-lim, lim], "--", color="grey", lw=1)
        ax.scatter(actual, p, s=10, alpha=0.7)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="Actual diff in loss", ylabel="Predicted diff in loss",
               title=f"({letter}) t = {t:g}, R = {metrics[f'pearson_t{t:g}']:.3f}")
    fig.tight_layout()
    exp.save_figure(fig)
    exp.write_metrics(
        metrics,
        paper={"pearson_t0": 0.632, "pearson_t0.001": 0.95, "pearson_t0.1": 0.91},
        targets={} if args.quick else {"pearson_t0.001": ">= 0.90", "pearson_t0.1": ">= 0.85"},
        config={"test_idx": args.test_idx, "weight_decay": args.weight_decay, "temps": TEMPS,
                "removal_ranking": "|influence| at t = 0.001", "quick_subset": bool(args.quick)},
        notes="Paper values: 0.95 (t=0.001) and 0.91 (t=0.1) from the paper; 0.632 for the plain hinge is the "
              "original notebook's output (the paper states no R for t=0). Influence for every t is evaluated at "
              "the t=0 SVM's weights; actual changes come from LinearSVC re-training (t=0).")


if __name__ == "__main__":
    sys.exit(run(NAME, __doc__, main, add_arguments))
