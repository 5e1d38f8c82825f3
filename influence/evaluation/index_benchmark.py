"""The gradient index's scale benchmark on the classic Keras MNIST convnet
(``scripts/benchmark_index.py``): the model, the per-query baselines run in child processes
with a time and memory cap, the CG-on-G quality check, and the demo figure."""
from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

def rss_gb() -> float:
    """Peak resident memory of this process so far, GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2



def mnist_all(data_dir):
    from influence.datasets.mnist import load_mnist

    d = load_mnist(data_dir, flatten=False)
    X = np.concatenate([d.validation.x, d.train.x])  # all 60,000 training images, in the files' order
    y = np.concatenate([d.validation.y, d.train.y])
    return X, y, d.test.x, d.test.y



def convnet(seed):
    import keras

    keras.utils.set_random_seed(seed)
    net = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.MaxPooling2D(2), keras.layers.Dropout(0.25), keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"), keras.layers.Dropout(0.5), keras.layers.Dense(10)])
    net.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"])
    return net



def baseline_child(args):
    """``--run-baseline NAME``: one per-query estimator on 10 test images, result to ``--result``."""
    import keras

    from influence import KerasModel
    from influence.estimators import get_estimator

    X, y, Xt, yt = mnist_all(args.data_dir)
    n = args.n_train or 60000
    net = keras.models.load_model(args.model_file)
    model = KerasModel(net, loss="softmax", weight_decay=0.0, progress=False).set_training_data(X[:n], y[:n])
    if args.run_baseline == "grad_dot":
        est = get_estimator("grad_dot")
    elif args.run_baseline == "trak":
        est = get_estimator("trak", proj_dim=2048)
    else:
        est = get_estimator("influence", solver="ekfac", curvature="gauss-newton", damping=1e-3)
    t0 = time.perf_counter()
    scores = est.fit(model).influence_matrix(Xt[:10], yt[:10])
    Path(args.result).write_text(json.dumps({"seconds": time.perf_counter() - t0, "shape": list(scores.shape),
                                             "peak_rss_gb": rss_gb()}))



def run_baseline(name, args, timeout, memory_gb, script):
    """Run one baseline in a child process; stop it at ``timeout`` s or ``memory_gb`` of RSS."""
    scratch = Path(args.out) / f"baseline-{name}"  # the child's own output folder (the contract clears it)
    result = Path(args.out) / f"baseline-{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, script, "--run-baseline", name, "--result", str(result), "--out", str(scratch),
           "--model-file", str(Path(args.out) / "convnet.keras"), "--log-level", "WARNING",
           "--n-train", str(args.n_train_used)] + (["--data-dir", args.data_dir] if args.data_dir else [])
    env = {**os.environ, "INFLUENCE_PROGRESS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, why = 0.0, None
    while proc.poll() is None:
        time.sleep(0.5)
        try:
            rss = int(next(ln for ln in open(f"/proc/{proc.pid}/status") if ln.startswith("VmRSS")).split()[1])
            peak = max(peak, rss / 1024 ** 2)
        except (OSError, StopIteration):
            pass
        if peak > memory_gb:
            why = f"stopped at {peak:.1f} GB of memory (cap {memory_gb:g} GB)"
        elif time.perf_counter() - t0 > timeout:
            why = f"not finished in {timeout:g} s"
        if why:
            proc.kill()
            proc.wait()
            break
    err = proc.stderr.read() if proc.stderr else ""
    if why is None and proc.returncode != 0:
        why = f"failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}"
    if why is None:
        out = json.loads(result.read_text())
        result.unlink(missing_ok=True)
        return {"seconds": out["seconds"], "status": "done", "peak_rss_gb": max(peak, out["peak_rss_gb"])}
    return {"seconds": time.perf_counter() - t0, "status": why, "peak_rss_gb": peak}



def quality(args, X, y, Xt, yt, quick):
    """Mean Spearman over 20 test images between the index and CG on G (a Keras MLP)."""
    import keras
    import scipy.stats

    from influence import CGSolver, GradientIndex, InfluenceFunction, KerasModel

    n = 1000 if quick else 5000
    k = 512 if quick else 4096
    keras.utils.set_random_seed(args.seed)
    net = keras.Sequential([keras.Input((784,)), keras.layers.Dense(128, activation="relu"),
                            keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
    net.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    Xf, Xtf = X[:n].reshape(n, -1), Xt[:20].reshape(20, -1)
    net.fit(Xf, y[:n], epochs=10, batch_size=64, verbose=0)
    model = KerasModel(net, loss="softmax", weight_decay=0.0, progress=False).set_training_data(Xf, y[:n])
    damping = 1e-3
    t0 = time.perf_counter()
    cg = InfluenceFunction(CGSolver(damping=damping, tol=1e-4, maxiter=1000, on_failure="warn"),
                           curvature="gauss-newton").fit(model).influence_matrix(Xtf, yt[:20])
    t_cg = time.perf_counter() - t0
    out = {"quality_n_train": n, "quality_k": k, "quality_damping": damping, "quality_cg_seconds": t_cg,
           "quality_params": int(model.n_params)}
    for projection in ("auto", "random"):
        for fisher in ("expectation", "mc"):
            name = fisher if projection == "auto" else f"{fisher}_random"
            t0 = time.perf_counter()
            index = GradientIndex(Path(args.out) / f"quality-index-{name}", proj_dim=k, fisher=fisher,
                                  damping=damping, projection=projection).fit(model)
            got = index.influence_matrix(Xtf, yt[:20])
            rhos = [scipy.stats.spearmanr(a, b)[0] for a, b in zip(got, cg)]
            out[f"quality_spearman_{name}"] = float(np.mean(rhos))
            out[f"quality_index_seconds_{name}"] = time.perf_counter() - t0
            logger.info("quality: index (%s projection, %s, k = %d) vs CG on G: mean Spearman %.3f over 20 test "
                        "images", index.projection_.kind, fisher, k, np.mean(rhos))
    return out



def figure(exp, X, y, Xt, yt, show, ranked, suspects, selfs):
    import matplotlib.pyplot as plt

    from influence.style import apply_style

    apply_style()
    cols = 11
    fig, axes = plt.subplots(2 * len(show) + 1, cols, figsize=(cols * 1.1, (2 * len(show) + 1) * 1.25))
    for r, (t, rank) in enumerate(zip(show, ranked)):
        for row, (ids, what) in enumerate(((rank.helpful, "helpful"), (rank.harmful, "harmful"))):
            ax_row = axes[2 * r + row]
            ax_row[0].imshow(Xt[t, :, :, 0], cmap="gray")
            ax_row[0].set_title(f"test {t} ({yt[t]})\n{what}", fontsize=7)
            for j in range(1, cols):
                ax = ax_row[j]
                if j - 1 < len(ids):
                    i = ids[j - 1]
                    ax.imshow(X[i, :, :, 0], cmap="gray")
                    ax.set_title(f"#{i} ({y[i]})", fontsize=7, color="tab:green" if y[i] == yt[t] else "tab:red")
    last = axes[-1]
    last[0].set_title("largest\nself-influence", fontsize=7)
    for j in range(1, cols):
        i = suspects[j - 1]
        last[j].imshow(X[i, :, :, 0], cmap="gray")
        last[j].set_title(f"#{i} ({y[i]})", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("Gradient index on the Keras MNIST convnet: most helpful / harmful training images, and "
                 "mislabel candidates", fontsize=9)
    fig.tight_layout()
    exp.save_figure(fig)
    plt.close(fig)

