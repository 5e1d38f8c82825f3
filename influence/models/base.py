"""``Model``: the base class of the library's models and of yours: a
:class:`~influence.generic_neural_net.GenericNeuralNet` (parameters, forward pass, loss, data,
fit) with the convenience methods ``s_test``, ``influence_matrix``, ``hvp``, ... over its own
:class:`~influence.facade.Influence` (:class:`~influence.facade.InfluenceMethods`)."""
from __future__ import annotations

from ..facade import InfluenceMethods
from ..generic_neural_net import GenericNeuralNet


class Model(InfluenceMethods, GenericNeuralNet):
    """A :class:`GenericNeuralNet` with the influence convenience methods (module docstring)."""
