"""The benchmarks' stages (``scripts/benchmark_influence.py``): timings of each solver's
s_test, of scoring every training point, of influence matrices by block and column CG, of
K-FAC / EK-FAC, LiSSA's scale bound, Arnoldi at several ranks, each solver's LDS, and the
stage costs of every experiment's model. Each function returns table rows or markdown
lines; ratios are printed from numbers measured in the same run, never asserted.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .stored_runs import read_run, stored_cnn


def timed(fn, *a, **kw):
    """``(fn(*a, **kw), seconds)``."""
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def logistic_rows(model, data, args, xt, yt):
    """The Fig 2 logistic model's rows: s_test and scoring per solver, the per-example loop and
    vectorised baselines, Arnoldi, one LOO re-fit, and --matrix-tests test points one at a time
    against one influence_matrix solve. Returns ``(rows, speed-ups, CG's s_test)``."""
    import tensorflow as tf

    n = model.n_train_
    rows = []
    solvers = [("cg", {"tol": 1e-10}),
               ("lissa", {"scale": 25, "depth": 5000, "num_samples": 10, "batch_size": 1, "seed": 17})]
    if not args.skip_exact:
        solvers.insert(0, ("exact", {}))
    s_ref = None
    score_times = []
    for name, opts in solvers:
        res, t_s = timed(model.s_test, xt, yt, solver=name, **opts)
        model.gradient_dots(res.x)  # warm-up (tracing)
        scores, t_score = timed(model.gradient_dots, res.x)
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
            loss = model.kernels.losses(theta, x[None], y[None])[0]
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
            return np.stack([-model.gradient_dots(model.s_test(xs[j:j + 1], ys[j:j + 1], solver="cg", tol=1e-10,
                                                                  use_cache=False).x) for j in range(k)])

        looped, t_looped = timed(one_at_a_time)
        matrix, t_matrix = timed(model.influence_matrix, xs, ys, solver="cg", tol=1e-10)
        err = np.max(np.abs(matrix - looped)) / np.max(np.abs(looped))
        rows.append((f"influence of all {n} points on {k} test points, one test point at a time", t_looped,
                     "s_test by CG + forward-mode scoring, per test point"))
        rows.append((f"  the same with influence_matrix (one {k}-column block CG solve)", t_matrix,
                     f"max relative difference {err:.1e}; {t_looped / t_matrix:.1f}x faster"))

    return rows, {"t_loop": t_loop, "t_vec": t_vec, "t_jvp": float(np.median(score_times))}, s_ref


def lissa_auto_rows(model, x_test, y_test, s_ref):
    """LiSSA scale='auto' on the Fig 2 model: the per-example curvature pass beside the closed
    form (||x_i||^2 lambda_max(diag p_i - p_i p_i^T)), the scale it gives for the paper's
    other settings, and the solve's accuracy against CG."""
    from ..solvers import LissaSolver

    curv, t_curv = timed(model.per_example_curvature)
    X = model.X_train_np_
    Z = X @ model.theta_.reshape(X.shape[1], -1)
    P = np.exp(Z - Z.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    S = P[:, :, None] * np.eye(P.shape[1]) - P[:, :, None] * P[:, None, :]
    exact = np.linalg.eigvalsh(S)[:, -1] * np.sum(X ** 2, axis=1)
    opts = dict(depth=5000, num_samples=10, batch_size=1, seed=17)
    (scale, info), t_scale = timed(LissaSolver(scale="auto", **opts).fit(model).estimate_scale)
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


def kfac_section(model, data, args, cg_times):
    """K-FAC / EK-FAC on the Fig 2 logistic model (factor time, scoring 1 and 100 test points
    beside block CG of this run, LOO Pearson on the stored re-fits) and on the Fig 2 CNN
    from its stored fit and re-fits."""
    import scipy.stats

    from ..solvers.kfac import compute_factors, correct_eigenvalues

    lines = ["## Kronecker-factored curvature (K-FAC, EK-FAC)", "",
             "| model | stage | seconds | notes |", "|---|---|---|---|"]
    blocks, t_fac = timed(compute_factors, model)
    _, t_eig = timed(correct_eigenvalues, model, blocks, "expectation", 1, 0)
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
    stored = read_run(args.lr_loo)
    if stored is not None:
        arrays, metrics = stored
        t = metrics["config"]["test_idx"]
        idx, actual = arrays["removed_indices"], arrays["actual_loss_diffs"]
        for name in ("kfac", "ekfac"):
            pred = model.gradient_dots(model.s_test(data.test.x[t:t + 1], data.test.y[t:t + 1], solver=name,
                                                       use_cache=False).x)[idx] / model.n_train_
            lines.append(f"| Fig 2 LR | {name}: LOO Pearson on the {len(idx)} stored re-fits of `{args.lr_loo}` | | "
                         f"{scipy.stats.pearsonr(actual, pred)[0]:.4f} (CG {metrics['metrics']['pearson_cg']:.4f}) |")
    lines += cnn_kfac_lines(args)
    return lines + [""]


def cnn_kfac_lines(args):
    """EK-FAC / K-FAC on the stored Fig 2 CNN (theta, subset, damping) and its stored re-fits;
    cost of 100 test points against CG on --cnn-cg-tests of them."""
    import scipy.stats

    from ..solvers.kfac import compute_factors, correct_eigenvalues

    cnn = stored_cnn(args.cnn_loo, args.data_dir)
    if cnn is None:
        return []
    model, arrays, metrics, d = cnn.model, cnn.arrays, cnn.metrics, cnn.data
    damping = cnn.config["damping"]
    xt, yt = cnn.test_point
    idx, actual = cnn.removed, cnn.actual
    m = metrics["metrics"]
    lines = []
    blocks, t_fac = timed(compute_factors, model)
    _, t_eig = timed(correct_eigenvalues, model, blocks, "expectation", 1, 0)
    lines.append(f"| Fig 2 CNN | K-FAC factors; EK-FAC eigenvalues | {t_fac:.2f}; {t_eig:.2f} | p = {model.n_params}, "
                 f"n = {model.n_train_}; stored run `{args.cnn_loo}`"
                 f"{' (quick mode: not comparable with the paper)' if metrics.get('quick') else ''} |")
    s_of = {"CG (stored)": arrays["s_test"]}
    for name in ("kfac", "ekfac"):
        res = model.s_test(xt, yt, solver=name, damping=damping, use_cache=False)
        s_of[name] = res.x
        pred = model.gradient_dots(res.x)[idx] / model.n_train_
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
    damping_cg = cnn.damping_used  # the figure raised it where CG met negative curvature
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

    from ..solvers import ArnoldiSolver

    (lam, U), t_eig = timed(ArnoldiSolver(rank=rank, tol=1e-3).fit(model).eigenpairs)
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
        pred = model.gradient_dots(res.x)[idx] / model.n_train_
        sweep.append(f"damping {damp:.3g}: {scipy.stats.pearsonr(actual, pred)[0]:.3f}")
    lines.append(f"| Fig 2 CNN | diagnostic: EK-FAC's LOO Pearson as its damping grows | | {'; '.join(sweep)} |")
    return lines


def arnoldi_rows(model, x_test, y_test, scores_ref, ranks):
    """Rows for the low-rank solver: decomposition time, a later solve's time, and how its
    scores of every training point agree with CG's (Pearson, Spearman, shared top 100 by |score|)."""
    import scipy.stats

    rows = []
    top_ref = set(np.argsort(-np.abs(scores_ref))[:100])
    for rank in ranks or []:  # the model's shared Arnoldi store: the fill=wd row reuses the decomposition
        for fill in (None, model.weight_decay):
            res, t_s = timed(model.s_test, x_test, y_test, solver="arnoldi", rank=rank, fill=fill, use_cache=False)
            scores = model.gradient_dots(res.x)
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
    from ..refit_validation import linear_datamodeling_score

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
    matrices[plain], seconds[plain] = timed(lambda: np.stack([-model.gradient_dots(v) for v in V]))
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
        curvature = opts.pop("curvature", "hessian")
        if name == "cg":
            opts.setdefault("on_failure", "warn")  # the table reports a failed solve (e.g. negative curvature)
        res, t_s = timed(model.s_test, x_test, y_test, solver=name, use_cache=False, curvature=curvature, **opts)
        stage = f"s_test by {name}" + (" (Gauss-Newton)" if curvature == "gauss-newton" else "")
        note = f"iterations {res.iterations}, residual {res.residual:.1e}"
        if opts.get("damping") == "auto":
            stage += " (damping='auto')"
            note += (f"; smallest eigenvalue (Lanczos) {res.info['smallest_eigenvalue']:.3g}, damping used "
                     f"{res.damping:.3g} after {res.info['damping_retries']} raises")
        rows.append((label, n, p, stage, t_s, note))
        s_x = res.x if s_x is None else s_x
    model.gradient_dots(s_x)
    scores, t_score = timed(model.gradient_dots, s_x)
    rows.append((label, n, p, f"score all {n} training points", t_score, "forward-mode JVP"))
    idx = int(np.argmax(np.abs(scores))) if loo_index is None else loo_index
    _, t_loo = timed(model.retrain_without, [idx])
    rows.append((label, n, p, "LOO re-training, one point", t_loo, ""))
    return rows


def per_model_table(args):
    """Stage costs for each experiment's model whose data is present (see the module docstring)."""
    from ..datasets.manifest import DataError
    from ..models.logistic import BinaryLogisticRegression
    from ..models.smooth_hinge import SmoothHingeSVM

    rows = []
    cg = ("cg", {"tol": 1e-10})
    for name in args.models or []:
        try:
            if name == "binary_lr":
                from ..datasets.mnist import load_binary_mnist
                d = load_binary_mnist(args.data_dir)
                rows += stage_costs("binary LR, MNIST 1 vs 7 (Fig 1)", BinaryLogisticRegression(weight_decay=0.01),
                                    (d.train.x, d.train.y), d.test.x[30:31], d.test.y[30:31], [("exact", {}), cg])
            elif name == "smooth_hinge":
                from ..datasets.mnist import load_binary_mnist
                d = load_binary_mnist(args.data_dir, signed=True)
                rows += stage_costs("smooth-hinge SVM t=0.001 (Fig 3)", SmoothHingeSVM(temp=0.001, weight_decay=0.01),
                                    (d.train.x, d.train.y), d.test.x[1597:1598], d.test.y[1597:1598],
                                    [("exact", {}), cg])
            elif name == "hospital":
                from ..datasets.hospital import load_hospital
                d = load_hospital(args.data_dir)
                rows += stage_costs("binary LR, hospital 127 features (Sec 5.3)",
                                    BinaryLogisticRegression(weight_decay=1e-4), (d.X_train, d.y_train),
                                    d.X_test[:1], d.y_test[:1], [("exact", {}), ("cg", {"tol": 1e-10, "maxiter": 5000})])
            elif name == "spam":
                from ..datasets.spam import load_spam
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
                from ..datasets.mnist import load_mnist
                from ..models.all_cnn import AllCNN
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


def machine_rates(p: int = 2000, n_stream: int = 2 ** 25) -> dict:
    """This machine's float64 matrix-product rate (GFLOP/s, numpy's BLAS and TF's) and its
    streaming read rate (GB/s: a matrix-vector product over a 256 MB array, multithreaded)."""
    import tensorflow as tf

    A = np.random.default_rng(0).random((p, p))
    At = tf.constant(A)
    A @ A
    _, t_np = timed(lambda: A @ A)
    tf.matmul(At, At).numpy()
    _, t_tf = timed(lambda: tf.matmul(At, At).numpy())
    X = np.random.default_rng(1).random((n_stream // 512, 512))
    ones = np.ones(512)
    X @ ones
    _, t_read = timed(lambda: [X @ ones for _ in range(3)])
    return {"gflops_numpy": 2 * p ** 3 / t_np / 1e9, "gflops_tf": 2 * p ** 3 / t_tf / 1e9,
            "read_gbs": 3 * X.nbytes / t_read / 1e9}


def hvp_bound_rows(label, op, rates, flops_per_hvp=None, bytes_per_hvp=None, columns=(1, 16, 100), repeat=3):
    """Rows: the operator's product time for each column count beside its bound: bytes read
    at the streaming rate (memory-bound models) or FLOPs at the measured matmul rate."""
    rows = []
    for k in columns:
        V = np.random.default_rng(k).standard_normal((op.n_params, k))
        op.hvp(V[:, 0] if k == 1 else V)
        best = min(timed(op.hvp, V[:, 0] if k == 1 else V)[1] for _ in range(repeat))
        bound, how = None, ""
        if bytes_per_hvp is not None and k == 1:
            bound = bytes_per_hvp / (rates["read_gbs"] * 1e9)
            how = f"{bytes_per_hvp / 1e6:.0f} MB at {rates['read_gbs']:.1f} GB/s"
        if flops_per_hvp is not None:
            fb = k * flops_per_hvp / (max(rates["gflops_numpy"], rates["gflops_tf"]) * 1e9)
            if bound is None or fb > bound:
                bound, how = fb, f"{k * flops_per_hvp / 1e9:.2f} GFLOP at {max(rates['gflops_numpy'], rates['gflops_tf']):.0f} GFLOP/s"
        note = f"{best / k * 1e3:.1f} ms per column"
        if bound:
            note += f"; bound {bound:.4f} s ({how}): {best / bound:.1f}x the bound"
        rows.append((f"{label}: {op.kind} product, {k} column{'s' if k > 1 else ''}", best, note))
    return rows


def preconditioner_rows(label, model, V, damping, tol, curvature="hessian", ranks=(10, 30, 100), kron=("ekfac",),
                        block=True, maxiter=2000, mixed_ranks=(), plain=True, named=(), mixed_plain=False):
    """Rows: plain CG vs Nystrom-preconditioned CG at each rank vs Kronecker-preconditioned CG
    (``kron``) vs other named preconditioners (``named``, e.g. ``"gauss-newton"``) on
    ``(C + damping I) X = V`` (block CG for several columns): iterations, HVP columns,
    set-up seconds (eigenpairs / factors, paid once per model), solve seconds, residual and
    the largest difference from the plain solve (without one: from the first row). Each
    preconditioner's set-up is measured on a fresh operator so that none reuses another's
    eigenpairs or explicit matrix."""
    from ..curvature import GaussNewtonOperator, HessianOperator
    from ..solvers import CGSolver, SolveFailedError

    k = 1 if V.ndim == 1 else V.shape[1]
    kind = f"{'block ' if block and k > 1 else ''}CG on {'G' if curvature == 'gauss-newton' else 'H'} + {damping:g} I"
    Op = GaussNewtonOperator if curvature == "gauss-newton" else HessianOperator
    reference = None
    rows = []
    specs = ([("none", {})] if plain else []) + [(f"nystrom k={r}", {"preconditioner": "nystrom", "preconditioner_rank": r})
                             for r in ranks] + [(name, {"preconditioner": name}) for name in (*named, *kron)] + [
        (f"nystrom k={r}, mixed precision", {"preconditioner": "nystrom", "preconditioner_rank": r,
                                              "precision": "mixed"}) for r in mixed_ranks]
    if mixed_plain:
        specs.append(("none, mixed precision", {"precision": "mixed"}))
    for name, opts in specs:
        op = Op(model)
        solver = CGSolver(damping=damping, tol=tol, maxiter=maxiter, block=block, on_failure="warn", **opts).fit(op)
        setup = 0.0
        if solver._preconditioner is not None:  # the set-up alone, then the solve (the preconditioner is cached)
            target = op.low_precision() if opts.get("precision") == "mixed" else op
            _, setup = timed(solver._preconditioner.build, target, damping)
        try:
            res, t = timed(solver.solve, V)
        except SolveFailedError as exc:  # pragma: no cover - on_failure="warn"
            res, t = exc.result, float("nan")
        diff = "" if reference is None else (f"; max relative difference from {reference.info['_label']} "
                                             f"{np.max(np.abs(res.x - reference.x)) / np.max(np.abs(reference.x)):.1e}")
        if reference is None:
            reference = res
            res.info["_label"] = "plain CG" if name == "none" else f"preconditioner {name}"
        hvps = res.info.get("hvp_columns", res.iterations * k)
        checks = res.info.get("check_columns")
        mixed = opts.get("precision") == "mixed"
        setup_hvps = ((op.low_precision() if mixed else op).eigenpairs_cost().get("hvps", 0)
                      if name.startswith("nystrom") else 0)
        extra = (f" (float32 products; float64 residual after each of {res.info['refinements']} corrections, inner "
                 f"iterations {res.info['inner_iterations']})" if mixed else "")
        rows.append((f"{label}: {kind}, {k} test point{'s' if k > 1 else ''}, preconditioner {name}", setup + t,
                     f"{res.iterations} iterations{extra}, {hvps} HVP columns (+{setup_hvps} for set-up"
                     f"{'' if checks is None else f', +{checks} for true-residual checks'}), set-up "
                     f"{setup:.1f} s, solve {t:.1f} s, residual {res.residual:.1e}{diff}"))
    return rows
