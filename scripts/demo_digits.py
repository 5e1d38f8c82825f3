#!/usr/bin/env python
"""Demo on scikit-learn's bundled digits (no download): which training images drive a prediction.

Fits a 10-class logistic regression (weight decay 0.01) on 1,200 of the 8x8 digits, picks
the misclassified test image with the highest loss (or --test-idx), and computes the
influence of every training image with the exact, CG and LiSSA solvers. The 30 most
influential points are then removed one at a time and the model re-fitted, to show
predicted vs actual change in test loss. The figure shows the test image, the most
helpful and most harmful training images, and the LOO scatter.

Your own Keras model, the same way: a small MLP (64 -> 32 tanh -> 10 logits) trained
with Keras's own fit (Adam, 30 epochs), wrapped in influence.KerasModel with its last
layer as theta (the hidden layer frozen), the last layer re-fitted to the optimum, and
the same leave-one-out check on the same test image (metrics keras_*).

A Keras convnet the way the Keras documentation writes one (Conv2D 8 relu - MaxPooling -
Flatten - Dropout - Dense 10 logits, float32) trained by ``model.fit`` (Adam, 40 epochs),
wrapped as it is (all 810 parameters, no re-fit), influence on the Gauss-Newton matrix
(CG, damping 0.01), and leave-one-out of its 30 most influential training images by
continued Keras training (``KerasRetrain``: 20 epochs of Adam at 1e-3, batches of 64, the
same batch sequence for every re-fit) against a control re-fit on the full set
(metrics keras_cnn_*).

Group removal: the linear datamodeling score (LDS) of the influence of every training
image on 10 test images, over 20 re-fits (10 with --quick) each without a random half
of the training set (metrics lds_*): exact solves, and the rank-20 Arnoldi solver with
the dropped spectrum filled by the weight decay.
"""
from __future__ import annotations

import logging
import sys

import numpy as np

from influence.experiment import run

NAME = "demo_digits"
logger = logging.getLogger(NAME)


def add_arguments(parser):
    parser.add_argument("--test-idx", type=int, default=None, help="index into the held-out digits "
                        "(default: the misclassified one with the highest loss)")


def keras_last_layer(X_train, y_train, X_test, y_test, xt, yt, n_remove, seed):
    """A Keras MLP trained by Keras; influence of its last layer (KerasModel); LOO check."""
    import keras

    from influence import KerasModel, leave_one_out

    keras.utils.set_random_seed(seed)
    net = keras.Sequential([keras.Input((X_train.shape[1],)), keras.layers.Dense(32, activation="tanh"),
                            keras.layers.Dense(10, name="logits")])
    net.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    net.fit(X_train, y_train, epochs=30, batch_size=64, verbose=0)
    model = KerasModel(net, loss="softmax", trainable=["logits"], weight_decay=0.01).fit(X_train, y_train)
    res = model.s_test(xt, yt, solver="cg", tol=1e-6)
    pred = model.gradient_dots(res.x) / model.n_train_
    idx = np.argsort(-np.abs(pred))[:n_remove]
    loo = leave_one_out(model, xt, yt, idx, pred[idx], n_jobs=1)
    return {"keras_test_accuracy": float(np.mean(model.predict(X_test) == y_test)), "keras_n_params": model.n_params,
            "keras_grad_norm": model.grad_norm_, "keras_cg_residual": res.residual,
            "keras_loo_pearson": loo.pearson, "keras_loo_spearman": loo.spearman}, loo


def keras_convnet(X_train, y_train, X_test, y_test, xt, yt, n_remove, seed, quick):
    """A Keras-docs-style convnet trained by Keras; influence on G; LOO by continued Keras
    training with a control re-fit."""
    import keras

    from influence import KerasModel, leave_one_out
    from influence.models.keras_model import KerasRetrain

    keras.utils.set_random_seed(seed)
    net = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="relu"),
                            keras.layers.MaxPooling2D(2), keras.layers.Flatten(), keras.layers.Dropout(0.25),
                            keras.layers.Dense(10)])
    net.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    net.fit(X_train, y_train, epochs=40, batch_size=64, verbose=0)
    model = KerasModel(net, loss="softmax", weight_decay=1e-3, seed=seed,
                       retrain=KerasRetrain(epochs=5 if quick else 20, batch_size=64, seed=seed + 1,
                                            learning_rate=1e-3))
    model.set_training_data(X_train, y_train)
    res = model.s_test(xt, yt, solver="cg", curvature="gauss-newton", damping=0.01, use_cache=False)
    pred = model.gradient_dots(res.x) / model.n_train_
    idx = np.argsort(-np.abs(pred))[:n_remove]
    loo = leave_one_out(model, xt, yt, idx, pred[idx], n_jobs=1, control=True)
    return {"keras_cnn_test_accuracy": float(np.mean(model.predict(X_test) == y_test)),
            "keras_cnn_n_params": model.n_params, "keras_cnn_grad_norm": float(np.linalg.norm(model.gradient())),
            "keras_cnn_cg_iterations": res.iterations, "keras_cnn_cg_residual": res.residual,
            "keras_cnn_control_drift": loo.info["control_drift"],
            "keras_cnn_loo_pearson": loo.pearson, "keras_cnn_loo_spearman": loo.spearman}, loo


