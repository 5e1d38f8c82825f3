#!/usr/bin/env python
"""Benchmark: time to score every MNIST training point on one test point.

Model: the Fig 2 logistic regression (10 classes, 55,000 training images, 7,840
parameters). For each inverse-HVP solver (exact Cholesky, CG, LiSSA with the paper's
settings) it times s_test, then the scoring of all training points,
-I_up,loss = s_test . g(z_i), and for the low-rank Arnoldi solver at a few ranks also
how its scores agree with CG's. Scoring runs as one forward-mode JVP per batch; it is
compared with the original code's approach, one gradient per training point in a Python
loop (timed on a subset and scaled to n), and with vectorised per-example gradients.
Then the influence on --matrix-tests test points, each separately: one s_test and one
scoring per test point vs influence_matrix's single multi-column CG solve. Then the
linear datamodeling score (LDS) of each solver's influence matrix on --lds-tests test
points, over --lds-subsets re-fits without a random half of the training set.
All numbers come from this one run; ratios are printed, not asserted. The stages are
:mod:`influence.evaluation.benchmarks`; this script writes BENCHMARK.md (the tables),
metrics.json, arrays.npz and a figure of the stage costs into --out. --quick: a small run
(no exact Hessian, 2 test points for the matrix, 3 LDS test points over 5 re-fits, no
per-model table).

A second table (``--models``) times the same stages for each experiment's model whose data
is present: training, s_test by each solver that applies (iterations, residual), scoring
all training points, and one leave-one-out re-training. The CNN row (``cnn``) trains the
Fig 2 CNN with a short schedule (minutes); the Inception row uses cached features.
"""

from __future__ import annotations

import argparse  # noqa: F401 -- the options below
import logging
import os
import sys

import numpy as np

from influence.experiment import index_in, run

NAME = "benchmark_influence"
logger = logging.getLogger(NAME)


def add_arguments(parser):
    parser.add_argument("--test-idx", type=index_in(10000, "the MNIST test set"), default=8,
                        help="MNIST test point whose influences are timed (default: 8, as Fig 2)")
    parser.add_argument("--loop-subset", type=int, default=1000, help="points timed in the loop baseline")
    parser.add_argument("--skip-exact", action="store_true", help="skip the explicit 7,840 x 7,840 Hessian")
    parser.add_argument("--matrix-tests", type=int, default=10,
                        help="test points for the influence-matrix timing (0: skip)")
    parser.add_argument("--arnoldi-ranks", type=int, nargs="*", default=[10, 50, 200],
                        help="ranks of the low-rank (Arnoldi) solver compared with CG (none: skip)")
    parser.add_argument("--block-tests", type=int, nargs="*", default=[1, 100],
                        help="test-point counts for influence_matrix by block CG vs column-by-column CG "
                             "(default: 1 100; none: skip)")
    parser.add_argument("--skip-column-cg", action="store_true",
                        help="with --block-tests: time block CG only (column-by-column CG takes minutes)")
    parser.add_argument("--skip-lissa-auto", action="store_true",
                        help="skip the LiSSA scale='auto' rows (its per-example curvature bound and a solve)")
    parser.add_argument("--kfac-tests", type=int, nargs="*", default=[1, 100],
                        help="test-point counts for K-FAC / EK-FAC scoring on the Fig 2 model (default: 1 100; "
                             "none: skip the K-FAC section)")
    parser.add_argument("--lr-loo", default="output/fig2_logreg_loo",
                        help="fig2_logreg_loo output whose stored re-fits K-FAC / EK-FAC are scored on "
                             "(default: output/fig2_logreg_loo; skipped if absent)")
    parser.add_argument("--cnn-loo", default="output/fig2_cnn_loo",
                        help="fig2_cnn_loo output whose stored model and re-fits K-FAC / EK-FAC are scored on "
                             "(default: output/fig2_cnn_loo; skipped if absent)")
    parser.add_argument("--cnn-cg-tests", type=int, default=2,
                        help="CNN test points solved by CG for the cost comparison (default: 2)")
    parser.add_argument("--lds-subsets", type=int, default=50,
                        help="re-fits without random halves for the LDS of each solver (0: skip)")
    parser.add_argument("--lds-tests", type=int, default=10, help="test points (the first ones) for the LDS")
    parser.add_argument("--models", nargs="*", default=["binary_lr", "smooth_hinge", "hospital", "spam", "inception"],
                        help="experiment models for the per-model table (add 'cnn' for the CNN; none: skip)")
    parser.add_argument("--cnn-kfac-only", action="store_true",
                        help="only the Fig 2 CNN's K-FAC / EK-FAC rows (cost of 100 test points against CG, LOO "
                             "Pearson on the stored re-fits of --cnn-loo), written to --out/BENCHMARK.md")


def quick_settings(args):
    """--quick: every section, small."""
    if args.quick:
        args.skip_exact, args.matrix_tests, args.loop_subset = True, min(args.matrix_tests, 2), min(args.loop_subset, 100)
        args.arnoldi_ranks, args.block_tests, args.kfac_tests = [10], [1, 4], [1]
        args.lds_subsets, args.lds_tests, args.models, args.skip_column_cg = min(args.lds_subsets, 5), 3, [], True


