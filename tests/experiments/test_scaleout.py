"""Scale-out: MirroredStrategy over 2 logical CPU devices, and LOO retrains on a Dask cluster."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from influence import leave_one_out

HELPER = Path(__file__).resolve().parents[1] / "helpers" / "mirrored_check.py"


def test_mirrored_strategy_equals_single_device():
    # logical devices must be configured before TF starts, hence a fresh process
    out = subprocess.run([sys.executable, str(HELPER)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    errors = json.loads(out.stdout.strip().splitlines()[-1])
    assert errors.pop("replicas") == 2
    for name, err in errors.items():
        assert err <= 1e-10, (name, err)


def test_loo_on_dask_local_cluster_equals_local_pool(binary_model, binary_digits):
    from dask.distributed import Client, LocalCluster

    m = binary_model
    _, _, Xte, yte = binary_digits
    idx = np.array([0, 11, 42, 99])
    serial = leave_one_out(m, Xte[:3], yte[:3], idx, n_jobs=1)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        dask_res = leave_one_out(m, Xte[:3], yte[:3], idx, executor=client.get_executor())
    np.testing.assert_allclose(dask_res.actual, serial.actual, rtol=1e-6, atol=1e-10)
    assert dask_res.base_loss == serial.base_loss
