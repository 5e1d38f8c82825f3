"""Inception v3 feature model (Fig 4 and Fig 5 of the paper).

Not built yet: the dog-vs-fish experiments are tracked in their own issue. The weights
this package will load are described in ``data/README.md`` (inception/ folder).
"""
