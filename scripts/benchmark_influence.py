#!/usr/bin/env python
"""Benchmark: time to score every MNIST training point on one test point.

Model: the Fig 2 logistic regression (10 classes, 55,000 training images, 7,840
parameters). For each inverse-HVP solver (exact Cholesky, CG, LiSSA with the paper's
settings) it times s_test, then the scoring of all training points,
-I_up,loss = s_test . g(z_i). Scoring runs as one forward-mode JVP per batch; it is
compared with the original code's approach, one gradient per training point in a Python
loop (timed on a subset and scaled to n), and with vectorised per-example gradients.
All numbers come from this one run; ratios are printed, not asserted.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

from influence import LogisticRegression  # noqa: E402
from influence.mnist import load_mnist  # noqa: E402


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--test-idx", type=int, default=8)
    parser.add_argument("--loop-subset", type=int, default=1000, help="points timed in the loop baseline")
    parser.add_argument("--skip-exact", action="store_true", help="skip the explicit 7,840 x 7,840 Hessian")
    parser.add_argument("--out", default="output/BENCHMARK.md", help="where the timing table is written")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

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

    idx = int(np.argmax(np.abs(scores_ref)))
    _, t_loo = timed(model.retrain_without, [idx])
    rows.append(("LOO re-training, one point (warm-started L-BFGS)", t_loo, ""))

    width = max(len(r[0]) for r in rows)
    print(f"\nMNIST logistic regression, n = {n}, p = {model.n_params}, test point {args.test_idx}")
    print(f"{'stage'.ljust(width)}  {'seconds':>9}  notes")
    for label, t, note in rows:
        print(f"{label.ljust(width)}  {t:9.3f}  {note}")
    t_jvp = float(np.median(score_times))
    print(f"\nspeed-up of forward-mode scoring over the per-example loop: {t_loop / t_jvp:.0f}x "
          f"(JVP {t_jvp:.3f} s vs loop {t_loop:.1f} s)")
    print(f"speed-up over vectorised per-example gradients: {t_vec / t_jvp:.1f}x")

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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
    with atomic_path(args.out) as tmp:
        tmp.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
