#!/usr/bin/env python
"""Fig 2 (right): influence vs leave-one-out retraining for a non-convex CNN on MNIST.

Model: the all-convolutional AllCNN (2,616 parameters, tanh, weight decay 0.001) on the
paper's small MNIST, a seeded random 10% (5,500 images) of the 55,000 training images.
Training (see influence.all_cnn): minibatch Adam (batch 500, step decay; learning rate
1e-3 for the 10k-step CPU schedule, the paper's 1e-4 with --paper-schedule), then
full-batch L-BFGS to the plateau. Influence: CG on H + 0.01 I (the
paper's damping) for one test point (default 6558). The 100 training points of largest
|predicted change| are each removed and the model re-trained from the fitted parameters
by the same L-BFGS run; the actual change in test loss is measured against a control
re-training on the full set, so the optimiser's drift cancels.

--quick: fewer Adam and L-BFGS steps and 10 removals (no correlation threshold).
--paper-schedule: the original's 500k Adam steps (a GPU job), then the same L-BFGS phase.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from influence import leave_one_out  # noqa: E402
from influence.all_cnn import AllCNN  # noqa: E402
from influence.experiment import run  # noqa: E402
from influence.mnist import load_mnist  # noqa: E402

NAME = "fig2_cnn_loo"
logger = logging.getLogger(NAME)


def add_arguments(parser):
    parser.add_argument("--test-idx", type=int, default=6558, help="index into the MNIST test set (paper: 6558)")
    parser.add_argument("--num-remove", type=int, default=None, help="default 100 (--quick: 10)")
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="Adam learning rate (default 1e-3 for the short CPU schedule; 1e-4 with --paper-schedule)")
    parser.add_argument("--adam-steps", type=int, default=None, help="default 10000 (--quick: 1000)")
    parser.add_argument("--lbfgs-iter", type=int, default=None, help="default 500 (--quick: 100)")
    parser.add_argument("--retrain-iter", type=int, default=None, help="L-BFGS iterations per LOO re-training "
                        "(default 100, --quick: 30)")
    parser.add_argument("--paper-schedule", action="store_true", help="500k Adam steps as the original (GPU)")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--jobs", type=int, default=None)


def main(exp):
    import matplotlib.pyplot as plt

    args = exp.args
    data = load_mnist(args.data_dir, flatten=False)
    small = np.sort(np.random.default_rng(args.seed).choice(len(data.train), len(data.train) // 10, replace=False))
    Xtr, ytr = data.train.x[small], data.train.y[small]
    xt, yt = data.test.x[args.test_idx:args.test_idx + 1], data.test.y[args.test_idx:args.test_idx + 1]
    if args.paper_schedule:
        adam_steps, decay = 500_000, (0.22, 0.44)  # the original decayed at epochs 1e4 and 2e4 of 11 steps each
    else:
        adam_steps, decay = (args.adam_steps or (1000 if args.quick else 10000)), (0.5, 0.75)
    lbfgs_iter = args.lbfgs_iter or (100 if args.quick else 500)
    retrain_iter = args.retrain_iter or (30 if args.quick else 100)
    num_remove = args.num_remove or (10 if args.quick else 100)

    lr = args.learning_rate or (1e-4 if args.paper_schedule else 1e-3)
    model = AllCNN(weight_decay=0.001, learning_rate=lr, adam_steps=adam_steps, train_batch_size=500,
                   decay_fractions=decay, lbfgs_iter=lbfgs_iter, retrain_iter=retrain_iter, dtype=args.dtype,
                   seed=args.seed, progress=True)
    model.fit(Xtr, ytr)
    test_acc = model.score(data.test.x, data.test.y)
    logger.info("test accuracy %.4f, training objective %.5f, gradient norm %.2e", test_acc, model.objective(),
                model.grad_norm_)
    lmin, lmax = model.hessian_eigenvalue_bounds(tol=1e-2, maxiter=60 if args.quick else 200)
    res = model.s_test(xt, yt, solver="cg", damping=args.damping, tol=1e-8, maxiter=2000)
    pred = model.influence_scores(res.x) / model.n_train_  # -I_up,loss / n
    idx = np.argsort(-np.abs(pred))[:num_remove]
    loo = leave_one_out(model, xt, yt, idx, pred[idx], n_jobs=args.jobs, control=True)
    metrics = {
        "pearson": loo.pearson, "spearman": loo.spearman, "num_removed": int(num_remove),
        "test_accuracy": test_acc, "train_objective": model.objective(), "grad_norm_at_end": model.grad_norm_,
        "hessian_min_eig": lmin, "hessian_max_eig": lmax, "cg_iterations": res.iterations,
        "cg_residual": res.residual, "control_drift": loo.info["control_drift"], "loo_wall_time_s": loo.wall_time_s,
        "n_params": model.n_params, "n_train": model.n_train_,
    }
    exp.save_arrays(removed_indices=idx, actual_loss_diffs=loo.actual, predicted=pred[idx], predicted_all=pred,
                    train_subset=small, theta=model.theta_, s_test=res.x)
    fig, ax = plt.subplots(figsize=(5, 4.8))
    lim = 1.1 * max(np.abs(loo.actual).max(), np.abs(pred[idx]).max())
    ax.plot([-lim, lim], [-lim, lim], "--", color="grey", lw=1)
    ax.scatter(loo.actual, pred[idx], s=10, alpha=0.7)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="Actual diff in loss", ylabel="Predicted diff in loss",
           title=f"CNN, test point {args.test_idx}: Pearson R = {loo.pearson:.2f}")
    ax.set_aspect("equal")
    fig.tight_layout()
    exp.save_figure(fig)
    exp.write_metrics(
        metrics, paper={"pearson": 0.86, "spearman": None},
        targets={} if args.quick else {"pearson": ">= 0.80"},
        config={"test_idx": args.test_idx, "damping": args.damping, "adam_steps": adam_steps, "learning_rate": lr,
                "decay_fractions": decay, "lbfgs_iter": lbfgs_iter, "retrain_iter": retrain_iter, "dtype": args.dtype,
                "retraining": "L-BFGS restarted from the fitted parameters, control-subtracted"},
        notes="Paper: Pearson R = 0.86 (500k Adam steps; LOO by 30k more steps). Here training ends with "
              "full-batch L-BFGS and LOO re-training restarts that L-BFGS (see influence/all_cnn.py).")


if __name__ == "__main__":
    sys.exit(run(NAME, __doc__.split("\n")[1], main, add_arguments))
