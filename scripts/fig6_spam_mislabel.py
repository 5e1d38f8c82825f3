#!/usr/bin/env python
"""Fig 6: fixing mislabeled training data (Enron1 spam), influence vs training loss vs random.

Binary logistic regression (weight decay 1e-4, no bias) on Enron1 bag-of-words features.
In each repeat, 10% of the training labels are flipped (seeded); the training points are
ranked for checking by |self-influence| (closed form), by training loss, and at random;
for each fraction of the training set checked (0 to 30% in steps of 2.5%), the flipped
labels among the checked points are fixed, the model re-fitted, and the fraction of
flips fixed and the test accuracy recorded. 40 repeats (the paper's count) run in
parallel processes; the figure shows means with standard errors.

Splits: the paper used one 80/20 split and 40 flip seeds; its split cannot be rebuilt (it
came from the original code's shuffle). The clean model's test accuracy alone moves by
about a point between random splits (1,035 test emails), and so does the gap that is
left at 30% checked, so by default the 40 repeats are spread over 8 splits (seeds
--seed .. --seed+7, 5 repeats each) and every repeat is compared with the clean model of
its own split; metrics.json also lists each split. --splits 1 is the paper's protocol.
--quick: 2 repeats (on 2 splits) and the fractions 0, 10, 20, 30%.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from influence.datasets.spam import load_spam
from influence.experiment import run

NAME = "fig6_spam_mislabel"
logger = logging.getLogger(NAME)
LABELS = {"influence": "Influence", "loss": "Loss", "random": "Random"}


def add_arguments(parser):
    parser.add_argument("--repeats", type=int, default=None, help="default 40 (--quick: 2)")
    parser.add_argument("--flip-fraction", type=float, default=0.1,
                        help="fraction of training labels flipped (default: 0.1, the paper's)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay wd (default: 1e-4)")
    parser.add_argument("--splits", type=int, default=8,
                        help="train/test splits the repeats are spread over (default 8; 1 = the paper's single "
                             "split, drawn with --seed)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel processes for the repeats (default: all CPUs)")


def main(exp):
    from influence.models.logistic import fit_binary_logistic
    from influence.applications.mislabel import STRATEGIES, binary_accuracy, run_repeat_jobs
    import matplotlib.pyplot as plt
    import scipy.sparse

    args = exp.args
    repeats = args.repeats or (2 if args.quick else 40)
    n_splits = max(1, min(args.splits, repeats))
    fractions = np.array([0.0, 0.1, 0.2, 0.3]) if args.quick else np.round(np.arange(0, 0.301, 0.025), 4)
    cache = Path(args.out).parent / "cache"
    splits = []  # (split seed, sparse train, y_train, sparse test, y_test, clean test accuracy)
    for k in range(n_splits):
        data = load_spam(args.data_dir, seed=args.seed + k, cache_dir=cache)
        Xs, Xt = scipy.sparse.csr_matrix(data.X_train), scipy.sparse.csr_matrix(data.X_test)
        theta = fit_binary_logistic(Xs, data.y_train, args.weight_decay)
        clean = binary_accuracy(Xt, data.y_test, theta)
        splits.append((args.seed + k, Xs, data.y_train, Xt, data.y_test, clean))
        logger.info("split %d (seed %d): %d train, %d test, %d features (%s); clean test accuracy %.4f", k,
                    args.seed + k, len(data.y_train), len(data.y_test), Xs.shape[1], data.info["tokenizer"], clean)
        tokenizer = data.info["tokenizer"]
        del data
    seeds = [args.seed * 1000 + r for r in range(repeats)]
    split_of = np.arange(repeats) % n_splits  # repeat r runs on split r mod n_splits
    jobs = [(splits[k][1], splits[k][2], splits[k][3], splits[k][4], seed) for seed, k in zip(seeds, split_of)]
    results = run_repeat_jobs(jobs, args.flip_fraction, fractions, args.weight_decay,
                              n_jobs=args.jobs or (1 if args.quick else None))  # quick: no worker start-up
    clean_per_repeat = np.array([splits[k][5] for k in split_of])
    clean_acc = float(clean_per_repeat.mean())
    fixed = np.stack([r["fraction_fixed"] for r in results])  # (repeats, strategies, fractions)
    acc = np.stack([r["test_accuracy"] for r in results])
    se = lambda a: a.std(axis=0, ddof=1) / np.sqrt(len(a)) if len(a) > 1 else np.zeros(a.shape[1:])  # noqa: E731
    fixed_mean, acc_mean = fixed.mean(axis=0), acc.mean(axis=0)
    i_inf = STRATEGIES.index("influence")
    gap = clean_per_repeat - acc[:, i_inf, -1]  # paired: each repeat against the clean model of its split
    by_split = [{"split_seed": int(splits[k][0]), "clean_test_accuracy": splits[k][5],
                 "n_repeats": int(np.sum(split_of == k)),
                 "test_acc_influence_at_last_fraction": float(acc[split_of == k, i_inf, -1].mean()),
                 "gap": float(gap[split_of == k].mean())} for k in range(n_splits)]

    metrics = {"clean_test_accuracy": clean_acc, "repeats": repeats, "splits": n_splits,
               "n_train": int(splits[0][1].shape[0]), "n_features": [int(sp[1].shape[1]) for sp in splits],
               "noisy_test_accuracy": float(np.mean([r["test_accuracy_noisy"] for r in results]))}
    for s, name in enumerate(STRATEGIES):
        for frac in (0.1, 0.3):
            f = int(np.argmin(np.abs(fractions - frac)))
            metrics[f"fixed_{name}_at_{int(frac * 100)}pct"] = float(fixed_mean[s, f])
            metrics[f"test_acc_{name}_at_{int(frac * 100)}pct"] = float(acc_mean[s, f])
    band = (fractions >= 0.05 - 1e-9) & (fractions <= 0.3 + 1e-9)
    i_loss, i_rand = STRATEGIES.index("loss"), STRATEGIES.index("random")
    metrics["influence_ge_loss_at_every_fraction"] = bool(np.all(fixed_mean[i_inf, band] >= fixed_mean[i_loss, band]))
    metrics["min_margin_loss_over_random"] = float(np.min(fixed_mean[i_loss, band] - fixed_mean[i_rand, band]))
    metrics["test_acc_gap_clean_minus_influence_at_30pct"] = float(gap.mean())
    # standard error over the independent units: the splits' mean gaps (repeats on one split are correlated)
    units = np.array([b["gap"] for b in by_split]) if n_splits > 1 else gap
    metrics["test_acc_gap_standard_error"] = float(units.std(ddof=1) / np.sqrt(len(units))) if len(units) > 1 else 0.0
    metrics["by_split"] = by_split
    exp.save_arrays(fractions=fractions, strategies=np.array(STRATEGIES), fraction_fixed=fixed, test_accuracy=acc,
                    seeds=np.array(seeds), split_seeds=np.array([splits[k][0] for k in split_of]),
                    clean_test_accuracy=clean_per_repeat)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for s, name in enumerate(STRATEGIES):
        axes[0].errorbar(fractions * 100, acc_mean[s], yerr=se(acc[:, s]), label=LABELS[name], marker="o", ms=3,
                         capsize=2)
        axes[1].errorbar(fractions * 100, fixed_mean[s], yerr=se(fixed[:, s]), label=LABELS[name], marker="o",
                         ms=3, capsize=2)
    axes[0].axhline(clean_acc, color="grey", ls="--", lw=1,
                    label="clean data" + (f" (mean of {n_splits} splits)" if n_splits > 1 else ""))
    axes[0].set(xlabel="Percentage of training data checked", ylabel="Test accuracy")
    axes[1].set(xlabel="Percentage of training data checked", ylabel="Fraction of flips fixed")
    handles, labels = axes[0].get_legend_handles_labels()  # one legend for both panels, below them
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(f"Enron1 spam, {int(args.flip_fraction * 100)}% labels flipped, {repeats} repeats over "
                 f"{n_splits} train/test split{'s' if n_splits > 1 else ''} (mean +- s.e.)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    exp.save_figure(fig)
    exp.write_metrics(
        metrics,
        paper={k: None for k in metrics if k.startswith(("fixed_", "test_acc_"))},
        targets={} if args.quick else {"influence_ge_loss_at_every_fraction": "== 1",
                                       "min_margin_loss_over_random": "> 0.05",
                                       "test_acc_gap_clean_minus_influence_at_30pct": "<= 0.01"},
        config={"flip_fraction": args.flip_fraction, "weight_decay": args.weight_decay,
                "fractions": fractions.tolist(), "tokenizer": tokenizer,
                "split_seeds": [int(sp[0]) for sp in splits]},
        notes="The paper's Fig 6 is curves without tabulated values; paper values are therefore null. "
              "Ranking by |self-influence| uses the closed form -(p_i - y_i)^2 x_i^T H^-1 x_i. "
              "The gap to the clean model is paired: each repeat against the clean model of its own split.")


if __name__ == "__main__":
    sys.exit(run(NAME, __doc__, main, add_arguments))
