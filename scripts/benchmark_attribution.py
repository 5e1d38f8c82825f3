#!/usr/bin/env python
"""dattri's MNIST attribution benchmark with Keras: every estimator's LDS beside dattri's published numbers.

The protocol (``influence/evaluation/attribution_benchmark.py`` has the details): MNIST, the
first 5,000 training and 500 test images, normalised; dattri's logistic regression (SGD,
20 epochs) and MLP 784-128-64-10 (dropout 0.1, SGD with momentum, 50 epochs); 50 models each
trained on a random half of the training set give each test point's loss; LDS = mean over
test points of the Spearman correlation across the subsets between the summed attribution
and that loss. Every method's damping is picked on a validation split (further test points,
further subset models) and reported on the held-out one; the number picked on the reported
LDS itself (dattri's protocol) is shown beside it. Ensembles average over ``--ensemble``
models trained on the full training set with their own seeds. All models are trained once
and journaled in ``--out`` (``models-<kind>.jsonl``): a killed run resumes.

--quick: the LR only, 1,000 training images, 50 test points, 10 subsets (6 for validation),
5 epochs, ensembles of 2.
"""
from __future__ import annotations

import logging

from influence.experiment import run

NAME = "benchmark_attribution"
logger = logging.getLogger(NAME)


def add_arguments(parser):
    parser.add_argument("--models", nargs="+", default=None, choices=["lr", "mlp"],
                        help="which of dattri's models (default both; --quick: lr)")
    parser.add_argument("--n-train", type=int, default=None, help="training images (default 5000; --quick 1000)")
    parser.add_argument("--n-test", type=int, default=None,
                        help="reported test points (default 500; --quick 50)")
    parser.add_argument("--mlp-score-tests", type=int, default=None,
                        help="score only the first N reported test points on the MLP (every model's loss is "
                             "still recorded on all; default: all)")
    parser.add_argument("--mlp-score-val", type=int, default=None,
                        help="score only the first N validation test points on the MLP (default: all)")
    parser.add_argument("--n-val", type=int, default=None, help="validation test points (default 100; --quick 30)")
    parser.add_argument("--n-subsets", type=int, default=None, help="reported subset models (default 50; --quick 10)")
    parser.add_argument("--n-val-subsets", type=int, default=None,
                        help="validation subset models (default 20; --quick 6)")
    parser.add_argument("--ensemble", type=int, default=None,
                        help="models trained on the full set, for ensembles (default 10; --quick 2)")
    parser.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs (--quick 5)")
    parser.add_argument("--methods", nargs="*", default=None, help="score only these methods (names as in the table)")
    parser.add_argument("--n-jobs", type=int, default=2, help="worker processes that train the models")
    parser.add_argument("--seed-noise", type=int, default=0,
                        help="train a second model on the first N reported subsets: the targets' own seed noise "
                             "(default 0: off)")


def main(exp):
    from influence.evaluation.attribution_benchmark import (PUBLISHED_SOURCE, markdown_table, run_kind,
                                                            table_rows)

    args, quick = exp.args, exp.args.quick
    kinds = args.models or (["lr"] if quick else ["lr", "mlp"])
    sizes = dict(n_train=args.n_train or (1000 if quick else 5000), n_val=args.n_val or (30 if quick else 100),
                 n_subsets=args.n_subsets or (10 if quick else 50),
                 n_val_subsets=args.n_val_subsets or (6 if quick else 20),
                 ensemble=args.ensemble or (2 if quick else 10), epochs=args.epochs or (5 if quick else None))
    n_test = args.n_test or (50 if quick else 500)
    rows, facts, arrays = [], {}, {}
    for kind in kinds:
        res = run_kind(kind, data_dir=args.data_dir, out_dir=exp.out, seed=args.seed, quick=quick,
                       n_test=n_test, only=args.methods, n_jobs=args.n_jobs,
                       score_tests=args.mlp_score_tests if kind == "mlp" else None,
                       score_val=args.mlp_score_val if kind == "mlp" else None, seed_noise=args.seed_noise,
                       **sizes)
        rows += table_rows(res)
        facts[kind] = {k: v for k, v in res.items() if k != "scored"}
        for s in res["scored"].values():
            arrays[f"{kind}/{s.name}/lds_per_test"] = s.rep_per_test[s.picked()]
    table = markdown_table(rows)
    for kind, f in facts.items():
        nz = f.get("seed_noise")
        if nz:
            table.append(f"\n{kind.upper()} seed noise: two models per subset (other seeds) on {nz['subsets']} subsets: "
                         f"their test losses correlate {nz['reliability']:.3f} ± {nz['ci95']:.3f} (Spearman over the "
                         f"subsets, mean over test points); an attribution's LDS can hardly exceed ~{nz['ceiling']:.2f}.")
    print("\n".join(table))
    print(f"published: {PUBLISHED_SOURCE}")
    with open(exp.output("TABLE.md"), "w") as f:
        f.write("\n".join(table) + f"\n\nPublished column: {PUBLISHED_SOURCE}.\n")
    exp.save_arrays(**arrays)
    if rows:
        figure(exp, rows)
    metrics = {f"{r['model']}/{r['method']}": {k: r[k] for k in ("lds", "ci95", "lds_val", "lds_best", "picked",
                                                                   "models", "seconds")} for r in rows}
    paper = {f"{r['model']}/{r['method']}": r["published"] for r in rows if r["published"] is not None}
    exp.write_metrics(metrics, paper=paper, config={**sizes, "n_test": n_test, "kinds": kinds, "facts": facts},
                      notes=f"'paper' holds dattri's published LDS ({PUBLISHED_SOURCE}); the Koh & Liang paper "
                            f"has no LDS. Damping picked on the validation split.")


def figure(exp, rows):
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = sorted({r["model"] for r in rows}, key=["lr", "mlp"].index)
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 0.32 * max(len(rows), 8) + 1.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rs = [r for r in rows if r["model"] == kind]
        ypos = np.arange(len(rs))
        ax.barh(ypos, [r["lds"] for r in rs], xerr=[r["ci95"] for r in rs], color="C0", label="this library")
        pub = [(i, r["published"]) for i, r in enumerate(rs) if r["published"] is not None]
        if pub:
            ax.scatter([p for _, p in pub], [i for i, _ in pub], color="C3", marker="D", zorder=3,
                       label="dattri published")
        ax.set_yticks(ypos, [f"{r['method']}" for r in rs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("LDS (validation-picked damping, 95% CI)")
        ax.set_title(f"MNIST {kind.upper()}")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    exp.save_figure(fig)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(run(NAME, __doc__, main, add_arguments))
