"""A test-only model with an indefinite Hessian: binary logistic regression whose weight decay
is negative (the library refuses one; this subclass sets it after the check), which shifts
the spectrum of H down by that amount."""
from influence import BinaryLogisticRegression


class NegativeDecayLogistic(BinaryLogisticRegression):
    def __init__(self, weight_decay: float = 0.0, **kwargs):
        super().__init__(weight_decay=0.0, **kwargs)
        self.weight_decay = float(weight_decay)
