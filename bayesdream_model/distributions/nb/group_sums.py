"""Per (group, feature) sums of negbinom counts over the cells, for the priors and the
initial values: read from the likelihood's tables when the fit has built them, else one
pass over the non-zero entries."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bayesdream_model.data import FitArrays, FitTensors
from bayesdream_model.distributions.nb.log1p_table import POWERS
from bayesdream_model.sparse import as_sparse
from bayesdream_model.sparse_stats import scaled_group_sums


@dataclass(frozen=True)
class GroupSums:
    """Per (group, feature) sums over the cells: `scaled` Σ y / sf [C, T], and the raw
    Σ y, read from the likelihood's statistics when they hold them (its table's moments
    are these sums, in float64, from the same pass) or summed over the non-zeros."""

    scaled: np.ndarray
    data: FitArrays
    totals: np.ndarray | None = None

    @classmethod
    def of(cls, data: FitArrays, tensors: FitTensors | None = None) -> GroupSums:
        stats = None if tensors is None else tensors.stats
        if stats is not None and "yl_moments" in stats:
            moments = stats["yl_moments"].cpu().numpy()  # Σ y, Σ y log sf, Σ y sf^k, Σ y / sf
            return cls(moments[:, 2 + POWERS], data, moments[:, 0])
        y = as_sparse(data.y)
        return cls(scaled_group_sums(y, data.sum_factor, data.groups, data.n_groups), data)

    def raw(self) -> np.ndarray:
        """Σ y per (group, feature) [C, T]."""
        if self.totals is not None:
            return self.totals
        y = as_sparse(self.data.y)
        return scaled_group_sums(y, np.ones(y.shape[0]), self.data.groups, self.data.n_groups)
