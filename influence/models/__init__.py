"""The models: each subclasses :class:`~influence.generic_neural_net.GenericNeuralNet` and says only
its parameters, forward pass and loss (logistic, smooth-hinge SVM, All-CNN, your Keras model, RBF features).

``influence.models.logistic`` (``LogisticRegression``, ``BinaryLogisticRegression``),
``.smooth_hinge`` (``SmoothHingeSVM``), ``.all_cnn`` (``AllCNN``), ``.keras_model``
(``KerasModel``), ``.rbf`` (RBF-kernel features for a linear SVM). The common names are
also importable from ``influence`` itself.
"""
