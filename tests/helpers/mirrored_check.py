"""Run in a fresh process: split the CPU into 2 logical devices and compare a model under
MirroredStrategy with the same model on one device. Prints the largest relative errors."""
import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sklearn.datasets import load_digits  # noqa: E402

from influence import LogisticRegression  # noqa: E402

X, y = load_digits(return_X_y=True)
X = X[:301] / 16.0  # an odd count: shards of unequal size
y = y[:301]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
single = LogisticRegression(weight_decay=0.01, batch_size=128).fit(X, y)
multi = LogisticRegression(weight_decay=0.01, batch_size=128, strategy=strategy)
multi.set_training_data(X, y).set_theta(single.theta_)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


v = np.random.default_rng(0).standard_normal(single.n_params)
s1 = single.s_test(X[5], y[5], solver="cg", tol=1e-12)
s2 = multi.s_test(X[5], y[5], solver="cg", tol=1e-12)
errors = {
    "replicas": strategy.num_replicas_in_sync,
    "objective": abs(multi.objective() - single.objective()) / abs(single.objective()),
    "gradient": rel(multi.gradient(single.theta_ + 0.01), single.gradient(single.theta_ + 0.01)),
    "hvp": rel(multi.hvp(v), single.hvp(v)),
    "hvp_many": rel(multi.hvp(np.stack([v, 2 * v], 1)), single.hvp(np.stack([v, 2 * v], 1))),
    "cg_solution": rel(s2.x, s1.x),
    "scores": rel(multi.gradient_dots(s1.x), single.gradient_dots(s1.x)),
    "per_example_gradients": rel(multi.per_example_gradients(np.arange(0, 301, 7)),
                                 single.per_example_gradients(np.arange(0, 301, 7))),
}
single.curvature = multi.curvature = "gauss-newton"
errors["gauss_newton_hvp_many"] = rel(multi.hvp(np.stack([v, 2 * v], 1)), single.hvp(np.stack([v, 2 * v], 1)))
print(json.dumps(errors))
