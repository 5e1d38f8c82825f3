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
All numbers come from this one run; ratios are printed, not asserted.

A second table (``--models``) times the same stages for each experiment's model whose data
is present: training, s_test by each solver that applies (iterations, residual), scoring
all training points, and one leave-one-out re-training. The CNN row (``cnn``) trains the
Fig 2 CNN with a short schedule (minutes); the Inception row uses cached features.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from influence.datasets.mnist import load_mnist


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="scripts/benchmark_influence.py", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None,
                        help="folder holding the datasets (default: $INFLUENCE_DATA_DIR or ./data)")
    parser.add_argument("--test-idx", type=int, default=8,
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
    parser.add_argument("--out", default="output/BENCHMARK.md", help="where the timing table is written (default: output/BENCHMARK.md)")
    parser.add_argument("--models", nargs="*", default=["binary_lr", "smooth_hinge", "hospital", "spam", "inception"],
                        help="experiment models for the per-model table (add 'cnn' for the CNN; none: skip)")
    parser.add_argument("--cnn-kfac-only", action="store_true",
                        help="only the Fig 2 CNN's K-FAC / EK-FAC rows (cost of 100 test points against CG, LOO "
                             "Pearson on the stored re-fits of --cnn-loo), written to --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.cnn_kfac_only:
        return write_cnn_kfac_only(args)
    import tensorflow as tf

    from influence import LogisticRegression

    data = load_mnist(args.data_dir)
    model = LogisticRegression(n_classes=10, weight_decay=0.01)
    _, t_fit = timed(model.fit, data.train.x, data.train.y)
    n = model.n_train_
    xt, yt = data.test.x[args.test_idx:args.test_idx + 1], data.test.y[args.test_idx:args.test_idx + 1]
    rows = [("train (L-BFGS + Newton polish)", t_fit, "")]

    solvers = [("cg", {"tol": 1e-10}),
               ("lissa", {"scale": 25, "depth": 5000, "num_samples": 10, "batch_size": 1, "seed": 17})]
    if not args.skip_exact:
        solvers.insert(0, ("exact", {}))
    s_ref = None
    score_times = []
    for name, opts in solvers:
        res, t_s = timed(model.s_test, xt, yt, solver=name, **opts)
        model.influence_scores(res.x)  # warm-up (tracing)
        scores, t_score = timed(model.influence_scores, res.x)
        score_times.append(t_score)
        if name == "cg":
            s_ref, scores_ref = res.x, scores
        rows.append((f"s_test by {name}", t_s, f"iterations {res.iterations}, residual {res.residual:.1e}"))
        rows.append((f"  score all {n} points after {name} (forward-mode JVP)", t_score, ""))

    # baseline: one gradient per training point in a Python loop, as the original code did
    theta = tf.constant(model.theta_)
    s_tf = tf.constant(s_ref)

    @tf.function
    def one_gradient_dot(x, y):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = model._tf_losses(theta, x[None], y[None])[0]
        return tf.reduce_sum(tape.gradient(loss, theta) * s_tf)

    m = min(args.loop_subset, n)
    X, Y = model.X_train_, model.y_train_
    one_gradient_dot(X[0], Y[0])
    t0 = time.perf_counter()
    loop_scores = np.array([float(one_gradient_dot(X[i], Y[i])) for i in range(m)])
    t_loop = (time.perf_counter() - t0) * n / m
    reg = model.weight_decay * float(model.theta_ @ s_ref)
    err = np.max(np.abs(loop_scores + reg - scores_ref[:m]))
    rows.append((f"  score all {n} points, per-example loop (timed on {m}, scaled)", t_loop,
                 f"max |difference| to JVP scores {err:.1e}"))

    def vectorised_scores():
        G_dot = [model.per_example_gradients(np.arange(i, min(i + 2048, n))) @ s_ref for i in range(0, n, 2048)]
        return np.concatenate(G_dot)

    vectorised_scores()
    _, t_vec = timed(vectorised_scores)
    rows.append((f"  score all {n} points, vectorised per-example gradients", t_vec, ""))
    rows += arnoldi_rows(model, xt, yt, scores_ref, args.arnoldi_ranks)

    idx = int(np.argmax(np.abs(scores_ref)))
    _, t_loo = timed(model.retrain_without, [idx])
    rows.append(("LOO re-training, one point (warm-started L-BFGS)", t_loo, ""))

    # many test points, each separately: K solves + K scorings vs one multi-column solve
    k = args.matrix_tests
    if k > 0:
        xs, ys = data.test.x[:k], data.test.y[:k]

        def one_at_a_time():
            return np.stack([-model.influence_scores(model.s_test(xs[j:j + 1], ys[j:j + 1], solver="cg", tol=1e-10,
                                                                  use_cache=False).x) for j in range(k)])

        looped, t_looped = timed(one_at_a_time)
        matrix, t_matrix = timed(model.influence_matrix, xs, ys, solver="cg", tol=1e-10)
        err = np.max(np.abs(matrix - looped)) / np.max(np.abs(looped))
        rows.append((f"influence of all {n} points on {k} test points, one test point at a time", t_looped,
                     "s_test by CG + forward-mode scoring, per test point"))
        rows.append((f"  the same with influence_matrix (one {k}-column block CG solve)", t_matrix,
                     f"max relative difference {err:.1e}; {t_looped / t_matrix:.1f}x faster"))

    if not args.skip_lissa_auto:
        rows += lissa_auto_rows(model, xt, yt, s_ref)
    cg_times = {}
    for k in args.block_tests:
        new_rows, cg_times[k] = block_cg_rows(model, data.test.x[:k], data.test.y[:k], args.skip_column_cg)
        rows += new_rows
    kfac_lines = kfac_section(model, data, args, cg_times) if args.kfac_tests else []
    lds_lines = lds_table(model, data, args) if args.lds_subsets > 0 else []

    width = max(len(r[0]) for r in rows)
    print(f"\nMNIST logistic regression, n = {n}, p = {model.n_params}, test point {args.test_idx}")
    print(f"{'stage'.ljust(width)}  {'seconds':>9}  notes")
    for label, t, note in rows:
        print(f"{label.ljust(width)}  {t:9.3f}  {note}")
    t_jvp = float(np.median(score_times))
    print(f"\nspeed-up of forward-mode scoring over the per-example loop: {t_loop / t_jvp:.0f}x "
          f"(JVP {t_jvp:.3f} s vs loop {t_loop:.1f} s)")
    print(f"speed-up over vectorised per-example gradients: {t_vec / t_jvp:.1f}x")

    from influence.experiment import software_versions
    from influence.utils import atomic_path

    lines = ["# Benchmark: cost of each stage", "",
             f"MNIST 10-class logistic regression (Fig 2), n = {n}, p = {model.n_params}, test point "
             f"{args.test_idx}; one run of `scripts/benchmark_influence.py` on this machine "
             f"({os.cpu_count()} CPUs; " + ", ".join(f"{k} {v}" for k, v in software_versions().items()) + ").", "",
             "| stage | seconds | notes |", "|---|---|---|"]
    lines += [f"| {label.strip()} | {t:.3f} | {note} |" for label, t, note in rows]
    lines += ["", f"Forward-mode scoring vs the per-example loop: {t_loop / t_jvp:.0f}x; vs vectorised "
                  f"per-example gradients: {t_vec / t_jvp:.1f}x.", ""]
    lines += lds_lines
    lines += kfac_lines
    model_rows = per_model_table(args)
    if model_rows:
        lines += ["## Cost of each stage per experiment model", "",
                  "| model | n | p | stage | seconds | notes |", "|---|---|---|---|---|---|"]
        lines += [f"| {m} | {n_} | {p_} | {st} | {t:.3f} | {note} |" for m, n_, p_, st, t, note in model_rows]
        lines.append("")
    with atomic_path(args.out) as tmp:
        tmp.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


def write_cnn_kfac_only(args) -> int:
    """The CNN's K-FAC / EK-FAC rows alone (minutes, where the whole benchmark takes an hour)."""
    from influence.experiment import software_versions
    from influence.utils import atomic_path

    rows = cnn_kfac_lines(args)
    if not rows:
        print(f"no stored fig2_cnn_loo output (arrays.npz and metrics.json) under {args.cnn_loo}", file=sys.stderr)
        return 2
    lines = ["## Kronecker-factored curvature on the Fig 2 CNN", "",
             f"One run of `scripts/benchmark_influence.py --cnn-kfac-only --cnn-loo {args.cnn_loo} --cnn-cg-tests "
             f"{args.cnn_cg_tests}` on this machine ({os.cpu_count()} CPUs; "
             + ", ".join(f"{k} {v}" for k, v in software_versions().items()) + ").", "",
             "| model | stage | seconds | notes |", "|---|---|---|---|", *rows, ""]
    print("\n".join(lines))
    with atomic_path(args.out) as tmp:
        tmp.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


def lissa_auto_rows(model, x_test, y_test, s_ref):
    """LiSSA scale='auto' on the Fig 2 model: the per-example curvature pass beside the closed
    form (||x_i||^2 lambda_max(diag p_i - p_i p_i^T)), the scale it gives for the paper's
    other settings, and the solve's accuracy against CG."""
    from influence.solvers import LissaSolver

    curv, t_curv = timed(model.per_example_curvature)
    X = model.X_train_np_
    Z = X @ model.theta_.reshape(X.shape[1], -1)
    P = np.exp(Z - Z.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    S = P[:, :, None] * np.eye(P.shape[1]) - P[:, :, None] * P[:, None, :]
    exact = np.linalg.eigvalsh(S)[:, -1] * np.sum(X ** 2, axis=1)
    opts = dict(depth=5000, num_samples=10, batch_size=1, seed=17)
    (scale, info), t_scale = timed(LissaSolver(scale="auto", **opts).estimate_scale, model)
    res, t_solve = timed(model.s_test, x_test, y_test, solver="lissa", scale="auto", use_cache=False, **opts)
    return [("per-example curvature of all points (vectorised; LiSSA scale='auto')", t_curv,
             f"largest {curv.max():.4g} (closed form {exact.max():.4g}, max relative difference "
             f"{np.max(np.abs(curv - exact)) / exact.max():.1e}); median {np.median(curv):.3g}"),
            ("  LiSSA scale='auto' estimate (batch 1, depth 5,000, 10 samples)", t_scale,
             f"scale {scale:.4g} = 1.5 x (largest drawn {info['scale_bound'] - model.weight_decay:.4g} + wd); "
             f"the paper used 25"),
            ("  s_test by LiSSA with scale='auto'", t_solve,
             f"restarts {res.info['scale_restarts']}, residual {res.residual:.2g}, relative distance to CG "
             f"{np.linalg.norm(res.x - s_ref) / np.linalg.norm(s_ref):.2g}")]


def block_cg_rows(model, x_test, y_test, skip_column: bool = False):
    """Rows for influence_matrix's solve on several test points: block CG (one shared Krylov
    space) vs CG on each column (shared batched HVPs only): time, iterations, residual, and
    how far apart the influence of every training point is."""
    k = len(x_test)
    V = model.test_gradients(x_test, y_test).T
    col = None if skip_column else timed(model.inverse_hvp, V, "cg", tol=1e-10, block=False)
    blk, t_blk = timed(model.inverse_hvp, V, "cg", tol=1e-10, block=True)
    n = model.n_train_
    I_blk = scores_of(model, blk.x)
    label = f"influence_matrix solve, {k} test point{'s' if k > 1 else ''}"
    timing = {"solve_s": t_blk, "scores": I_blk}
    how = "block CG" if k > 1 else "single-vector CG (block CG needs 2+ columns)"
    extra = f", {blk.info['hvp_columns']} HVP columns" if "hvp_columns" in blk.info else ""
    rows = []
    note = f"{blk.iterations} iterations{extra}, max residual {blk.residual:.2e}"
    if col is not None:
        (col, t_col) = col
        I_col = scores_of(model, col.x)
        diff = float(np.max(np.abs(I_blk - I_col)) / np.max(np.abs(I_col)))
        rows.append((f"{label}, CG column by column", t_col,
                     f"{col.iterations} iterations, max residual {col.residual:.2e}"))
        note += f"; {t_col / t_blk:.1f}x faster; scores of all {n} points: max relative difference {diff:.1e}"
    rows.append((f"{label}, {how}", t_blk, note))
    return rows, timing


def scores_of(model, S, chunk=2048):
    """``-(G S)^T``: every training point's influence on each column's test point, (k, n)."""
    n = model.n_train_
    return np.concatenate([-(model.per_example_gradients(np.arange(i, min(i + chunk, n))) @ S).T
                           for i in range(0, n, chunk)], axis=-1)


def stored_loo(path):
    """(arrays, metrics) of an experiment's output folder, or None."""
    import json

    path = Path(path)
    if not (path / "arrays.npz").is_file() or not (path / "metrics.json").is_file():
        return None
    return dict(np.load(path / "arrays.npz")), json.loads((path / "metrics.json").read_text())


def kfac_section(model, data, args, cg_times):
    """K-FAC / EK-FAC on the Fig 2 logistic model (factor time, scoring 1 and 100 test points
    beside block CG of this run, LOO Pearson on the stored re-fits) and on the Fig 2 CNN
    from its stored fit and re-fits."""
    import scipy.stats

    from influence.solvers.kfac import compute_factors

    lines = ["## Kronecker-factored curvature (K-FAC, EK-FAC)", "",
             "| model | stage | seconds | notes |", "|---|---|---|---|"]
    model._kfac_cache = None
    _, t_fac = timed(compute_factors, model)
    _, t_eig = timed(compute_factors, model, corrected=True)
    lines.append(f"| Fig 2 LR | K-FAC factors (A, S and their eigenvectors; one pass) | {t_fac:.2f} | |")
    lines.append(f"| Fig 2 LR | EK-FAC eigenvalues (one more pass) | {t_eig:.2f} | |")
    for k in args.kfac_tests:
        xs, ys = data.test.x[:k], data.test.y[:k]
        V = model.test_gradients(xs, ys).T
        for name in ("kfac", "ekfac"):
            res, t_solve = timed(model.inverse_hvp, V, name)
            I, t_score = timed(scores_of, model, res.x)
            total = t_solve + t_score + t_fac + (t_eig if name == "ekfac" else 0)
            note = f"residual {res.residual:.2g}"
            if k in cg_times:
                ref = cg_times[k]["scores"]
                r = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(I, ref)])
                note += (f"; mean Pearson with CG's scores {r:.3f}; block CG solve alone {cg_times[k]['solve_s']:.1f} s"
                         f" ({cg_times[k]['solve_s'] / total:.1f}x this total)")
            lines.append(f"| Fig 2 LR | {name}: score all {model.n_train_} points for {k} test point(s), factors "
                         f"included | {total:.2f} | solve {t_solve:.2f} s, scoring {t_score:.2f} s; {note} |")
    stored = stored_loo(args.lr_loo)
    if stored is not None:
        arrays, metrics = stored
        t = metrics["config"]["test_idx"]
        idx, actual = arrays["removed_indices"], arrays["actual_loss_diffs"]
        for name in ("kfac", "ekfac"):
            pred = model.influence_scores(model.s_test(data.test.x[t:t + 1], data.test.y[t:t + 1], solver=name,
                                                       use_cache=False).x)[idx] / model.n_train_
            lines.append(f"| Fig 2 LR | {name}: LOO Pearson on the {len(idx)} stored re-fits of `{args.lr_loo}` | | "
                         f"{scipy.stats.pearsonr(actual, pred)[0]:.4f} (CG {metrics['metrics']['pearson_cg']:.4f}) |")
    lines += cnn_kfac_lines(args)
    return lines + [""]


def cnn_kfac_lines(args):
    """EK-FAC / K-FAC on the stored Fig 2 CNN (theta, subset, damping) and its stored re-fits;
    cost of 100 test points against CG on --cnn-cg-tests of them."""
    import scipy.stats

    from influence.datasets.mnist import load_mnist
    from influence.models.all_cnn import AllCNN
    from influence.solvers.kfac import compute_factors

    stored = stored_loo(args.cnn_loo)
    if stored is None:
        return []
    arrays, metrics = stored
    cfg = metrics["config"]
    d = load_mnist(args.data_dir, flatten=False)
    sub = arrays["train_subset"]
    model = AllCNN(weight_decay=0.001, dtype=cfg.get("dtype", "float64"))
    model.set_training_data(d.train.x[sub], d.train.y[sub]).set_theta(arrays["theta"])
    damping = cfg["damping"]
    t = cfg["test_idx"]
    xt, yt = d.test.x[t:t + 1], d.test.y[t:t + 1]
    idx, actual = arrays["removed_indices"], arrays["actual_loss_diffs"]
    m = metrics["metrics"]
    lines = []
    _, t_fac = timed(compute_factors, model)
    _, t_eig = timed(compute_factors, model, corrected=True)
    lines.append(f"| Fig 2 CNN | K-FAC factors; EK-FAC eigenvalues | {t_fac:.2f}; {t_eig:.2f} | p = {model.n_params}, "
                 f"n = {model.n_train_}; stored run `{args.cnn_loo}`"
                 f"{' (quick mode: not comparable with the paper)' if metrics.get('quick') else ''} |")
    s_of = {"CG (stored)": arrays["s_test"]}
    for name in ("kfac", "ekfac"):
        res = model.s_test(xt, yt, solver=name, damping=damping, use_cache=False)
        s_of[name] = res.x
        pred = model.influence_scores(res.x)[idx] / model.n_train_
        lines.append(f"| Fig 2 CNN | {name} (damping {damping}): LOO Pearson on the {len(idx)} stored re-fits | "
                     f"{res.time_s:.2f} | {scipy.stats.pearsonr(actual, pred)[0]:.3f} / Spearman "
                     f"{scipy.stats.spearmanr(actual, pred)[0]:.3f}; stored CG (H, damping "
                     f"{m.get('damping_used', damping):.3g}) {m['pearson']:.3f}, CG (G) "
                     f"{m.get('pearson_gauss_newton', float('nan')):.3f}; residual {res.residual:.2g} |")
    lines += kron_diagnostic_lines(model, xt, yt, idx, actual, s_of, damping)
    xs, ys = d.test.x[:100], d.test.y[:100]
    V = model.test_gradients(xs, ys).T
    res, t_solve = timed(model.inverse_hvp, V, "ekfac", damping=damping)
    _, t_score = timed(scores_of, model, res.x, 512)
    total = t_fac + t_eig + t_solve + t_score
    lines.append(f"| Fig 2 CNN | ekfac: score all {model.n_train_} points for 100 test points, factors included | "
                 f"{total:.1f} | solve {t_solve:.2f} s, scoring {t_score:.1f} s |")
    k = args.cnn_cg_tests
    damping_cg = m.get("damping_used", damping)  # the figure raised it where CG met negative curvature
    if k > 0:
        def cg_each():
            S = [model.inverse_hvp(v, "cg", damping=damping_cg, tol=1e-8, maxiter=2000) for v in V[:, :k].T]
            return S, scores_of(model, np.stack([r.x for r in S], axis=1), 512)
        (S, _), t_cg = timed(cg_each)
        per = t_cg / k
        lines.append(f"| Fig 2 CNN | CG (damping {damping_cg:.3g}), {k} of those test points one at a time, with scoring | "
                     f"{t_cg:.1f} | iterations {[r.iterations for r in S]}, residuals "
                     f"{', '.join(f'{r.residual:.1e}' for r in S)}; {per:.1f} s per test point: 100 would take "
                     f"~{100 * per:.0f} s, {100 * per / total:.0f}x EK-FAC's total (extrapolated from {k}) |")
    return lines


def kron_diagnostic_lines(model, xt, yt, idx, actual, s_of, damping, rank=20):
    """Where the Kronecker-factored s_test departs from CG's: its part in the span of the
    ``rank`` leading eigenvectors of H (Lanczos), where the training gradients are largest,
    so that errors there dominate ``g_i . s``; and EK-FAC's LOO Pearson as damping grows."""
    import scipy.stats

    from influence.solvers import ArnoldiSolver

    (lam, U), t_eig = timed(ArnoldiSolver(rank=rank, tol=1e-3).eigenpairs, model)
    parts, ref = [], next(iter(s_of.values()))
    for label, s in s_of.items():
        c = U.T @ s
        cos = float(s @ ref / (np.linalg.norm(s) * np.linalg.norm(ref)))
        parts.append(f"{label} {np.linalg.norm(c):.3g} of {np.linalg.norm(s):.3g} (energy {float(lam @ c ** 2):.3g}"
                     + (f"; cosine with CG's s_test {cos:.2f})" if s is not ref else ")"))
    lines = [f"| Fig 2 CNN | diagnostic: s_test's norm in the span of H's top {rank} eigenvectors (eigenvalues "
             f"{lam[0]:.3g} .. {lam[-1]:.3g}), and its energy there, sum lambda_k (u_k . s)^2 | {t_eig:.1f} | "
             + "; ".join(parts) + " |"]
    sweep = []
    for damp in (damping, 10 * damping, 100 * damping):
        res = model.s_test(xt, yt, solver="ekfac", damping=damp, use_cache=False)
        pred = model.influence_scores(res.x)[idx] / model.n_train_
        sweep.append(f"damping {damp:.3g}: {scipy.stats.pearsonr(actual, pred)[0]:.3f}")
    lines.append(f"| Fig 2 CNN | diagnostic: EK-FAC's LOO Pearson as its damping grows | | {'; '.join(sweep)} |")
    return lines


def arnoldi_rows(model, x_test, y_test, scores_ref, ranks):
    """Rows for the low-rank solver: decomposition time, a later solve's time, and how its
    scores of every training point agree with CG's (Pearson, Spearman, shared top 100 by |score|)."""
    import scipy.stats

    rows = []
    top_ref = set(np.argsort(-np.abs(scores_ref))[:100])
    for rank in ranks or []:
        model._eigen_cache = None
        for fill in (None, model.weight_decay):
            res, t_s = timed(model.s_test, x_test, y_test, solver="arnoldi", rank=rank, fill=fill, use_cache=False)
            scores = model.influence_scores(res.x)
            top = set(np.argsort(-np.abs(scores))[:100])
            how = "complement dropped" if fill is None else f"complement filled with wd = {fill:g}"
            stage = f"s_test by arnoldi, rank {rank}, {how}"
            stage += " (Lanczos decomposition included)" if fill is None else " (decomposition cached)"
            rows.append((stage, t_s, f"residual {res.residual:.2f}; scores vs CG's: Pearson "
                                      f"{scipy.stats.pearsonr(scores, scores_ref)[0]:.3f}, Spearman "
                                      f"{scipy.stats.spearmanr(scores, scores_ref)[0]:.3f}, "
                                      f"top-100 overlap {len(top & top_ref)}"))
    return rows


def lds_table(model, data, args):
    """Markdown lines: the linear datamodeling score of each solver's influence matrix on the
    first --lds-tests test points, all scored on the same --lds-subsets re-fits without a
    random half of the training set (and the same with H replaced by I: plain gradient
    dot products)."""
    from influence import linear_datamodeling_score

    xs, ys = data.test.x[:args.lds_tests], data.test.y[:args.lds_tests]
    methods = {"cg": ("cg", {"tol": 1e-10}),
               "lissa (paper's settings)": ("lissa", {"scale": 25, "depth": 5000, "num_samples": 10,
                                                      "batch_size": 1, "seed": 17})}
    if not args.skip_exact:
        methods = {"exact": ("exact", {}), **methods}
    for rank in args.arnoldi_ranks or []:
        methods[f"arnoldi rank {rank}, complement dropped"] = ("arnoldi", {"rank": rank})
        methods[f"arnoldi rank {rank}, fill = wd"] = ("arnoldi", {"rank": rank, "fill": model.weight_decay})
    matrices, seconds = {}, {}
    for label, (name, opts) in methods.items():
        matrices[label], seconds[label] = timed(model.influence_matrix, xs, ys, solver=name, **opts)
    V = model.test_gradients(xs, ys)
    plain = "no Hessian (H = I: gradient dot products)"
    matrices[plain], seconds[plain] = timed(lambda: np.stack([-model.influence_scores(v) for v in V]))
    lds, t_refit = timed(linear_datamodeling_score, model, xs, ys, matrices, n_subsets=args.lds_subsets,
                         fraction=0.5, seed=0)
    print(f"\nLDS over {args.lds_subsets} re-fits without a random half ({t_refit:.0f} s), "
          f"test points 0-{args.lds_tests - 1}:")
    lines = ["## Linear datamodeling score of each solver", "",
             f"Influence of all {model.n_train_} training points on test points 0-{args.lds_tests - 1}, scored on "
             f"the same {args.lds_subsets} re-fits without a random half of the training set ({t_refit:.0f} s): "
             "the Spearman correlation, per test point, of the actual change in its loss with the summed "
             "-I_up,loss / n of the removed points; mean (min) over the test points.", "",
             "| influence from | seconds for the matrix | LDS mean | LDS min |", "|---|---|---|---|"]
    for label, res in lds.items():
        per = res.per_test
        print(f"  {label:45s} {seconds[label]:8.2f} s  LDS {res.score:.3f} (min {np.nanmin(per):.3f})")
        lines.append(f"| {label} | {seconds[label]:.2f} | {res.score:.3f} | {np.nanmin(per):.3f} |")
    return lines + [""]


def stage_costs(label, model, fit_args, x_test, y_test, solvers, loo_index=None):
    """Rows (model, n, p, stage, seconds, notes): fit, s_test per solver, scoring, one LOO re-fit."""
    _, t_fit = timed(model.fit, *fit_args)
    n, p = model.n_train_, model.n_params
    rows = [(label, n, p, "train", t_fit, f"gradient norm {model.grad_norm_:.1e}")]
    s_x = None
    for name, opts in solvers:
        opts = dict(opts)
        model.curvature = opts.pop("curvature", "hessian")
        res, t_s = timed(model.s_test, x_test, y_test, solver=name, use_cache=False, **opts)
        stage = f"s_test by {name}" + (" (Gauss-Newton)" if model.curvature == "gauss-newton" else "")
        note = f"iterations {res.iterations}, residual {res.residual:.1e}"
        if opts.get("damping") == "auto":
            stage += " (damping='auto')"
            note += (f"; smallest eigenvalue (Lanczos) {res.info['smallest_eigenvalue']:.3g}, damping used "
                     f"{res.damping:.3g} after {res.info['damping_retries']} raises")
        rows.append((label, n, p, stage, t_s, note))
        model.curvature = "hessian"
        s_x = res.x if s_x is None else s_x
    model.influence_scores(s_x)
    scores, t_score = timed(model.influence_scores, s_x)
    rows.append((label, n, p, f"score all {n} training points", t_score, "forward-mode JVP"))
    idx = int(np.argmax(np.abs(scores))) if loo_index is None else loo_index
    _, t_loo = timed(model.retrain_without, [idx])
    rows.append((label, n, p, "LOO re-training, one point", t_loo, ""))
    return rows


def per_model_table(args):
    """Stage costs for each experiment's model whose data is present (see the module docstring)."""
    from influence import BinaryLogisticRegression
    from influence.datasets.manifest import DataError
    from influence.models.smooth_hinge import SmoothHingeSVM

    rows = []
    cg = ("cg", {"tol": 1e-10})
    for name in args.models or []:
        try:
            if name == "binary_lr":
                from influence.datasets.mnist import load_binary_mnist
                d = load_binary_mnist(args.data_dir)
                rows += stage_costs("binary LR, MNIST 1 vs 7 (Fig 1)", BinaryLogisticRegression(weight_decay=0.01),
                                    (d.train.x, d.train.y), d.test.x[30:31], d.test.y[30:31], [("exact", {}), cg])
            elif name == "smooth_hinge":
                from influence.datasets.mnist import load_binary_mnist
                d = load_binary_mnist(args.data_dir, signed=True)
                rows += stage_costs("smooth-hinge SVM t=0.001 (Fig 3)", SmoothHingeSVM(temp=0.001, weight_decay=0.01),
                                    (d.train.x, d.train.y), d.test.x[1597:1598], d.test.y[1597:1598],
                                    [("exact", {}), cg])
            elif name == "hospital":
                from influence.datasets.hospital import load_hospital
                d = load_hospital(args.data_dir)
                rows += stage_costs("binary LR, hospital 127 features (Sec 5.3)",
                                    BinaryLogisticRegression(weight_decay=1e-4), (d.X_train, d.y_train),
                                    d.X_test[:1], d.y_test[:1], [("exact", {}), ("cg", {"tol": 1e-10, "maxiter": 5000})])
            elif name == "spam":
                from influence.datasets.spam import load_spam
                d = load_spam(args.data_dir, cache_dir=Path(args.out).parent / "cache")
                rows += stage_costs("binary LR, Enron1 bag of words (Fig 6)", BinaryLogisticRegression(weight_decay=1e-4),
                                    (d.X_train, d.y_train), d.X_test[:1], d.y_test[:1], [("exact", {}), cg])
            elif name == "inception":
                from inception import BinaryInceptionModel, prepare_dogfish
                prep = prepare_dogfish(args.data_dir, Path(args.out).parent / "cache", progress=False)
                rows += stage_costs("Inception head, dog vs fish (Figs 4-5)", BinaryInceptionModel(weight_decay=0.001),
                                    (prep.F_train, prep.data.y_train), prep.F_test[:1], prep.data.y_test[:1],
                                    [("exact", {}), cg])
            elif name == "cnn":
                from influence.models.all_cnn import AllCNN
                from influence.datasets.mnist import load_mnist
                d = load_mnist(args.data_dir, flatten=False)
                small = np.sort(np.random.default_rng(0).choice(len(d.train), len(d.train) // 10, replace=False))
                rows += stage_costs("all-conv CNN, 5.5k MNIST (Fig 2 right; 2k Adam steps)",
                                    AllCNN(adam_steps=2000, learning_rate=1e-3, retrain_steps=1000),
                                    (d.train.x[small], d.train.y[small]), d.test.x[6558:6559], d.test.y[6558:6559],
                                    [("cg", {"damping": 0.01, "tol": 1e-8}),
                                     ("cg", {"damping": 0.01, "tol": 1e-8, "curvature": "gauss-newton"}),
                                     ("cg", {"damping": "auto", "tol": 1e-8})])
            else:
                print(f"unknown model {name!r}", file=sys.stderr)
        except DataError as exc:
            print(f"[{name}] skipped: {exc}", file=sys.stderr)
    for r in rows:
        print(f"{r[0][:45]:45s} {r[3]:38s} {r[4]:9.3f}  {r[5]}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
