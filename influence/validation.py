"""Validation of public options, in one place: every error names the parameter, the value
and the allowed range (scikit-learn's habit)."""
from __future__ import annotations

import numbers

import numpy as np


def check_number(name: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False,
                 integer: bool = False, allow_none: bool = False):
    """``value`` as a float (or int with ``integer``), finite and within ``[low, high]``
    (open ends with ``low_open`` / ``high_open``); else a ValueError naming ``name``."""
    if value is None and allow_none:
        return None
    lo = "-inf" if low is None else repr(low)
    hi = "inf" if high is None else repr(high)
    allowed = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, numbers.Integral) if integer else isinstance(value, numbers.Real)
    if isinstance(value, (bool, np.bool_)) or not ok_type:
        if integer and isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) \
                and float(value).is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be {kind} in {allowed}{' or None' if allow_none else ''}, got {value!r}")
    value = int(value) if integer else float(value)
    if not np.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) or \
            (high is not None and (value >= high if high_open else value > high)):
        raise ValueError(f"{name} must be {kind} in {allowed}{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
