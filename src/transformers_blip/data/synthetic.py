"""Moved to `transformers_blip.benchmark.build`; this old path works for one more release."""

import sys
import warnings

from ..benchmark import build as _moved

warnings.warn(f"{__name__} moved to {_moved.__name__}", FutureWarning, stacklevel=2)
sys.modules[__name__] = _moved
