#!/usr/bin/env python
"""Benchmark and demo: the training-gradient index on the classic Keras MNIST convnet.

The model (Keras's MNIST example): Conv2D 32 3x3 relu - Conv2D 64 3x3 relu - MaxPool 2 -
Dropout 0.25 - Flatten - Dense 128 relu - Dropout 0.5 - Dense 10 logits; 1,199,882
parameters; one epoch of Adam (batches of 128) on all 60,000 MNIST training images, wrapped
as it is (``KerasModel``, every weight in theta, no weight decay).

Index: ``GradientIndex(proj_dim=4096, fisher="mc")``: the Kronecker (LoGra) projection of the
four layers on the top eigenvectors of their K-FAC factors (estimated on 2,500 images; metrics:
each layer's k_in x k_out), the projected Fisher from one sampled label
per image, damping 0.1 x its mean eigenvalue. Timed: the build (one pass over the 60,000
images, then the curvature and its eigendecomposition), scoring ``--n-test`` test images
against every training image, the peak resident memory of the run. In the same run the
library's per-query estimators on 10 test images (``grad_dot``, ``trak`` with proj_dim 2048,
EK-FAC influence), each in a child process stopped after ``--baseline-timeout`` seconds or
above ``--baseline-memory`` GB (what they take, or how far they got, is reported).

Quality (``--quality``): a Keras MLP (784-128-64-10 relu, 109,386 parameters, Adam) on 5,000
MNIST images, where CG on the Gauss-Newton matrix is affordable: the index at k = 4096
against CG on G at the same damping, as the mean Spearman correlation of the two rows of
influence over 20 test images (the PCA projection and the random one, each with the exact and
the sampled-label curvature).

Demo (the figure): for three test images, the 10 most helpful and most harmful training
images by the index; and the training images with the largest self-influence, the index's
mislabel candidates (Fig 6's check order).

--quick: 3,000 training images, k = 512, 50 test images, 20 s per baseline, quality on
1,000 images with k = 512.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from influence.evaluation.index_benchmark import (baseline_child, convnet, figure, mnist_all, quality,
                                                  rss_gb, run_baseline)
from influence.experiment import run

NAME = "benchmark_index"
logger = logging.getLogger(NAME)
BASELINES = ("grad_dot", "trak", "ekfac")


def add_arguments(parser):
    parser.add_argument("--n-train", type=int, default=None, help="training images (default 60000; --quick 3000)")
    parser.add_argument("--n-test", type=int, default=None, help="test images scored (default 1000; --quick 50)")
    parser.add_argument("--proj-dim", type=int, default=None, help="k (default 4096; --quick 512)")
    parser.add_argument("--fisher", default="mc", choices=["mc", "empirical", "expectation"],
                        help="the index's curvature (default mc: one sampled label per image)")
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES,
                        help="per-query estimators timed on 10 test images beside the index")
    parser.add_argument("--baseline-timeout", type=float, default=None, help="seconds per baseline (default 300; "
                        "--quick 20)")
    parser.add_argument("--baseline-memory", type=float, default=12.0, help="GB of RSS a baseline may use")
    parser.add_argument("--no-quality", action="store_true", help="skip the CG-on-G quality check")
    parser.add_argument("--index-dir", default=None, help="where the index is kept (default: <out>/index)")
    parser.add_argument("--run-baseline", default=None, help="internal: run one baseline in this (child) process")
    parser.add_argument("--result", default=None, help="internal: the child's result file")
    parser.add_argument("--model-file", default=None, help="internal: the trained convnet the child loads")


def main(exp):
    args = exp.args
    if args.run_baseline:
        return baseline_child(args)
    import keras

    from influence import GradientIndex, KerasModel

    quick = args.quick
    n = args.n_train or (3000 if quick else 60000)
    n_test = args.n_test or (50 if quick else 1000)
    k = args.proj_dim or (512 if quick else 4096)
    timeout = args.baseline_timeout or (20.0 if quick else 300.0)
    args.n_train_used = n
    X, y, Xt, yt = mnist_all(args.data_dir)
    X, y = X[:n], y[:n]
    metrics = {"n_train": n, "n_test": n_test, "k_requested": k}

    net = convnet(args.seed)
    t0 = time.perf_counter()
    net.fit(X, y, epochs=1, batch_size=128, verbose=0)
    metrics["train_epoch_seconds"] = time.perf_counter() - t0
    metrics["test_accuracy"] = float(net.evaluate(Xt, yt, verbose=0)[1])
    net.save(exp.output("convnet.keras"))
    model = KerasModel(net, loss="softmax", weight_decay=0.0).set_training_data(X, y)
    metrics["params"] = int(model.n_params)
    logger.info("convnet: %d parameters, one epoch in %.1fs, test accuracy %.4f", model.n_params,
                metrics["train_epoch_seconds"], metrics["test_accuracy"])

    index_dir = Path(args.index_dir) if args.index_dir else Path(args.out) / "index"
    t0 = time.perf_counter()
    index = GradientIndex(index_dir, proj_dim=k, fisher=args.fisher, seed=args.seed).fit(model)
    metrics["index_pass_seconds"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    index.curvature()
    metrics["index_curvature_seconds"] = time.perf_counter() - t1
    metrics["index_build_seconds"] = time.perf_counter() - t0
    metrics["index_rows_computed"] = index.build_info_["rows_computed"]
    metrics["k"] = index.projection_.k
    metrics["projection"] = index.projection_.kind
    metrics["layers"] = index.projection_.describe().get("layers")
    metrics["damping"] = index.damping_value()
    metrics["index_bytes"] = int(sum(p.stat().st_size for p in index_dir.glob("*.h5")))
    logger.info("index: k = %d, built in %.1fs (pass %.1fs, curvature %.1fs)", metrics["k"],
                metrics["index_build_seconds"], metrics["index_pass_seconds"], metrics["index_curvature_seconds"])

    t0 = time.perf_counter()
    scores = index.influence_matrix(Xt[:n_test], yt[:n_test])
    metrics["query_seconds"] = time.perf_counter() - t0
    logger.info("%d test images x %d training images scored in %.1fs", n_test, n, metrics["query_seconds"])
    t0 = time.perf_counter()
    show = [0, 1, 2]
    ranked = [index.most_influential(Xt[t], yt[t], k=10) for t in show]
    metrics["most_influential_seconds_per_test"] = (time.perf_counter() - t0) / len(show)
    t0 = time.perf_counter()
    selfs = index.self_influence()
    metrics["self_influence_seconds"] = time.perf_counter() - t0
    suspects = np.argsort(selfs)[:10]  # the most negative: points the model can hardly fit
    metrics["peak_rss_gb_index"] = rss_gb()

    rows = []
    for name in args.baselines:
        logger.info("baseline %s on 10 test images (at most %gs, %g GB)", name, timeout, args.baseline_memory)
        res = run_baseline(name, args, timeout, args.baseline_memory, __file__)
        metrics[f"baseline_{name}"] = res
        rows.append((name, res))
    metrics["peak_rss_gb"] = rss_gb()
    if not args.no_quality:
        metrics.update(quality(args, X, y, Xt, yt, quick))

    exp.save_arrays(scores=scores.astype(np.float32), self_influence=selfs, suspects=suspects,
                    helpful=np.stack([r.helpful[:10] for r in ranked]), harmful=np.stack([r.harmful[:10] for r in ranked]))
    figure(exp, X, y, Xt, yt, show, ranked, suspects, selfs)
    print_table(metrics, rows, timeout)
    targets = {} if quick else {"index_build_seconds": "<= 600", "query_seconds": "<= 60", "peak_rss_gb": "<= 6",
                                "quality_spearman_expectation": "reported (ranks like CG on G)"}
    exp.write_metrics(metrics, paper={k_: None for k_ in metrics}, targets=targets,
                      config={"proj_dim": k, "fisher": args.fisher, "seed": args.seed, "baseline_timeout_s": timeout,
                              "baseline_memory_gb": args.baseline_memory, "cores": os.cpu_count()},
                      notes="Not a figure of the paper: the scale benchmark of issue #44 (docs/index.md).")
    keras.backend.clear_session()


def print_table(metrics, rows, timeout):
    print(f"\nclassic Keras convnet, {metrics['params']:,} parameters, {metrics['n_train']:,} training images, "
          f"{os.cpu_count()} cores")
    print(f"  index build (k = {metrics['k']}): {metrics['index_build_seconds']:.1f} s "
          f"(pass {metrics['index_pass_seconds']:.1f} s, curvature {metrics['index_curvature_seconds']:.1f} s)")
    print(f"  {metrics['n_test']} test images scored: {metrics['query_seconds']:.1f} s "
          f"({metrics['query_seconds'] / metrics['n_test'] * 1000:.1f} ms per test image)")
    print(f"  peak RSS {metrics['peak_rss_gb']:.2f} GB")
    for name, res in rows:
        print(f"  {name:9s} 10 test images: {res['status']}, {res['seconds']:.1f} s, peak {res['peak_rss_gb']:.1f} GB")
    if "quality_spearman_expectation" in metrics:
        print(f"  quality (MLP, k = {metrics['quality_k']}): Spearman vs CG on G "
              f"{metrics['quality_spearman_expectation']:.3f} (projected G), {metrics['quality_spearman_mc']:.3f} (MC); "
              f"random projection {metrics['quality_spearman_expectation_random']:.3f} / "
              f"{metrics['quality_spearman_mc_random']:.3f}")



if __name__ == "__main__":
    sys.exit(run(NAME, __doc__, main, add_arguments))
