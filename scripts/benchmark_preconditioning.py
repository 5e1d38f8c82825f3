#!/usr/bin/env python
"""Benchmark: preconditioned (block) CG and the cost of one curvature product vs its bound.

Three models: the Fig 2 logistic regression (55,000 MNIST images, p = 7,840; H v in closed
form, memory-bound for one column) and the Fig 2 CNN (its default fit: 5,500 images, 5,000
Adam steps; G v by forward-over-reverse autodiff). For each: this machine's matmul and
streaming rates, the product's time for 1 / 16 / 100 columns beside its bound (bytes read
at the streaming rate, or FLOPs at the matmul rate), then CG with no preconditioner, the
Nystrom preconditioner at each --ranks, EK-FAC and (--preconditioners, --cnn-preconditioners)
the explicit Gauss-Newton matrix as preconditioner: iterations, HVP
columns, set-up and solve seconds, residual (and, for the CNN, the Nystrom-preconditioned
solve in mixed precision: float32 products, float64 residuals), for --tests test points (block CG for
several) on C + damping I (logistic: H, tol 1e-10, damping 0; CNN: G + 0.01 I, tol 1e-8).
Third (keras_head): the Keras documentation's MNIST convnet trained by ``model.fit`` on
3,000 images, its last layer's objective-and-gradient pass with and without the
frozen-feature cache. All numbers come from this one run; ratios are printed, not asserted. Writes
BENCHMARK.md, metrics.json, arrays.npz and the figure into --out. --quick: 1 test point,
ranks 10 and 30, no explicit logistic Hessian, a CNN of 500 images and 300 Adam steps.
"""
from __future__ import annotations

import argparse  # noqa: F401
import logging
import sys

import numpy as np

from influence.experiment import run

NAME = "benchmark_preconditioning"
logger = logging.getLogger(NAME)


def add_arguments(parser):
    parser.add_argument("--models", nargs="*", default=["logistic", "cnn", "keras_head"],
                        choices=["logistic", "cnn", "keras_head"],
                        help="which models' rows to run (default: all three)")
    parser.add_argument("--tests", type=int, nargs="*", default=[1, 100], help="test-point counts (logistic)")
    parser.add_argument("--cnn-tests", type=int, nargs="*", default=[1], help="test-point counts (CNN)")
    parser.add_argument("--ranks", type=int, nargs="*", default=[10, 30, 100], help="Nystrom ranks")
    parser.add_argument("--cnn-n-train", type=int, default=None, help="default 5500 (--quick: 500)")
    parser.add_argument("--cnn-adam-steps", type=int, default=None, help="default 5000 (--quick: 300)")
    parser.add_argument("--cnn-ranks", type=int, nargs="*", default=[10, 30, 100], help="Nystrom ranks (CNN)")
    parser.add_argument("--no-ekfac", action="store_true", help="skip EK-FAC as a preconditioner")
    parser.add_argument("--cnn-mixed-only", action="store_true",
                        help="CNN: only the mixed-precision Nystrom rank-30 solve (no plain or full-precision rows)")
    parser.add_argument("--preconditioners", nargs="*", default=["gauss-newton-float32", "gauss-newton"],
                        choices=["gauss-newton-float32", "gauss-newton", "none"],
                        help="named preconditioners for the logistic rows (default: both; gauss-newton is here the "
                             "exact H: G = H for a linear model, its explicit matrix in closed form; -float32: the "
                             "same formed and factored in single precision; none: skip)")
    parser.add_argument("--cnn-preconditioners", nargs="*", default=["gauss-newton"], choices=["gauss-newton", "none"],
                        help="named preconditioners for the CNN's rows, first in each table (default: gauss-newton, "
                             "the explicit Gauss-Newton matrix from per-example Jacobians; none: skip)")
    parser.add_argument("--cnn-named-only", type=int, default=None, metavar="K",
                        help="CNN: only the named preconditioners' rows for K or more test points (plain CG and "
                             "Nystrom rows on fewer)")
    parser.add_argument("--cnn-hessian", action="store_true",
                        help="also CG on the CNN's H + d I (d from its Lanczos bounds, as the figure), plain and "
                             "preconditioned by the Gauss-Newton matrix, on the first test point")
    parser.add_argument("--cnn-ekfac", action="store_true",
                        help="also EK-FAC as the CNN's preconditioner (a probe measured 671 iterations: ~30 min)")


def cnn_flops_per_example(net) -> float:
    """Multiply-adds x 2 of one forward pass of a Keras Conv2D/Dense stack (other layers ignored)."""
    import keras

    flops = 0.0
    for layer in net.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            h, w = layer.output.shape[1:3]
            flops += 2.0 * h * w * kh * kw * cin * cout
        elif isinstance(layer, keras.layers.Dense):
            flops += 2.0 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return flops


