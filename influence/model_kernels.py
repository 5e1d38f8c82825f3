"""The model's compiled gradient kernels: losses, gradients, per-example gradients, JVPs.

Each kernel takes ``theta`` (the flat parameter vector) and a batch ``(x, y)`` explicitly
and returns a sum over the batch (or one value per example), so one trace serves every
batch and every theta. Per-example gradients are ``vectorized_map`` over the batch (no
Python loop). Curvature kernels (HVPs) belong to the curvature operators
(:mod:`influence.curvature`), not to the model.
"""
from __future__ import annotations

import contextlib
import logging

import tensorflow as tf


class _DropPforWhileLoopWarnings(logging.Filter):
    """vectorized_map cannot vectorise some ops (e.g. Conv2DBackpropFilter) and warns once
    per trace; the per-example gradients are still right, so the warning only clutters logs."""

    def filter(self, record):
        return "uses a while_loop" not in record.getMessage()


class _DropRetracingWarnings(logging.Filter):
    """TensorFlow warns "N out of the last M calls to <function> triggered tf.function retracing"
    when many *different* compiled functions are traced in a row. An ensemble (TRAK's members,
    TracIn's checkpoints, one index per model) compiles one kernel per member, each traced once
    per batch shape: expected, not a retracing loop."""

    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def _filtered(filt: logging.Filter):
    """``filt`` on TensorFlow's logger for the block only; nothing stays installed afterwards."""
    tf.get_logger().addFilter(filt)
    try:
        yield
    finally:
        tf.get_logger().removeFilter(filt)


def quiet_member_traces():
    """Drop TensorFlow's retracing warning while an ensemble traces one kernel per member
    (:class:`_DropRetracingWarnings`)."""
    return _filtered(_DropRetracingWarnings())


def quiet_pfor_fallback():
    """Drop vectorized_map's while-loop fallback warning while a kernel is traced (the body of a
    tf.function runs only then)."""
    return _filtered(_DropPforWhileLoopWarnings())


class GradientKernels:
    """``losses``, ``loss_sum_and_grad``, ``per_example_grads``, ``jvp_losses`` and
    ``input_grad_of_score`` of one model, as tf.functions of ``(theta, x, y, ...)``."""

    def __init__(self, model):
        def losses(theta, x, y):
            return model.pointwise_loss(model.forward(model.unflatten(theta), x), y)

        def loss_sum_and_grad(theta, x, y):
            with tf.GradientTape() as tape:
                tape.watch(theta)
                total = tf.reduce_sum(losses(theta, x, y))
            return total, tape.gradient(total, theta)

        def per_example_grads(theta, x, y):
            def one(args):
                xi, yi = args
                return loss_sum_and_grad(theta, xi[None], yi[None])[1]
            with quiet_pfor_fallback():
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

        fn = lambda f: tf.function(f, reduce_retracing=True)  # noqa: E731
        self.losses = fn(losses)
        self.loss_sum_and_grad = fn(loss_sum_and_grad)
        self.per_example_grads = fn(per_example_grads)
        self.jvp_losses = fn(jvp_losses)
        self.input_grad_of_score = fn(input_grad_of_score)


def quiet_vectorized_map(fn, elems):
    """``tf.vectorized_map`` without its while-loop fallback warning (:func:`quiet_pfor_fallback`)."""
    with quiet_pfor_fallback():
        return tf.vectorized_map(fn, elems)
