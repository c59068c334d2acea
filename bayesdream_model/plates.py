"""The model's plates, made once per model call so that each is entered by name once."""

from __future__ import annotations

from dataclasses import dataclass

import pyro

from bayesdream_model.constants import (
    CELL_DIM,
    CELL_PLATE,
    FEATURE_DIM,
    FEATURE_PLATE,
    GROUP_DIM,
    GROUP_PLATE,
)


@dataclass(frozen=True)
class Plates:
    """features (T, dim -1), groups (C-1, dim -2); cells (N, dim -2) made on demand."""

    features: pyro.plate
    groups: pyro.plate | None  # None when C = 1

    @classmethod
    def make(cls, n_features: int, n_groups: int) -> Plates:
        """Plates for T features and C groups."""
        groups = pyro.plate(GROUP_PLATE, n_groups - 1, dim=GROUP_DIM) if n_groups > 1 else None
        return cls(pyro.plate(FEATURE_PLATE, n_features, dim=FEATURE_DIM), groups)

    @staticmethod
    def cells(n_cells: int) -> pyro.plate:
        """The cell plate of the likelihood."""
        return pyro.plate(CELL_PLATE, n_cells, dim=CELL_DIM)
