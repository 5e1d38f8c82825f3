#!/usr/bin/env python
"""Fig 1: both the training loss and H^-1 are needed to find the influential points.

Binary logistic regression (weight decay 0.01, no bias) on MNIST 1s vs 7s. For one test
point (default: index 30 of the 1-vs-7 test set) the influence I_up,loss of every
training point is compared with three ablations (see influence.applications.components): without the
training-loss term, without H (identity instead of H^-1), and without both. Panels:
each ablation against the full influence (training points with the test point's label in
green, the other label in red), the test image, and the most harmful training image of
the same label. --quick uses a 3,000-point training subset.
"""
from __future__ import annotations

import logging
import sys

import numpy as np

from influence.datasets.mnist import load_binary_mnist
from influence.experiment import index_in, run

NAME = "fig1_components"
logger = logging.getLogger(NAME)
VARIANTS = {"no_train_loss": "without train loss", "no_hessian": "without H", "neither": "without both"}


def add_arguments(parser):
    parser.add_argument("--test-idx", type=index_in(2163, "the 1-vs-7 test set"), default=30, help="index into the 1-vs-7 test set (paper: 30)")
    parser.add_argument("--weight-decay", type=float, default=0.01,
                        help="L2 weight decay wd (default: 0.01, the paper's)")


def main(exp):
    from influence import BinaryLogisticRegression
    from influence.applications.components import influence_components, top_k_overlap
    import matplotlib.pyplot as plt

    args = exp.args
    data = load_binary_mnist(args.data_dir)
    Xtr, ytr = data.train.x, data.train.y
    if args.quick:
        sub = np.sort(np.random.default_rng(args.seed).choice(len(ytr), 3000, replace=False))
        Xtr, ytr = Xtr[sub], ytr[sub]
    xt, yt = data.test.x[args.test_idx:args.test_idx + 1], data.test.y[args.test_idx:args.test_idx + 1]
    model = BinaryLogisticRegression(weight_decay=args.weight_decay, seed=args.seed).fit(Xtr, ytr)
    acc = model.score(data.test.x, data.test.y)
    comps = influence_components(model, xt, yt, solver="exact")
    n = model.n_train_
    full = comps["full"]
    metrics = {"test_accuracy": acc, "test_label_digit": 1 if yt[0] == 1 else 7, "n_train": n}
    for key in VARIANTS:
        metrics[f"pearson_{key}"] = float(np.corrcoef(comps[key], full)[0, 1])
        metrics[f"top100_overlap_{key}"] = top_k_overlap(comps[key], full, 100)
    same = ytr == yt[0]
    harmful = int(np.flatnonzero(same)[np.argmax(full[same])])  # largest I_up,loss among same-label points
    metrics["most_harmful_same_label_index"] = harmful
    exp.save_arrays(**comps, train_labels=ytr, test_idx=args.test_idx)

    fig, axes = plt.subplot_mosaic([["a", "b", "c"], ["d", "e", "."]], figsize=(13, 7.5),
                                   gridspec_kw={"height_ratios": (1.5, 1)})
    axes = [axes[k] for k in "abcde"]
    for ax, (key, title) in zip(axes, VARIANTS.items()):
        ax.scatter(full[~same], comps[key][~same], s=4, c="tab:red", alpha=0.5, label="other label")
        ax.scatter(full[same], comps[key][same], s=4, c="tab:green", alpha=0.5, label="same label")
        ax.set(xlabel="I_up,loss (full)", ylabel=f"I_up,loss {title}",
               title=f"{title}\nR = {metrics[f'pearson_{key}']:.3f}, top-100 overlap "
                     f"{metrics[f'top100_overlap_{key}']:.2f}")
        ax.title.set_fontsize(10)
    axes[0].legend(markerscale=3, fontsize=9)
    for ax, img, title in ((axes[3], xt[0], f"test image (label {metrics['test_label_digit']})"),
                           (axes[4], Xtr[harmful], f"most harmful same-label\ntraining image #{harmful}")):
        ax.imshow(img.reshape(28, 28), cmap="gray_r")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    exp.save_figure(fig)
    exp.write_metrics(metrics, paper={k: None for k in metrics if k.startswith(("pearson_", "top100_"))},
                      config={"test_idx": args.test_idx, "weight_decay": args.weight_decay,
                              "labels": "digit 1 -> 1, digit 7 -> 0", "gradients": "loss only (no regulariser)"},
                      notes="The paper's Fig 1 is qualitative (scatter plots); it reports no numbers.")


if __name__ == "__main__":
    sys.exit(run(NAME, __doc__, main, add_arguments))