def header(args, what: str) -> str:
    from influence.experiment import software_versions

    return (f"{what}; one run of `scripts/benchmark_influence.py{' --quick' if args.quick else ''}` on this machine "
            f"({os.cpu_count()} CPUs; " + ", ".join(f"{k} {v}" for k, v in software_versions().items()) + ").")


def write(exp, lines, rows):
    """BENCHMARK.md, arrays (each row's seconds), metrics.json and the stage-cost figure."""
    import matplotlib.pyplot as plt

    from influence.utils import atomic_path

    with atomic_path(exp.output("BENCHMARK.md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    labels = [r[0].strip() for r in rows]
    seconds = np.array([r[1] for r in rows], dtype=float)
    exp.save_arrays(stage_seconds=seconds, stage_labels=np.array(labels))
    fig, ax = plt.subplots(figsize=(9, 0.28 * max(len(rows), 4) + 1))
    ax.barh(np.arange(len(rows)), np.maximum(seconds, 1e-4))
    ax.set_yticks(np.arange(len(rows)), [lbl[:70] for lbl in labels], fontsize=7)
    ax.invert_yaxis()
    ax.set(xscale="log" if len(rows) else "linear", xlabel="seconds",
           title="cost of each stage" + (" (quick)" if exp.args.quick else ""))
    fig.tight_layout()
    exp.save_figure(fig)
    metrics = {f"seconds.{lbl}": float(t) for lbl, t in zip(labels, seconds)}
    exp.write_metrics(metrics, paper={k: None for k in metrics},
                      notes="Timings of this machine; the paper reports none. Tables in BENCHMARK.md.")
    print("\n".join(lines))
    logger.info("wrote %s", exp.out / "BENCHMARK.md")


def main(exp):
    from influence import LogisticRegression
    from influence.datasets.mnist import load_mnist
    from influence.evaluation import benchmarks as bm

    args = exp.args
    quick_settings(args)
    if args.cnn_kfac_only:
        rows = bm.cnn_kfac_lines(args)
        if not rows:
            from influence.datasets.manifest import DataMissingError

            raise DataMissingError(f"no stored fig2_cnn_loo output (arrays.npz and metrics.json) under {args.cnn_loo}")
        lines = ["## Kronecker-factored curvature on the Fig 2 CNN", "", header(args, f"--cnn-loo {args.cnn_loo} "
                 f"--cnn-cg-tests {args.cnn_cg_tests}"), "", "| model | stage | seconds | notes |", "|---|---|---|---|",
                 *rows, ""]
        return write(exp, lines, [(f"{cells[1]}: {cells[2]}", float(cells[3].split(";")[0]), "") for cells in
                                  (line.split("|") for line in rows) if cells[3].strip().split(";")[0].strip()
                                  .replace(".", "", 1).isdigit()])
    data = load_mnist(args.data_dir)
    model = LogisticRegression(n_classes=10, weight_decay=0.01)
    _, t_fit = bm.timed(model.fit, data.train.x, data.train.y)
    n = model.n_train_
    xt, yt = data.test.x[args.test_idx:args.test_idx + 1], data.test.y[args.test_idx:args.test_idx + 1]
    rows, speed, s_ref = bm.logistic_rows(model, data, args, xt, yt)
    rows.insert(0, ("train (L-BFGS + Newton polish)", t_fit, ""))
    if not args.skip_lissa_auto:
        rows += bm.lissa_auto_rows(model, xt, yt, s_ref)
    cg_times = {}
    for k in args.block_tests:
        new_rows, cg_times[k] = bm.block_cg_rows(model, data.test.x[:k], data.test.y[:k], args.skip_column_cg)
        rows += new_rows
    kfac_lines = bm.kfac_section(model, data, args, cg_times) if args.kfac_tests else []
    lds_lines = bm.lds_table(model, data, args) if args.lds_subsets > 0 else []
    t_loop, t_vec, t_jvp = speed["t_loop"], speed["t_vec"], speed["t_jvp"]
    lines = ["# Benchmark: cost of each stage", "",
             header(args, f"MNIST 10-class logistic regression (Fig 2), n = {n}, p = {model.n_params}, test point "
                          f"{args.test_idx}"), "", "| stage | seconds | notes |", "|---|---|---|"]
    lines += [f"| {label.strip()} | {t:.3f} | {note} |" for label, t, note in rows]
    lines += ["", f"Forward-mode scoring vs the per-example loop: {t_loop / t_jvp:.0f}x; vs vectorised "
                  f"per-example gradients: {t_vec / t_jvp:.1f}x.", ""] + lds_lines + kfac_lines
    model_rows = bm.per_model_table(args)
    if model_rows:
        lines += ["## Cost of each stage per experiment model", "",
                  "| model | n | p | stage | seconds | notes |", "|---|---|---|---|---|---|"]
        lines += [f"| {m} | {n_} | {p_} | {st} | {t:.3f} | {note} |" for m, n_, p_, st, t, note in model_rows]
        lines.append("")
    write(exp, lines, rows + [(f"{m}: {st}", t, note) for m, _, _, st, t, note in model_rows])


if __name__ == "__main__":
    sys.exit(run(NAME, __doc__, main, add_arguments))