def main(exp):
    from influence import LogisticRegression, leave_one_out, linear_datamodeling_score
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
        preds[solver] = model.gradient_dots(res.x) / model.n_train_  # -I_up,loss / n
        results[solver] = res
    n_remove = 20 if args.quick else 30
    idx = np.argsort(-np.abs(preds["cg"]))[:n_remove]
    loo = leave_one_out(model, xt, yt, idx, preds["cg"][idx], n_jobs=1)

    # group removal: LDS over re-fits without random halves of the training set
    lds_tests = np.concatenate([[t], np.setdiff1d(np.arange(10), [t])[:9]])
    Xq, yq = X[te][lds_tests], y[te][lds_tests]
    n_subsets = 10 if args.quick else 20
    lds = {name: linear_datamodeling_score(model, Xq, yq, model.influence_matrix(Xq, yq, solver=name, **opts),
                                           n_subsets=n_subsets, fraction=0.5, seed=args.seed, n_jobs=1)
           for name, opts in (("exact", {}), ("arnoldi", {"rank": 20, "fill": model.weight_decay}))}

    keras_metrics, keras_loo = keras_last_layer(X[tr], y[tr], X[te], y[te], xt, yt, n_remove, args.seed)
    images = X.reshape(-1, 8, 8, 1).astype(np.float32)
    cnn_metrics, cnn_loo = keras_convnet(images[tr], y[tr], images[te], y[te], images[te][t:t + 1], yt, 30,
                                         args.seed, args.quick)

    metrics = {"test_accuracy": acc, "test_idx": t, "test_label": int(yt[0]),
               "predicted_label": int(model.predict(xt)[0]), "loo_pearson_cg": loo.pearson,
               "loo_spearman_cg": loo.spearman,
               "loo_pearson_lissa": float(st.pearsonr(loo.actual, preds["lissa"][idx])[0]),
               "max_abs_diff_cg_vs_exact": float(np.max(np.abs(preds["cg"] - preds["exact"]))),
               "pearson_lissa_vs_exact_all": float(np.corrcoef(preds["lissa"], preds["exact"])[0, 1])}
    metrics.update({"lds_exact": lds["exact"].score, "lds_arnoldi_rank20_fill": lds["arnoldi"].score,
                    "lds_n_subsets": n_subsets})
    metrics.update(keras_metrics)
    metrics.update(cnn_metrics)
    for name, res in results.items():
        metrics[f"{name}_residual"] = res.residual
        metrics[f"{name}_time_s"] = res.time_s
    exp.save_arrays(train_indices=tr, test_indices=te, removed=idx, actual=loo.actual,
                    keras_removed=keras_loo.indices, keras_actual=keras_loo.actual,
                    keras_predicted=keras_loo.predicted, keras_cnn_removed=cnn_loo.indices,
                    keras_cnn_actual=cnn_loo.actual, keras_cnn_predicted=cnn_loo.predicted, lds_test_indices=te[lds_tests],
                    lds_removed=lds["exact"].removed, lds_actual=lds["exact"].actual,
                    lds_predicted_exact=lds["exact"].predicted, lds_predicted_arnoldi=lds["arnoldi"].predicted,
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
    exp.write_metrics(metrics, paper={}, targets={"loo_pearson_cg": ">= 0.95", "keras_loo_pearson": ">= 0.95",
                                                  "keras_cnn_loo_pearson": ">= 0.8", "lds_exact": ">= 0.8"},
                      config={"n_train": 1200, "weight_decay": 0.01, "n_removed": int(n_remove)},
                      notes="Not a paper figure: a demo that always runs (scikit-learn's bundled digits).")
    logger.info("digits demo: test accuracy %.3f, LOO Pearson %.4f, LDS %.3f (Arnoldi rank 20: %.3f); Keras MLP "
                "(last layer) test accuracy %.3f, LOO Pearson %.4f; Keras convnet (G, LOO by continued Keras "
                "training) test accuracy %.3f, LOO Pearson %.4f", acc, loo.pearson, metrics["lds_exact"],
                metrics["lds_arnoldi_rank20_fill"], metrics["keras_test_accuracy"], metrics["keras_loo_pearson"],
                metrics["keras_cnn_test_accuracy"], metrics["keras_cnn_loo_pearson"])


if __name__ == "__main__":
    sys.exit(run(NAME, __doc__, main, add_arguments))
