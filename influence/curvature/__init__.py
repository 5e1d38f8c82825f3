"""Curvature operators: the Hessian ``H`` or the Gauss-Newton matrix ``G`` of a fitted model
as objects that own their products, explicit matrix, eigenvalue bounds, per-example
curvature, compiled kernels and caches (:mod:`.operators`; kernels in :mod:`.kernels`)."""
from .operators import (CURVATURES, OPERATORS, CurvatureOperator, GaussNewtonOperator, HessianOperator, as_operator,
                        check_curvature, make_operator)

__all__ = ["CURVATURES", "OPERATORS", "CurvatureOperator", "GaussNewtonOperator", "HessianOperator", "as_operator",
           "check_curvature", "make_operator"]