def definite_damping(model, v, damping):
    """The figure's retry (the library's rule, :func:`influence.solvers.damping.raise_until_definite`):
    ``damping`` raised while CG on H + damping I (Gauss-Newton preconditioned) meets negative curvature."""
    from influence import CGSolver
    from influence.curvature import HessianOperator
    from influence.solvers.damping import raise_until_definite

    op = HessianOperator(model)
    _, damping = raise_until_definite(lambda d: CGSolver(damping=d, tol=1e-8, maxiter=2000, preconditioner="gauss-newton",
                                                         on_failure="warn").fit(op).solve(v), damping)
    return damping


def fastest_row(label, k, rows, issue_seconds=None):
    """One row: the fastest of ``rows`` (a preconditioner_rows table) against its plain-CG row,
    both from this run (and against the issue's measurement of block CG, where given)."""
    plain = [r for r in rows if r[0].endswith("preconditioner none")]
    timed = [r for r in rows if np.isfinite(r[1])]
    if not plain or not timed:
        return []
    best = min(timed, key=lambda r: r[1])
    name = best[0].rsplit("preconditioner ", 1)[-1]
    note = f"{name}: {plain[0][1] / best[1]:.2f}x faster than plain CG in this run ({plain[0][1]:.1f} s)"
    if issue_seconds is not None:
        note += f"; {issue_seconds / best[1]:.2f}x the issue's {issue_seconds:g} s block CG"
    return [(f"{label}: {k} test point{'s' if k > 1 else ''}, fastest solve incl. set-up", best[1], note)]


def keras_head_rows(args):
    """The Keras documentation's MNIST convnet (Conv32-MaxPool-Conv64-MaxPool-Flatten-Dropout-
    Dense10, float32) trained one epoch by ``model.fit`` on 3,000 images; its last layer's
    objective-and-gradient pass and s_test with and without the frozen-feature cache."""
    import keras

    from influence import KerasModel
    from influence.datasets.mnist import load_mnist
    from influence.evaluation import benchmarks as bm

    data = load_mnist(args.data_dir, flatten=False)
    n = 500 if args.quick else 3000
    X, y = data.train.x[:n].reshape(-1, 28, 28, 1), data.train.y[:n]
    keras.utils.set_random_seed(args.seed)
    net = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(32, 3, activation="relu"),
                            keras.layers.MaxPooling2D(2), keras.layers.Conv2D(64, 3, activation="relu"),
                            keras.layers.MaxPooling2D(2), keras.layers.Flatten(), keras.layers.Dropout(0.5),
                            keras.layers.Dense(10, name="logits")])
    net.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    net.fit(X, y, epochs=1, batch_size=128, verbose=0)
    xt, yt = data.test.x[:1].reshape(-1, 28, 28, 1), data.test.y[:1]
    rows = []
    for cache in (False, True):
        model, t_set = bm.timed(lambda: KerasModel(net, trainable=["logits"], weight_decay=1e-3,
                                                   feature_cache=cache).set_training_data(X, y))
        model.objective_and_gradient()  # trace
        per = min(bm.timed(model.objective_and_gradient)[1] for _ in range(3))
        res, t_s = bm.timed(model.s_test, xt, yt, solver="cg", use_cache=False)
        rows.append((f"keras convnet head, n = {n}: one objective-and-gradient pass, feature_cache={cache}", per,
                     f"p = {model.n_params}; set_training_data {t_set:.2f} s (features made once: "
                     f"{'yes' if cache else 'no'}); s_test by CG {t_s:.2f} s ({res.iterations} iterations, "
                     f"residual {res.residual:.1e})"))
    rows[1] = (rows[1][0], rows[1][1], rows[1][2] + f"; {rows[0][1] / rows[1][1]:.0f}x faster per pass")
    return rows


