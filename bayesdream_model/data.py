"""The fit cells' data, as numpy (for filters and priors) and as tensors (for SVI)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from bayesdream_model.sparse import SparseCounts


@dataclass(frozen=True)
class FitArrays:
    """Fit cells x features; rows are cells, group codes are 0..C-1 (0 = baseline)."""

    #: [N, T] (multinomial [N, T, K]); NaN = missing (normal/studentt); negbinom may hold
    #: it as its non-zeros (`SparseCounts`, the same [N, T] shape)
    y: np.ndarray | SparseCounts
    groups: np.ndarray  # [N] int
    n_groups: int  # C
    sum_factor: np.ndarray | None = None  # [N]
    denominator: np.ndarray | None = None  # same shape as y (binomial)
    #: (smallest, largest) size factor of every fit cell when these cells are one batch of
    #: them: tabulated statistics (negbinom) then share one grid and merge by adding
    sf_range: tuple[float, float] | None = None

    @property
    def n_cells(self) -> int:
        """N."""
        return int(self.y.shape[0])

    @property
    def n_features(self) -> int:
        """T."""
        return int(self.y.shape[1])

    def select_features(self, keep: np.ndarray) -> FitArrays:
        """The same cells restricted to the features in `keep` (bool [T] or indices)."""
        den = None if self.denominator is None else self.denominator[:, keep]
        if isinstance(self.y, SparseCounts):
            return replace(self, y=self.y.select_features(keep), denominator=den)
        return replace(self, y=self.y[:, keep], denominator=den)

    def select_cells(self, rows) -> FitArrays:
        """The same features for the cells `rows` (a slice, bool mask [N] or indices)."""

        def take(x):
            return None if x is None else x[rows]

        y = self.y.select_rows(rows) if isinstance(self.y, SparseCounts) else self.y[rows]
        return replace(
            self,
            y=y,
            groups=self.groups[rows],
            sum_factor=take(self.sum_factor),
            denominator=take(self.denominator),
        )


@dataclass(frozen=True)
class FitTensors:
    """The tensors the likelihood reads, on the fit device."""

    y: torch.Tensor
    groups: torch.Tensor  # [N] long
    n_groups: int
    sum_factor: torch.Tensor | None = None
    denominator: torch.Tensor | None = None
    #: per-group sufficient statistics for families whose likelihood depends on the data
    #: only through them (computed once, before SVI)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    #: what the likelihood derives from `stats` on first use and keeps (never stored)
    memo: dict[str, object] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_arrays(cls, data: FitArrays, device: torch.device | str) -> FitTensors:
        """Move the fit data to `device` as float32 (codes as int64)."""

        def as_tensor(x: np.ndarray | None) -> torch.Tensor | None:
            if x is None:
                return None
            return torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)

        return cls(
            y=as_tensor(data.y),
            groups=torch.as_tensor(np.asarray(data.groups, dtype=np.int64), device=device),
            n_groups=data.n_groups,
            sum_factor=as_tensor(data.sum_factor),
            denominator=as_tensor(data.denominator),
        )
