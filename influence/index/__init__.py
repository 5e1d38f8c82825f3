"""The training-gradient index: one pass over the training set writes every training point's
projected loss gradient to HDF5 shards; every query is then a matrix product
(:class:`GradientIndex`, the estimator ``"index"``)."""
from .gradient_index import GradientIndex, IndexMismatchError, build_shard
from .projection import ExactProjection, KroneckerProjection, PCAProjection, SparseSignProjection, make_projection

__all__ = ["ExactProjection", "GradientIndex", "IndexMismatchError", "KroneckerProjection", "PCAProjection",
           "SparseSignProjection", "build_shard", "make_projection"]
