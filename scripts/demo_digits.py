#!/usr/bin/env python
"""Demo on scikit-learn's bundled digits (no download): which training images drive a prediction.

Fits a 10-class logistic regression (weight decay 0.01) on 1,200 of the 8x8 digits, picks
the misclassified test image with the highest loss (or --test-idx), and computes the
influence of every training image with the exact, CG and LiSSA solvers. The 30 most
influential points are then removed one at a time and the model re-fitted, to show
predicted vs actual change in test loss. The figure shows the test image, the most
helpful and most harmful training images, and the LOO scatter.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from influence import LogisticRegression, leave_one_out  # noqa: E402
from influence.experiment import run  # noqa: E402

NAME = "demo_digits"
logger = logging.getLogger(NAME)


def add_arguments(parser):
    parser.add_argument("--test-idx", type=int, default=None, help="index into the held-out digits "
                        "(default: the misclassified one with the highest loss)")


def main(exp):
    import matplotlib.pyplot as plt
    import scipy.stats as st
    from sklearn.datasets import load_digits

    args = exp.args
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    perm = np.random.default_rng(args.seed).permutation(len(y))
    tr, te = perm[:1200], perm[1200:]
    model = LogisticRegression(n_classes=10, weight_decay=0.01, seed=args.seed).fit(X[tr], y[tr])
    acc = model.score(X[te], y[te])
    losses = model.losses(X[te], y[te])
    wrong = np.flatnonzero(model.predict(X[te]) != y[te])
    t = args.test_idx if args.test_idx is not None else int(wrong[np.argmax(losses[wrong])] if len(wrong)
                                                            else np.argmax(losses))
    xt, yt = X[te][t:t + 1], y[te][t:t + 1]

    results, preds = {}, {}
    for solver, opts in (("exact", {}), ("cg", {"tol": 1e-10}),
                         ("lissa", {"scale": "auto", "depth": 2000, "num_samples": 5, "batch_size": 10})):
        res = model.s_test(xt, yt, solver=solver, **opts)
        preds[solver] = model.influence_scores(res.x) / model.n_train_  # -I_up,loss / n
        results[solver] = res
    n_remove = 20 if args.quick else 30
    idx = np.argsort(-np.abs(preds["cg"]))[:n_remove]
    loo = leave_one_out(model, xt, yt, idx, preds["cg"][idx], n_jobs=1)

    metrics = {"test_accuracy": acc, "test_idx": t, "test_label": int(yt[0]),
               "predicted_label": int(model.predict(xt)[0]), "loo_pearson_cg": loo.pearson,
               "loo_spearman_cg": loo.spearman,
               "loo_pearson_lissa": float(st.pearsonr(loo.actual, preds["lissa"][idx])[0]),
               "max_abs_diff_cg_vs_exact": float(np.max(np.abs(preds["cg"] - preds["exact"]))),
               "pearson_lissa_vs_exact_all": float(np.corrcoef(preds["lissa"], preds["exact"])[0, 1])}
    for name, res in results.items():
        metrics[f"{name}_residual"] = res.residual
        metrics[f"{name}_time_s"] = res.time_s
    exp.save_arrays(train_indices=tr, test_indices=te, removed=idx, actual=loo.actual,
                    **{f"predicted_{k}": v for k, v in preds.items()})

    order = np.argsort(preds["exact"])  # most harmful (removal lowers the loss) first
    fig = plt.figure(figsize=(11, 4.5))
    gs = fig.add_gridspec(2, 7)
    ax = fig.add_subplot(gs[:, :2])
    lim = 1.1 * np.max(np.abs(np.concatenate([loo.actual, preds["cg"][idx]])))
    ax.plot([-lim, lim], [-lim, lim], "--", color="grey", lw=1)
    ax.scatter(loo.actual, preds["cg"][idx], s=12)
    ax.set(xlabel="Actual diff in test loss", ylabel="Predicted (-I_up,loss/n)",
           title=f"LOO, Pearson R = {loo.pearson:.3f}")
    a = fig.add_subplot(gs[0, 2])
    a.imshow(xt[0].reshape(8, 8), cmap="gray_r")
    a.set_title(f"test: {yt[0]} (pred {metrics['predicted_label']})", fontsize=8)
    a.axis("off")
    for row, (label, picks) in enumerate((("helpful", order[::-1][:4]), ("harmful", order[:4]))):
        for j, i in enumerate(picks):
            a = fig.add_subplot(gs[row, 3 + j])
            a.imshow(X[tr][i].reshape(8, 8), cmap="gray_r")
            a.set_title(f"{label} y={y[tr][i]}\n{preds['exact'][i]:+.1e}", fontsize=7)
            a.axis("off")
    fig.tight_layout()
    exp.save_figure(fig)
    exp.write_metrics(metrics, paper={}, targets={"loo_pearson_cg": ">= 0.95"},
                      config={"n_train": 1200, "weight_decay": 0.01, "n_removed": int(n_remove)},
                      notes="Not a paper figure: a demo that always runs (scikit-learn's bundled digits).")
    logger.info("digits demo: test accuracy %.3f, LOO Pearson %.4f", acc, loo.pearson)


if __name__ == "__main__":
    sys.exit(run(NAME, __doc__.split("\n")[1], main, add_arguments))
