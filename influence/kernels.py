"""The compiled TensorFlow kernels behind every model: losses, gradients, HVPs, JVPs.

Each kernel takes ``theta`` (the flat parameter vector) and a batch ``(x, y)`` explicitly
and returns a sum over the batch (or one value per example), so one trace serves every
batch and every theta. ``H v`` is double backprop, ``grad_theta(grad_theta(sum L) . v)``;
``G v`` is ``J^T [d^2 L / d f^2] J v`` (forward mode for ``J v``, reverse mode for ``J^T``);
per-example gradients are ``vectorized_map`` over the batch (no Python loop).
"""
from __future__ import annotations

import logging

import tensorflow as tf


class _DropPforWhileLoopWarnings(logging.Filter):
    """vectorized_map cannot vectorise some ops (e.g. Conv2DBackpropFilter) and warns once
    per trace; the per-example gradients are still right, so the warning only clutters logs."""

    def filter(self, record):
        return "uses a while_loop" not in record.getMessage()


tf.get_logger().addFilter(_DropPforWhileLoopWarnings())


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
            total = tf.reduce_sum(model._loss(tf.reshape(f, tf.shape(out)), y))
        g = inner.gradient(total, f)
    S = outer.batch_jacobian(g, f, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return 0.5 * (S + tf.linalg.matrix_transpose(S))


def compile_kernels(model) -> None:
    """Build ``model``'s tf.function kernels (``model._tf_*``) from its ``_forward`` and ``_loss``."""
    dt = model.tf_dtype
    mask = tf.constant(model.decay_mask_, dtype=dt)
    wd = tf.constant(model.weight_decay, dtype=dt)
    model._mask_tf = mask

    def losses(theta, x, y):
        return model._loss(model._forward(model.unflatten(theta), x), y)

    def loss_sum_and_grad(theta, x, y):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            total = tf.reduce_sum(losses(theta, x, y))
        return total, tape.gradient(total, theta)

    def hvp_sum(theta, x, y, v):
        # double backprop: grad_theta( grad_theta(sum L) . v )
        with tf.GradientTape() as outer:
            outer.watch(theta)
            _, g = loss_sum_and_grad(theta, x, y)
            gv = tf.reduce_sum(g * tf.stop_gradient(v))
        return outer.gradient(gv, theta)

    def hvp_sum_many(theta, x, y, V):
        # V: (p, k); returns (p, k) = sum_i H_i V, vectorised over the k columns
        with tf.GradientTape() as outer:
            outer.watch(theta)
            _, g = loss_sum_and_grad(theta, x, y)
            gV = tf.linalg.matvec(tf.stop_gradient(V), g, transpose_a=True)
        return tf.transpose(outer.jacobian(gV, theta, experimental_use_pfor=True))

    def gnvp_sum(theta, x, y, v):
        # sum_i J_i^T [d2L/df2] J_i v: forward mode for J v, the outputs' loss Hessian on
        # it by double backprop through the loss only, reverse mode for J^T
        with tf.GradientTape() as tape:
            tape.watch(theta)
            with tf.autodiff.ForwardAccumulator(theta, v) as acc:
                out = model._forward(model.unflatten(theta), x)
            jv = tf.stop_gradient(acc.jvp(out, unconnected_gradients=tf.UnconnectedGradients.ZERO))
        f = tf.stop_gradient(out)
        with tf.GradientTape() as outer:
            outer.watch(f)
            with tf.GradientTape() as inner:
                inner.watch(f)
                total = tf.reduce_sum(model._loss(f, y))
            gjv = tf.reduce_sum(inner.gradient(total, f) * jv)
        hjv = tf.stop_gradient(outer.gradient(gjv, f, unconnected_gradients=tf.UnconnectedGradients.ZERO))
        return tape.gradient(out, theta, output_gradients=hjv,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def gnvp_sum_many(theta, x, y, V):
        return tf.transpose(tf.vectorized_map(lambda v: gnvp_sum(theta, x, y, v), tf.transpose(V)))

    def per_example_grads(theta, x, y):
        def one(args):
            xi, yi = args
            return loss_sum_and_grad(theta, xi[None], yi[None])[1]
        return tf.vectorized_map(one, (x, y))

    def jvp_losses(theta, x, y, s):
        # s . grad L(z_i) for every i in the batch: one forward-mode pass
        with tf.autodiff.ForwardAccumulator(theta, s) as acc:
            out = losses(theta, x, y)
        return acc.jvp(out, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def input_grad_of_score(theta, x, y, s):
        # d/dx_i [ s . grad_theta L(z_i) ] for every i (each score depends on x_i only)
        with tf.GradientTape() as outer:
            outer.watch(x)
            _, g = loss_sum_and_grad(theta, x, y)
            score = tf.reduce_sum(g * tf.stop_gradient(s))
        return outer.gradient(score, x)

    def per_example_gn_eigmax(theta, x, y):
        # largest eigenvalue of each example's J_i^T S_i J_i (S_i = d2L/df2 at f_i): that of the
        # small (k, k) matrix S_i^1/2 (J_i J_i^T) S_i^1/2; exact per-example curvature when the
        # outputs are linear in theta
        out = model._forward(model.unflatten(theta), x)
        k = 1
        for dim in out.shape[1:]:
            k *= int(dim)

        def jac(xi):
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(theta)
                fi = tf.reshape(model._forward(model.unflatten(theta), xi[None]), [-1])
                parts = [fi[j] for j in range(k)]
            return tf.stack([tape.gradient(part, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)
                             for part in parts])

        J = tf.vectorized_map(jac, x)                                    # (b, k, p)
        K = tf.einsum("bip,bjp->bij", J, J)
        w, U = tf.linalg.eigh(output_hessians(model, out, y))     # S_i = U diag(w) U^T, (b, k, k)
        root = tf.einsum("bij,bj,bkj->bik", U, tf.sqrt(tf.maximum(w, 0)), U)
        M = root @ K @ root
        return tf.linalg.eigvalsh(0.5 * (M + tf.linalg.matrix_transpose(M)))[:, -1]

    def lissa_loop_many(theta, X, Y, V, idx, scale, damping, limits, gauss_newton):
        # the same series for the k columns of V (p, k) at once, on the same minibatches;
        # stops when any column leaves its limit (the caller then raises)
        curv_many = gnvp_sum_many if gauss_newton else hvp_sum_many
        depth = tf.shape(idx)[0]
        b = tf.cast(tf.shape(idx)[1], dt)

        def cond(j, est, ratio):
            return (j < depth) & tf.math.is_finite(ratio) & (ratio < 1)

        def body(j, est, ratio):
            xb = tf.gather(X, idx[j])
            yb = tf.gather(Y, idx[j])
            hv = curv_many(theta, xb, yb, est) / b + wd * mask[:, None] * est + damping * est
            est = V + est - hv / scale
            return j + 1, est, tf.reduce_max(tf.norm(est, axis=0) / limits)

        return tf.while_loop(cond, body, (tf.constant(0), V, tf.reduce_max(tf.norm(V, axis=0) / limits)))

    fn = lambda f: tf.function(f, reduce_retracing=True)  # noqa: E731
    model._tf_losses = fn(losses)
    model._tf_loss_sum_and_grad = fn(loss_sum_and_grad)
    model._tf_hvp_sum = fn(hvp_sum)
    model._tf_hvp_sum_many = fn(hvp_sum_many)
    model._tf_gnvp_sum = fn(gnvp_sum)
    model._tf_gnvp_sum_many = fn(gnvp_sum_many)
    model._tf_per_example_grads = fn(per_example_grads)
    model._tf_jvp_losses = fn(jvp_losses)
    model._tf_input_grad_of_score = fn(input_grad_of_score)
    model._tf_lissa_loop_many = fn(lissa_loop_many)
    model._tf_per_example_gn_eigmax = fn(per_example_gn_eigmax)
