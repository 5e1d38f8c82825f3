"""dattri's MNIST attribution benchmark (TRAIS-Lab/dattri 0.3.0), run with Keras and this library.

Protocol (dattri's ``benchmark/``): MNIST-10, train = the first 5,000 training images, test =
the first 500 test images, pixels ``(x / 255 - 0.1307) / 0.3081``. Two models, trained by
plain minibatch SGD on the mean cross-entropy (no weight decay):

- ``lr``: Dense(784 -> 10); SGD lr 0.01, 20 epochs, batch 32;
- ``mlp``: 784-128-64-10, ReLU, dropout 0.1 after each hidden layer; SGD lr 0.01, momentum 0.9,
  50 epochs, batch 64.

Ground truth: ``S`` random halves (2,500 points) of the training set, one model trained on each
with its own seed; target ``y[s, t]`` = test point t's loss under subset model s. For an
attribution matrix ``A`` (n_test, n_train) in ``I_up,loss``'s sign (positive = harmful), the
linear datamodeling score of test point t is the Spearman correlation over the subsets of
``sum_{i in S_s} A[t, i]`` with ``y[s, t]``; the LDS is its mean over test points (reported
with a 95% normal interval, ``1.96 sd / sqrt(n_test)``).

Keras vs PyTorch (dattri's models): the layers here are initialised as PyTorch's ``nn.Linear``
(kernel and bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), SGD with momentum is PyTorch's up to
the sign convention of the velocity (identical steps at a constant learning rate), the loss
is the batch-mean cross-entropy; the dropout masks and the batch order come from TensorFlow's
seeded generators, so no single model equals dattri's bit for bit.

Honest hyperparameters: besides the reported points and subsets, ``n_val`` further test points
(``test[n_test : n_test + n_val]``) and ``n_val_subsets`` further subset models form a
validation split; each method's damping (or other grid value) is picked on it and the LDS on
the reported split is reported at that value. dattri's own protocol picks on the reported LDS;
that number is reported beside it ("LDS-picked").
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)

MEAN, STD = 0.1307, 0.3081
PROTOCOL = {
    "lr": dict(hidden=(), dropout=0.0, lr=0.01, momentum=0.0, epochs=20, batch=32),
    "mlp": dict(hidden=(128, 64), dropout=0.1, lr=0.01, momentum=0.9, epochs=50, batch=64),
}
#: dattri's published LDS (README benchmark charts, read off to +-0.01; LR IF-CG 0.767 in its
#: experiments/README), keyed by method family
PUBLISHED = {
    "lr": {"IF explicit": 0.80, "IF CG": 0.80, "IF LiSSA": 0.79, "IF Arnoldi": 0.31, "TracIn": 0.33,
           "grad-dot": 0.33, "grad-cos": 0.19, "TRAK-1": 0.42, "TRAK-10": 0.64, "TRAK-50": 0.68},
    "mlp": {"IF CG": 0.26, "IF LiSSA": 0.14, "IF Arnoldi": 0.09, "TracIn": 0.15, "grad-dot": 0.10,
            "TRAK-1": 0.11, "TRAK-10": 0.33, "TRAK-50": 0.45},
}
PUBLISHED_SOURCE = ("dattri 0.3.0 README benchmark charts (values read off, +-0.01); LR IF-CG 0.767 in "
                    "dattri's experiments/README")


# ---------------------------------------------------------------------- data and models
def dattri_mnist(data_dir=None, n_train: int = 5000, n_test: int = 500, n_val: int = 100):
    """``(X_train, y_train, X_eval, y_eval)``: the first ``n_train`` training images and the first
    ``n_test + n_val`` test images (reported, then validation), normalised, flattened, float32."""
    from ..datasets.mnist import load_mnist

    if not 1 <= n_train <= 5000:
        raise ValueError(f"n_train must be in [1, 5000] (dattri's training set), got {n_train}")
    d = load_mnist(data_dir, flatten=True)  # its validation split is the first 5,000 training images

    def norm(x):
        return ((x - MEAN) / STD).astype(np.float32)

    m = n_test + n_val
    return norm(d.validation.x[:n_train]), d.validation.y[:n_train], norm(d.test.x[:m]), d.test.y[:m]


def build_network(kind: str, seed: int, dtype: str = "float32"):
    """dattri's LR or MLP as a Keras Sequential of logits, PyTorch-style initialisation (seeded)."""
    import keras

    cfg = PROTOCOL[kind]
    keras.utils.set_random_seed(int(seed))
    layers = [keras.Input((784,), dtype=dtype)]
    sizes = (784,) + tuple(cfg["hidden"]) + (10,)
    for j, units in enumerate(sizes[1:]):
        lim = 1.0 / np.sqrt(sizes[j])
        last = j == len(sizes) - 2
        layers.append(keras.layers.Dense(units, activation=None if last else "relu", dtype=dtype,
                                         kernel_initializer=keras.initializers.RandomUniform(-lim, lim),
                                         bias_initializer=keras.initializers.RandomUniform(-lim, lim)))
        if not last and cfg["dropout"]:
            layers.append(keras.layers.Dropout(cfg["dropout"], dtype=dtype))
    net = keras.Sequential(layers)
    net.compile(keras.optimizers.SGD(cfg["lr"], momentum=cfg["momentum"]),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return net


def train_network(kind: str, X, y, seed: int, epochs: int | None = None, checkpoints: int = 0):
    """Train dattri's model on ``(X, y)``; returns ``(net, [(weights, lr) at evenly spaced epochs])``."""
    import keras

    cfg = PROTOCOL[kind]
    epochs = cfg["epochs"] if epochs is None else int(epochs)
    net = build_network(kind, seed)
    marks = set(np.unique(np.linspace(0, epochs, checkpoints + 1)[1:].round().astype(int))) if checkpoints else set()
    saved = []

    class Save(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 in marks:
                saved.append(([v.numpy().copy() for v in self.model.trainable_variables], cfg["lr"]))

    net.fit(X, y, epochs=epochs, batch_size=cfg["batch"], shuffle=True, verbose=0, callbacks=[Save()])
    return net, saved


def test_losses(net, X, y) -> np.ndarray:
    """Per-example cross-entropy of ``net`` (inference mode) on ``(X, y)``, float64."""
    logits = np.concatenate([np.asarray(net(X[a:a + 1024], training=False), dtype=np.float64)
                             for a in range(0, len(X), 1024)])
    logits -= logits.max(axis=1, keepdims=True)
    return np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(len(y)), y]


def draw_subsets(n_train: int, n_subsets: int, seed: int, fraction: float = 0.5) -> np.ndarray:
    """(n_subsets, n_train) boolean masks, each a seeded random ``fraction`` of the training set."""
    rng = np.random.default_rng([int(seed), 4501])
    size = int(round(fraction * n_train))
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for s in range(n_subsets):
        masks[s, rng.choice(n_train, size, replace=False)] = True
    return masks


def _train_task(kind, X, y, seed, X_eval, y_eval, epochs, checkpoints, keep):
    """Worker: train one model; return its eval losses (and its weights / checkpoints if ``keep``)."""
    from ..parallel import limit_threads

    limit_threads(1)
    net, saved = train_network(kind, X, y, seed, epochs, checkpoints)
    out = {"losses": test_losses(net, X_eval, y_eval)}
    if keep:
        out["weights"] = [w.numpy().copy() for w in net.trainable_variables]
        out["checkpoints"] = saved
    return out


def _pack(result) -> dict:
    arrays = {"losses": result["losses"]}
    for j, w in enumerate(result.get("weights", [])):
        arrays[f"w{j}"] = w
    for c, (ws, _) in enumerate(result.get("checkpoints", [])):
        for j, w in enumerate(ws):
            arrays[f"c{c}_w{j}"] = w
    return arrays


def _unpack(arrays, record) -> dict:
    out = {"losses": arrays["losses"]}
    nw = record.get("n_weights", 0)
    if nw:
        out["weights"] = [arrays[f"w{j}"] for j in range(nw)]
        out["checkpoints"] = [([arrays[f"c{c}_w{j}"] for j in range(nw)], lr)
                              for c, lr in enumerate(record.get("checkpoint_lrs", []))]
    return out


def train_models(kind, X, y, X_eval, y_eval, tasks, journal, n_jobs: int = 1, executor=None,
                 epochs=None, checkpoints: int = 0, desc: str = "models") -> dict:
    """Train each ``(name, row indices, seed, keep)`` task once (journaled: a killed run resumes);
    tasks run on ``executor``, else a local pool of ``n_jobs`` processes (1: here)."""
    from ..parallel import local_pool
    from ..utils import bar

    results, todo = {}, []
    for name, idx, seed, keep in tasks:
        arrays = journal.arrays(name) if name in journal else None
        if arrays is not None:
            results[name] = _unpack(arrays, journal.get(name))
        else:
            todo.append((name, idx, seed, keep))
    if not todo:
        return results
    shown = bar(total=len(todo), desc=f"training {desc}", unit="model")

    def record(name, res):
        journal.add(name, {"n_weights": len(res.get("weights", [])),
                           "checkpoint_lrs": [lr for _, lr in res.get("checkpoints", [])]}, arrays=_pack(res))
        results[name] = res
        shown.update(1)

    args = lambda idx, seed, keep: (kind, X[idx], y[idx], seed, X_eval, y_eval, epochs, checkpoints if keep else 0,
                                    keep)
    pool = executor if executor is not None else (local_pool(n_jobs) if n_jobs > 1 else None)
    try:
        if pool is None:
            for name, idx, seed, keep in todo:
                record(name, _train_task(*args(idx, seed, keep)))
        else:
            futures = {pool.submit(_train_task, *args(idx, seed, keep)): name for name, idx, seed, keep in todo}
            from concurrent.futures import as_completed

            for f in as_completed(futures):
                record(futures[f], f.result())
    finally:
        shown.close()
        if executor is None and pool is not None:
            pool.shutdown()
    return results


# ---------------------------------------------------------------------- the score
def lds_per_test(scores: np.ndarray, masks: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per test point t: Spearman over subsets s of ``sum_{i in S_s} scores[t, i]`` vs ``targets[s, t]``.

    ``scores`` (n_test, n_train) in ``I_up,loss``'s sign, ``masks`` (S, n_train), ``targets``
    (S, n_test). Ties get average ranks; a constant column gives NaN (as scipy's spearmanr)."""
    pred = masks.astype(np.float64) @ np.asarray(scores, dtype=np.float64).T  # (S, n_test)
    return spearman_columns(pred, targets)


def spearman_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``x`` with the same column of ``y`` (over rows)."""
    from scipy.stats import rankdata

    a = rankdata(np.asarray(x, dtype=np.float64), axis=0)
    b = rankdata(np.asarray(y, dtype=np.float64), axis=0)
    a -= a.mean(axis=0)
    b -= b.mean(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=0) / np.where(den > 0, den, 1), np.nan)


def summarize(per_test: np.ndarray) -> tuple[float, float]:
    """``(mean, 95% half-width)`` over the test points (NaNs, from constant columns, dropped)."""
    v = np.asarray(per_test, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(1.96 * v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


# ---------------------------------------------------------------------- methods
@dataclass
class Method:
    """One row of the table: ``score(models, X, y, value) -> (n_test, n_train)`` over a grid of
    ``value`` (the hyperparameter named ``param``), using the first ``members`` trained models."""

    name: str
    family: str | None
    score: Callable
    grid: list = field(default_factory=lambda: [None])
    param: str = ""
    members: int = 1
    picked_from: str | None = None  # an ensemble row takes its value from this single-model row


def _influence(solver, curvature=None, checkpoints=None, **opts):
    """Influence by ``solver`` averaged over the members (:class:`~influence.estimators.Ensemble`),
    or over the first member's ``checkpoints`` (``(theta, lr)`` of its training run) if given."""
    from ..estimators import Ensemble

    def score(models, X, y, value):
        options = dict(opts, solver=solver, curvature=curvature, **({} if value is None else {"damping": value}))
        ens = (Ensemble.from_checkpoints(models[0], checkpoints, "influence", **options) if checkpoints is not None
               else Ensemble("influence", models, **options))
        return ens.fit(models[0]).influence_matrix(X, y)

    score.spec = repr(("influence", solver, curvature, None if checkpoints is None else len(checkpoints),
                       sorted(opts.items())))
    return score


def _checkpoint_ensemble(all_checkpoints, solver, curvature=None, **opts):
    """Influence averaged over every checkpoint of every member's training run (member j's
    ``all_checkpoints[j]``): ``members x checkpoints`` models from ``members`` training runs."""
    from ..estimators import Ensemble

    def score(models, X, y, value):
        options = dict(opts, solver=solver, curvature=curvature, **({} if value is None else {"damping": value}))
        nets = [m.at_theta(theta) for m, cps in zip(models, all_checkpoints) for theta, _ in cps]
        return Ensemble("influence", nets, **options).fit(models[0]).influence_matrix(X, y)

    score.spec = repr(("checkpoint-ensemble", solver, curvature, [len(c) for c in all_checkpoints],
                       sorted(opts.items())))
    return score


def _trak(proj_dim):
    """TRAK over the members with ``damping`` = the grid value (added to ``Phi^T Phi``)."""
    from ..estimators import get_estimator

    def score(models, X, y, value):
        return get_estimator("trak", models=models, proj_dim=proj_dim, damping=value).fit(models[0]) \
            .influence_matrix(X, y)

    score.spec = repr(("trak", proj_dim))
    return score


def _ensemble_of(name, **opts):
    """Estimator ``name`` averaged over the members (:class:`~influence.estimators.Ensemble`)."""
    from ..estimators import Ensemble

    def score(models, X, y, value):
        return Ensemble(name, models, **opts).fit(models[0]).influence_matrix(X, y)

    score.spec = repr(("ensemble", name, sorted(opts.items())))
    return score


def _refit_influence(solver: str = "exact", **opts):
    """Exact influence at the optimum of the L2-regularised objective: each member re-fitted by
    L-BFGS from its SGD weights with weight decay ``value`` (on the kernel, as Keras decays), then
    ``ExactSolver`` with damping 1e-6: the biases are not decayed, and a shift of all ten softmax
    biases changes no prediction (H's null direction, orthogonal to every loss gradient). For
    the convex LR only."""
    from ..estimators import get_estimator

    def score(models, X, y, value):
        total = 0.0
        for m in models:
            r = m.with_config(weight_decay=value)
            r.fit(m.X_train_np_, m.y_train_np_, theta0=m.theta_)
            total = total + get_estimator("influence", solver=solver, damping=1e-6, **opts).fit(r).influence_matrix(X, y)
        return total / len(models)

    score.spec = repr(("refit-exact", 1e-6)) if solver == "exact" and not opts else \
        repr(("refit", solver, 1e-6, sorted(opts.items())))
    return score


def _named(name, **opts):
    from ..estimators import get_estimator

    def score(models, X, y, value):
        if name == "trak":
            return get_estimator("trak", models=models, **opts).fit(models[0]).influence_matrix(X, y)
        if name == "tracin":  # the checkpoints of the first model's training run, as (theta, lr)
            return get_estimator("tracin", checkpoints=opts["checkpoints"]).fit(models[0]).influence_matrix(X, y)
        return get_estimator(name, **opts).fit(models[0]).influence_matrix(X, y)

    score.spec = repr((name, sorted((k, v if k != "checkpoints" else len(v)) for k, v in opts.items())))
    return score


def _index(proj_dim, workdir=None, projection="auto"):
    """The gradient index of each member, kept under ``workdir/index-<member>`` (built once, then
    reopened for every damping: its manifest matches; the damping only enters the solve); an
    ensemble's members (one damping, taken from the one-model row) use temporary indexes, removed
    once scored (each holds ~1.4 GB on the MLP).
    ``projection``: the index's ("auto": PCA of the K-FAC factors; "random": Gaussian Kronecker)."""
    from pathlib import Path

    from ..index import GradientIndex

    def score(models, X, y, value):
        total = 0.0
        for k, m in enumerate(models):
            path = None if workdir is None or len(models) > 1 else Path(workdir) / f"index-{proj_dim}-{projection}-{k}"
            total = total + GradientIndex(path, proj_dim=proj_dim, damping=value, seed=0,
                                          projection=projection).fit(m).influence_matrix(X, y)
        return total / len(models)

    score.spec = repr(("index", proj_dim, projection))
    return score


def methods(kind: str, quick: bool, ensemble: int, checkpoints: list, workdir=None,
            all_checkpoints: list | None = None) -> list[Method]:
    """The rows scored for ``kind`` (each method family of dattri's chart, and the library's own);
    ``workdir`` keeps the members' gradient indexes."""
    grid = [1e-1, 1e-2, 1e-3] if not quick else [1e-1, 1e-2]
    kfac_grid = grid + [1e-4] if not quick else grid
    if kind == "mlp" and not quick:
        kfac_grid = kfac_grid + [1e-5]  # the MLP's single-model EK-FAC still gains at 1e-4
    rows = []
    if kind == "lr":
        exact_grid = [1.0, 0.3, 0.1, 0.05, 0.03, 0.01, 1e-3] if not quick else [1.0] + grid
        rows.append(Method("IF exact (H)", "IF explicit", _influence("exact"), exact_grid, "damping"))
        rows.append(Method("IF exact, L2 re-fit (H)", "IF explicit", _refit_influence(),
                           [0.3, 0.1, 0.03, 0.01] if not quick else [0.1], "weight decay"))
        cg_grid = [0.3, 0.1, 0.05, 0.03, 0.01, 1e-3] if not quick else grid
        rows.append(Method("IF CG (H)", "IF CG", _influence("cg", on_failure="warn", maxiter=100), cg_grid, "damping"))
        rows.append(Method("IF CG, L2 re-fit (H)", "IF CG", _refit_influence("cg", tol=1e-8, maxiter=200),
                           param="weight decay", picked_from="IF exact, L2 re-fit (H)"))
        rows.append(Method("IF LiSSA (depth 100, full batch)", "IF LiSSA",
                           _influence("lissa", scale="auto", depth=100, batch_size=None), [1e-3], "damping"))
    else:
        rows.append(Method("IF CG (H), 10 iterations", "IF CG",
                           _influence("cg", on_failure="warn", maxiter=10), grid[1:], "damping"))
        rows.append(Method("IF CG (G), 10 iterations", "IF CG",
                           _influence("cg", "gauss-newton", on_failure="warn", maxiter=10), kfac_grid[1:], "damping"))
    rows += [
        Method("IF LiSSA (depth 100)", "IF LiSSA", _influence("lissa", scale="auto", depth=100, batch_size=500,
                                                              curvature="gauss-newton" if kind == "mlp" else None),
               grid[:2] if kind == "lr" else grid[-1:], "damping"),
        Method("IF Arnoldi (rank 50, fill 0)", "IF Arnoldi",
               _influence("arnoldi", rank=50, fill=0.0, curvature="gauss-newton" if kind == "mlp" else None),
               grid, "damping"),
        Method("IF K-FAC", None, _influence("kfac", curvature="gauss-newton"), kfac_grid, "damping"),
        Method("IF EK-FAC", None, _influence("ekfac", curvature="gauss-newton"), kfac_grid, "damping"),
        Method("IF EK-FAC, 5 checkpoints of one run", None,
               _influence("ekfac", curvature="gauss-newton", checkpoints=checkpoints), param="damping",
               picked_from="IF EK-FAC"),
        Method("TracIn (5 checkpoints)", "TracIn", _named("tracin", checkpoints=checkpoints)),
        Method("grad-dot", "grad-dot", _named("grad_dot")),
        Method("grad-cos", "grad-cos", _named("grad_cos")),
        Method("TRAK-1", "TRAK-1", _named("trak", proj_dim=2048)),
        Method("TRAK-1, damping picked", "TRAK-1", _trak(2048), [1e1, 1e2, 1e3, 1e4, 1e5] if not quick else [1e2],
               "damping"),
        Method("index (k = 4096)", None, _index(4096, workdir), kfac_grid, "damping"),
        Method("random", None, _named("random")),
    ]
    if not quick:  # the projection's comparison row (docs/index.md)
        rows.insert(-1, Method("index (k = 4096), random Kronecker projection", None, _index(4096, workdir, "random"),
                               kfac_grid, "damping"))
    if ensemble > 1:
        rows += [
            Method(f"TRAK-{ensemble}", f"TRAK-{ensemble}" if ensemble in (10, 50) else None,
                   _named("trak", proj_dim=2048), members=ensemble),
            Method(f"TRAK-{ensemble}, damping picked", f"TRAK-{ensemble}" if ensemble in (10, 50) else None,
                   _trak(2048), param="damping", members=ensemble, picked_from="TRAK-1, damping picked"),
            Method(f"IF EK-FAC x{ensemble}", None, _influence("ekfac", curvature="gauss-newton"),
                   (grid[1:] if kind == "lr" else [1e-3, 1e-4, 1e-5]) if not quick else grid, "damping",
                   members=ensemble),
        ]
        if all_checkpoints:
            rows.append(Method(f"IF EK-FAC, {ensemble} models x 5 checkpoints", None,
                               _checkpoint_ensemble(all_checkpoints, "ekfac", curvature="gauss-newton"),
                               param="damping", members=ensemble, picked_from=f"IF EK-FAC x{ensemble}"))
        if kind == "mlp":
            rows.append(Method(f"IF CG (G) x{ensemble}", None,
                               _influence("cg", "gauss-newton", on_failure="warn", maxiter=10),
                               members=ensemble, picked_from="IF CG (G), 10 iterations"))
        rows.append(Method(f"index (k = 4096) x{ensemble}", None, _index(4096, workdir), param="damping",
                           members=ensemble, picked_from="index (k = 4096)"))
        rows.append(Method(f"grad-dot x{ensemble}", "grad-dot", _ensemble_of("grad_dot"), members=ensemble))
        if all_checkpoints:
            flat = [c for cps in all_checkpoints[:ensemble] for c in cps]
            rows.append(Method(f"TracIn, {ensemble} models x 5 checkpoints", "TracIn", _named("tracin", checkpoints=flat),
                               members=ensemble))
    return rows


def wrap(kind, weights, X, y):
    """A :class:`~influence.KerasModel` of dattri's network at ``weights`` holding ``(X, y)``: in
    float64 for the (convex) LR, float32 for the MLP (as trained)."""
    from .. import KerasModel

    dtype = "float64" if kind == "lr" else "float32"
    net = build_network(kind, 0, dtype)
    net.set_weights([np.asarray(w, dtype=dtype) for w in weights])
    X = np.asarray(X, dtype=dtype)
    return KerasModel(net, loss="softmax", weight_decay=0.0, progress=False).set_training_data(X, y)


@dataclass
class Scored:
    """A method's LDS per grid value on both splits, its pick, and its seconds."""

    name: str
    family: str | None
    members: int
    param: str
    values: list
    val_lds: list
    rep_lds: list
    rep_per_test: list
    seconds: list

    def picked(self) -> int:
        v = [x if np.isfinite(x) else -np.inf for x in self.val_lds]
        return int(np.argmax(v))

    def best(self) -> int:
        v = [x if np.isfinite(x) else -np.inf for x in self.rep_lds]
        return int(np.argmax(v))


def library_source_hash() -> str:
    """SHA-256 of the library's source (this benchmark module excepted): scores journaled under
    one hash are never reused after the code that computed them changed."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if path.resolve() != Path(__file__).resolve():
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def score_method(method: Method, models, X_eval, y_eval, n_test, masks_rep, y_rep, masks_val, y_val,
                 values=None, journal=None) -> Scored:
    """Score ``method`` at every grid value (or ``values``) on all eval points, timed; its LDS on both
    splits. ``journal``: finished (method, value) units are recorded there and reused."""
    from ..utils import hash_arrays

    vals, val_lds, rep_lds, rep_pt, secs = [], [], [], [], []
    for value in (values if values is not None else method.grid):
        unit = hash_arrays(method.name, getattr(method.score, "spec", ""), repr(value), method.members)
        done = journal.arrays(unit) if journal is not None and unit in journal else None
        if done is not None:
            pt_rep, pt_val, seconds = done["rep"], done["val"], float(journal.get(unit)["seconds"])
        else:
            t0 = time.perf_counter()
            try:
                A = np.asarray(method.score(models[:method.members], X_eval, y_eval, value), dtype=np.float64)
            except Exception as exc:  # noqa: BLE001 -- one failed row must not end the benchmark; it shows as failed
                logger.error("%s at %s=%s failed (%s: %s); its row shows no LDS", method.name, method.param, value,
                             type(exc).__name__, str(exc).splitlines()[0][:300])
                A = np.full((len(X_eval), len(masks_rep[0])), np.nan)
                failed = True
            else:
                failed = False
            seconds = time.perf_counter() - t0
            if not np.all(np.isfinite(A)):
                logger.warning("%s at %s=%s: non-finite scores (%d entries); LDS counts them as NaN", method.name,
                               method.param, value, int((~np.isfinite(A)).sum()))
            pt_rep = lds_per_test(A[:n_test], masks_rep, y_rep)
            pt_val = lds_per_test(A[n_test:], masks_val, y_val) if len(A) > n_test else np.array([np.nan])
            if journal is not None and not failed:
                journal.add(unit, {"seconds": seconds}, arrays={"rep": pt_rep, "val": pt_val})
        secs.append(seconds)
        vals.append(value)
        rep_lds.append(summarize(pt_rep)[0])
        val_lds.append(summarize(pt_val)[0])
        rep_pt.append(pt_rep)
        logger.info("%-32s %s=%-8s LDS validation %.3f reported %.3f (%.1f s%s)", method.name, method.param or "-",
                    value, val_lds[-1], rep_lds[-1], secs[-1], ", from the journal" if done is not None else "")
    return Scored(method.name, method.family, method.members, method.param, vals, val_lds, rep_lds, rep_pt, secs)


# ---------------------------------------------------------------------- one model kind, end to end
def run_kind(kind: str, *, data_dir, out_dir, seed: int = 0, n_train: int = 5000, n_test: int = 500,
             n_val: int = 100, n_subsets: int = 50, n_val_subsets: int = 20, ensemble: int = 10,
             epochs: int | None = None, quick: bool = False, only=None, n_jobs: int = 1, executor=None,
             score_tests: int | None = None, score_val: int | None = None, seed_noise: int = 0) -> dict:
    """Train (journaled) and score every method on ``kind``; returns the table's rows and facts.

    Every model's loss is recorded on all ``n_test + n_val`` points; the methods score the first
    ``score_tests`` reported and ``score_val`` validation points (default: all). ``seed_noise``:
    train a second model (another seed) on the first ``seed_noise`` reported subsets; the Spearman
    correlation of the two runs' losses across those subsets (per test point, averaged) is the
    targets' reliability ``r``, and ``sqrt(r)`` roughly bounds the LDS of any attribution."""
    from pathlib import Path

    from ..result_store import Journal
    from ..utils import hash_arrays

    X, y, X_eval, y_eval = dattri_mnist(data_dir, n_train, n_test, n_val)
    masks = draw_subsets(n_train, n_subsets + n_val_subsets, seed)
    settings = {"kind": kind, "protocol": PROTOCOL[kind], "epochs": epochs, "data": hash_arrays(X, y, X_eval, y_eval),
                "seed": seed, "version": 1}
    journal = Journal(Path(out_dir) / f"models-{kind}.jsonl", settings)
    tasks = [(f"subset-{s}", np.flatnonzero(masks[s]), 1000 * seed + s, False) for s in range(len(masks))]
    tasks += [(f"member-{m}", np.arange(n_train), 1000 * seed + 500 + m, True) for m in range(max(1, ensemble))]
    tasks += [(f"repeat-{s}", np.flatnonzero(masks[s]), 1000 * seed + 700 + s, False)
              for s in range(min(seed_noise, n_subsets))]
    t0 = time.perf_counter()
    trained = train_models(kind, X, y, X_eval, y_eval, tasks, journal, n_jobs=n_jobs, executor=executor,
                           epochs=epochs, checkpoints=5, desc=kind)
    train_seconds = time.perf_counter() - t0
    losses = np.stack([trained[f"subset-{s}"]["losses"] for s in range(len(masks))])  # (S, n_eval)
    y_rep, y_val = losses[:n_subsets, :n_test], losses[n_subsets:, n_test:]
    m_rep, m_val = masks[:n_subsets], masks[n_subsets:]
    members = [wrap(kind, trained[f"member-{m}"]["weights"], X, y) for m in range(max(1, ensemble))]
    all_cps = [[(np.concatenate([w.ravel() for w in ws]), lr) for ws, lr in trained[f"member-{m}"]["checkpoints"]]
               for m in range(max(1, ensemble))]
    cps = all_cps[0]
    st, sv = min(score_tests or n_test, n_test), min(score_val or n_val, n_val)
    noise = None
    if seed_noise:
        k = min(seed_noise, n_subsets)
        again = np.stack([trained[f"repeat-{s}"]["losses"][:n_test] for s in range(k)])
        r = summarize(spearman_columns(losses[:k, :n_test], again))
        noise = {"subsets": k, "reliability": r[0], "ci95": r[1], "ceiling": float(np.sqrt(max(r[0], 0.0)))}
        logger.info("%s: seed noise over %d subsets: the two runs' losses correlate %.3f (Spearman); LDS ceiling "
                    "~ %.3f", kind, k, r[0], noise["ceiling"])
    pick = np.r_[np.arange(st), n_test + np.arange(sv)]
    y_rep, y_val = y_rep[:, :st], y_val[:, :sv]
    pred = np.asarray(members[0].predict(X_eval[:n_test]))
    acc = float(np.mean((pred.argmax(axis=1) if pred.ndim == 2 else pred) == y_eval[:n_test]))
    scores_journal = Journal(Path(out_dir) / f"scores-{kind}.jsonl",
                             {"models": journal.key, "tests": st, "val": sv, "library": library_source_hash()})
    scored = {}
    for method in methods(kind, quick, ensemble, cps, Path(out_dir) / f"index-{kind}", all_cps):
        if only and method.name not in only:
            continue
        values = None
        if method.picked_from:
            base = scored.get(method.picked_from)
            if base is None:
                continue
            values = [base.values[base.picked()]]
        X_score = np.asarray(X_eval[pick], dtype=members[0].dtype)
        scored[method.name] = score_method(method, members, X_score, y_eval[pick], st, m_rep, y_rep, m_val,
                                           y_val, values, scores_journal)
    return {"kind": kind, "scored": scored, "train_seconds": train_seconds, "test_accuracy": acc,
            "n_params": int(members[0].n_params), "n_train": n_train, "n_test": st, "n_val": sv,
            "n_subsets": n_subsets, "n_val_subsets": n_val_subsets, "ensemble": ensemble,
            "subset_loss_mean": float(y_rep.mean()), "seed_noise": noise}


def table_rows(result: dict) -> list[dict]:
    """One dict per method: LDS (validation-picked, with its 95% interval; LDS-picked), value, models,
    seconds (at the picked value), dattri's published number for the family."""
    kind, rows = result["kind"], []
    for s in result["scored"].values():
        i, j = s.picked(), s.best()
        mean, half = summarize(s.rep_per_test[i])
        rows.append({"model": kind, "method": s.name, "models": s.members, "param": s.param,
                     "picked": s.values[i], "lds": mean, "ci95": half, "lds_val": s.val_lds[i],
                     "lds_best": s.rep_lds[j], "best_value": s.values[j], "seconds": s.seconds[i],
                     "published": PUBLISHED[kind].get(s.family) if s.family else None})
    return rows


def markdown_table(rows: list[dict]) -> list[str]:
    def f(v, d=3):
        return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{d}f}"

    out = ["| model | method | models | damping / value (validation-picked) | LDS (95% CI) | LDS, picked on the "
           "reported LDS (value) | seconds | dattri published |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        val = "–" if r["picked"] is None else f"{r['picked']:g}"
        best = f(r["lds_best"]) + ("" if r["best_value"] is None else f" ({r['best_value']:g})")
        out.append(f"| {r['model'].upper()} | {r['method']} | {r['models']} | {val} | {f(r['lds'])} ± {f(r['ci95'])} "
                   f"| {best} | {r['seconds']:.1f} | {f(r['published'], 2)} |")
    return out