def main(exp):
    from influence import LogisticRegression
    from influence.curvature import GaussNewtonOperator, HessianOperator
    from influence.datasets.mnist import load_mnist
    from influence.evaluation import benchmarks as bm

    args = exp.args
    tests = [1] if args.quick else args.tests
    ranks = [r for r in args.ranks if not args.quick or r <= 30] or [10]
    kron = () if args.no_ekfac else ("ekfac",)
    rates = bm.machine_rates()
    lines = ["# Benchmark: preconditioned CG, and each product against its bound", "",
             f"One run of `scripts/benchmark_preconditioning.py{' --quick' if args.quick else ''}`; matmul rate "
             f"(float64, 2000 x 2000) numpy {rates['gflops_numpy']:.0f} GFLOP/s, TF {rates['gflops_tf']:.0f} GFLOP/s; "
             f"streaming read {rates['read_gbs']:.1f} GB/s.", "", "| stage | seconds | notes |", "|---|---|---|"]
    rows = []
    if "logistic" in args.models:
        data = load_mnist(args.data_dir)
        model = LogisticRegression(n_classes=10, weight_decay=0.01)
        _, t_fit = bm.timed(model.fit, data.train.x, data.train.y)
        rows.append(("logistic: fit", t_fit, f"n = {model.n_train_}, p = {model.n_params}"))
        X = model.X_train_np_
        rows += bm.hvp_bound_rows("logistic", HessianOperator(model), rates, bytes_per_hvp=2 * X.nbytes,
                                  flops_per_hvp=4.0 * X.shape[0] * model.n_params)
        for k in tests:
            V = model.test_gradients(data.test.x[:k], data.test.y[:k]).T
            new = bm.preconditioner_rows("logistic", model, V[:, 0] if k == 1 else V, 0.0, 1e-10, ranks=ranks,
                                         kron=kron, mixed_plain=True,
                                         named=[] if args.quick else [p for p in args.preconditioners if p != "none"])
            rows += new + fastest_row("logistic", k, new, issue_seconds=52.4 if k == 100 else None)
    if "cnn" in args.models:
        from influence.models.all_cnn import AllCNN

        data = load_mnist(args.data_dir, flatten=False)
        n_small = args.cnn_n_train or (500 if args.quick else len(data.train) // 10)
        small = np.sort(np.random.default_rng(args.seed).choice(len(data.train), n_small, replace=False))
        model = AllCNN(weight_decay=0.001, learning_rate=1e-3, train_batch_size=500, decay_fractions=(0.5, 0.75),
                       adam_steps=args.cnn_adam_steps or (300 if args.quick else 5000), seed=args.seed,
                       nonstationary="ignore")
        _, t_fit = bm.timed(model.fit, data.train.x[small], data.train.y[small])
        rows.append(("cnn: fit (the Fig 2 CNN's default schedule)", t_fit,
                     f"n = {model.n_train_}, p = {model.n_params}, gradient norm {model.grad_norm_:.1e}"))
        per_example = cnn_flops_per_example(model.keras_model_)
        # a Gauss-Newton product: forward, forward-mode J v, reverse J^T u: ~4 forward passes
        rows += bm.hvp_bound_rows("cnn", GaussNewtonOperator(model), rates, columns=(1, 8), repeat=1,
                                  flops_per_hvp=4.0 * per_example * model.n_train_)
        named = [p for p in args.cnn_preconditioners if p != "none"]
        for k in args.cnn_tests if not args.quick else [1]:
            V = model.test_gradients(data.test.x[:k], data.test.y[:k]).T
            only_named = args.cnn_named_only is not None and k >= args.cnn_named_only
            rows += bm.preconditioner_rows("cnn", model, V[:, 0] if k == 1 else V, 0.01, 1e-8,
                                           curvature="gauss-newton", named=named,
                                           kron=kron if args.cnn_ekfac and not only_named else (),
                                           mixed_ranks=[] if only_named else [30] if not args.quick else [10],
                                           plain=not (args.cnn_mixed_only or only_named),
                                           ranks=[] if args.cnn_mixed_only or only_named else
                                           [r for r in args.cnn_ranks if not args.quick or r <= 30] or [10])
        if args.cnn_hessian:  # the figure's rule: 1.5 x the negative smallest eigenvalue, at least 0.01
            lmin = HessianOperator(model).eigenvalue_bounds(tol=1e-2, maxiter=40 if args.quick else 200)[0]
            rows.append(("cnn: smallest eigenvalue of H (Lanczos, tol 1e-2)", float("nan"), f"{lmin:.4g}"))
            damping = max(0.01, -1.5 * lmin)
            V = model.test_gradients(data.test.x[:1], data.test.y[:1]).T[:, 0]
            damping = definite_damping(model, V, damping)
            rows += bm.preconditioner_rows("cnn", model, V, damping, 1e-8, curvature="hessian", kron=(),
                                           named=named, ranks=[], plain=False)
    if "keras_head" in args.models:
        rows += keras_head_rows(args)
    lines += [f"| {label} | {t:.3f} | {note} |" for label, t, note in rows]
    from influence.utils import atomic_path

    with atomic_path(exp.output("BENCHMARK.md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    seconds = np.array([r[1] for r in rows], dtype=float)
    exp.save_arrays(stage_seconds=seconds, stage_labels=np.array([r[0] for r in rows]))
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.3 * max(len(rows), 4) + 1))
    ax.barh(np.arange(len(rows)), np.maximum(seconds, 1e-4))
    ax.set_yticks(np.arange(len(rows)), [r[0][:90] for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set(xscale="log", xlabel="seconds", title="preconditioned CG and product costs" + (" (quick)" if args.quick
                                                                                          else ""))
    fig.tight_layout()
    exp.save_figure(fig)
    metrics = {f"seconds.{r[0]}": float(r[1]) for r in rows}
    metrics.update({f"rate.{k}": v for k, v in rates.items()})
    exp.write_metrics(metrics, paper={k: None for k in metrics},
                      notes="Timings of this machine; the paper reports none. Tables in BENCHMARK.md.")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(run(NAME, __doc__, main, add_arguments))
