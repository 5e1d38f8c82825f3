"""The paper's datasets: loaders for MNIST, Enron1 spam, hospital readmission and dog-fish photos,
and the manifest of their files (public URLs, checksums) with a fetch/verify command line.

``python -m influence.datasets list | fetch NAME... | verify NAME... [--data-dir DIR]``
(see :mod:`influence.datasets.manifest`). Importing this package does not load TensorFlow.
"""
