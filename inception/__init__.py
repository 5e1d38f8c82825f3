"""Inception v3 feature model (Figs 4 and 5 of the paper).

``load_inception`` builds Inception v3 without its top (299x299x3 -> 2048 pooled features)
and loads ImageNet weights from a local file; ``BinaryInceptionModel`` is the paper's
logistic regression on those features, usable end to end from pixels;
``prepare_dogfish`` loads the dog-vs-fish images and their (cached) features.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_inception": ".model", "build_inception_v3": ".model", "Preprocessing": ".model",
    "WeightsError": ".model", "N_PARAMS": ".model",
    "extract_features": ".features", "cached_features": ".features",
    "BinaryInceptionModel": ".binary_model",
    "prepare_dogfish": ".pipeline", "DogFishFeatures": ".pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
