"""Which parameters of a state dict Stage 1 treats as matrices, and their 2-D views."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

from torch import Tensor


def matrix_names(state_dict: Mapping[str, Tensor], patterns: Iterable[str],
                 conv_as_matrix: bool = False) -> list[str]:
    """Names of the parameters Stage 1 treats as matrices: 2-D (or 4-D conv, if enabled) and matching."""
    patterns = list(patterns)
    dims = (2, 4) if conv_as_matrix else (2,)
    return [name for name, t in state_dict.items()
            if t.dim() in dims and any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def as_matrix(t: Tensor) -> Tensor:
    """A 2-D view of a parameter: conv weights (out, in, kh, kw) become (out, in*kh*kw)."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)
