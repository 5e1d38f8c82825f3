"""The compiled curvature kernels of one model: Hessian- and Gauss-Newton-vector products.

Each kernel takes ``theta`` and a batch ``(x, y)`` explicitly and returns a sum over the
batch, so one trace serves every batch and every theta. ``H v`` is double backprop,
``grad_theta(grad_theta(sum L) . v)``; ``G v`` is ``J^T [d^2 L / d f^2] J v`` (forward mode
for ``J v``, reverse mode for ``J^T``). The regulariser is added by the operator.
"""
from __future__ import annotations

import tensorflow as tf

from ..model_kernels import quiet_vectorized_map


def output_hessians(model, out: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """``d^2 L(z_i) / d f_i^2`` for each example of a batch, (b, k, k) symmetrised, with ``f_i``
    the example's outputs ``out[i]`` flattened to k entries (a binary model: k = 1)."""
    k = 1
    for dim in out.shape[1:]:
        k *= int(dim)
    f = tf.reshape(tf.stop_gradient(out), [-1, k])
    with tf.GradientTape() as outer:
        outer.watch(f)
        with tf.GradientTape() as inner:
            inner.watch(f)
            total = tf.reduce_sum(model.pointwise_loss(tf.reshape(f, tf.shape(out)), y))
        g = inner.gradient(total, f)
    S = outer.batch_jacobian(g, f, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return 0.5 * (S + tf.linalg.matrix_transpose(S))


def _loss_grad(model, theta, x, y):
    with tf.GradientTape() as tape:
        tape.watch(theta)
        total = tf.reduce_sum(model.pointwise_loss(model.forward(model.unflatten(theta), x), y))
    return tape.gradient(total, theta)


def hessian_kernels(model):
    """``(one, many)``: ``sum_i nabla^2 L(z_i) v`` over a batch, for v (p,) and V (p, k)."""
    def hvp_sum(theta, x, y, v):
        with tf.GradientTape() as outer:
            outer.watch(theta)
            gv = tf.reduce_sum(_loss_grad(model, theta, x, y) * tf.stop_gradient(v))
        return outer.gradient(gv, theta)

    def hvp_sum_many(theta, x, y, V):  # vectorised over the k columns
        with tf.GradientTape() as outer:
            outer.watch(theta)
            gV = tf.linalg.matvec(tf.stop_gradient(V), _loss_grad(model, theta, x, y), transpose_a=True)
        return tf.transpose(outer.jacobian(gV, theta, experimental_use_pfor=True))

    return hvp_sum, hvp_sum_many


def gauss_newton_kernels(model):
    """``(one, many)``: ``sum_i J_i^T [d^2 L / d f^2] J_i v`` over a batch."""
    def gnvp_sum(theta, x, y, v):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            with tf.autodiff.ForwardAccumulator(theta, v) as acc:
                out = model.forward(model.unflatten(theta), x)
            jv = tf.stop_gradient(acc.jvp(out, unconnected_gradients=tf.UnconnectedGradients.ZERO))
        f = tf.stop_gradient(out)
        with tf.GradientTape() as outer:
            outer.watch(f)
            with tf.GradientTape() as inner:
                inner.watch(f)
                total = tf.reduce_sum(model.pointwise_loss(f, y))
            gjv = tf.reduce_sum(inner.gradient(total, f) * jv)
        hjv = tf.stop_gradient(outer.gradient(gjv, f, unconnected_gradients=tf.UnconnectedGradients.ZERO))
        return tape.gradient(out, theta, output_gradients=hjv, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def gnvp_sum_many(theta, x, y, V):
        return tf.transpose(quiet_vectorized_map(lambda v: gnvp_sum(theta, x, y, v), tf.transpose(V)))

    return gnvp_sum, gnvp_sum_many


def _per_example_jacobians(model, theta, x, out):
    """``J_i = d f_i / d theta`` for each example, (b, k, p): k reverse passes, vectorised
    over the batch (``out``: the batch's outputs, for k)."""
    k = 1
    for dim in out.shape[1:]:
        k *= int(dim)

    def jac(xi):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(theta)
            fi = tf.reshape(model.forward(model.unflatten(theta), xi[None]), [-1])
            parts = [fi[j] for j in range(k)]
        return tf.stack([tape.gradient(part, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)
                         for part in parts])

    return quiet_vectorized_map(jac, x)


def gauss_newton_factor_kernel(model):
    """``A_i = R_i^T J_i`` for each example of a batch, (b, k, p), with ``S_i = R_i R_i^T`` the
    output Hessian (``R_i = U_i diag(w_i)^1/2`` from its eigendecomposition, negative round-off
    clipped), so that ``sum_i J_i^T S_i J_i = sum_i A_i^T A_i``: the explicit Gauss-Newton
    matrix from k reverse passes per example instead of p products. Row ``j`` of ``A_i`` is the
    gradient of ``f_i . R_i[:, j]``; the (i, j) pairs are one vectorised batch of b k scalar
    gradients (cheaper to trace than k gradients per example)."""
    def factor(theta, x, y):
        out = model.forward(model.unflatten(theta), x)
        k = 1
        for dim in out.shape[1:]:
            k *= int(dim)
        w, U = tf.linalg.eigh(output_hessians(model, out, y))            # (b, k), (b, k, k)
        R = U * tf.sqrt(tf.maximum(w, 0))[:, None, :]                    # S_i = R_i R_i^T
        cotangents = tf.reshape(tf.transpose(R, [0, 2, 1]), [-1, k])     # row (i, j): R_i[:, j]

        def row(args):
            xi, ci = args
            with tf.GradientTape() as tape:
                tape.watch(theta)
                fi = tf.reshape(model.forward(model.unflatten(theta), xi[None]), [-1])
                score = tf.reduce_sum(fi * ci)
            return tape.gradient(score, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)

        A = quiet_vectorized_map(row, (tf.repeat(x, k, axis=0), cotangents))
        return tf.reshape(A, [-1, k, tf.shape(theta)[0]])

    return factor


def per_example_gn_eigmax_kernel(model):
    """Largest eigenvalue of each example's ``J_i^T S_i J_i`` (``S_i = d^2 L / d f^2`` at ``f_i``):
    that of the small (k, k) matrix ``S_i^1/2 (J_i J_i^T) S_i^1/2``."""
    def per_example_gn_eigmax(theta, x, y):
        out = model.forward(model.unflatten(theta), x)
        J = _per_example_jacobians(model, theta, x, out)                # (b, k, p)
        K = tf.einsum("bip,bjp->bij", J, J)
        w, U = tf.linalg.eigh(output_hessians(model, out, y))            # S_i = U diag(w) U^T
        root = tf.einsum("bij,bj,bkj->bik", U, tf.sqrt(tf.maximum(w, 0)), U)
        M = root @ K @ root
        return tf.linalg.eigvalsh(0.5 * (M + tf.linalg.matrix_transpose(M)))[:, -1]

    return per_example_gn_eigmax


def closed_form_kernels(curvature_sum):
    """``(one, many)`` from a model's closed-form ``curvature_sum(theta, x, y, V) -> sum_i C_i V``
    over a batch for V (p, k) (e.g. logistic regression's ``X^T (S (X V))``: two passes over
    the batch, no second autodiff pass)."""
    def one(theta, x, y, v):
        return curvature_sum(theta, x, y, v[:, None])[:, 0]

    return one, curvature_sum


def compiled(fn):
    return tf.function(fn, reduce_retracing=True)
