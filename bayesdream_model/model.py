"""The technical model: a family's latent sites, then (when observing) its likelihood."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro import poutine

from bayesdream_model.data import FitTensors
from bayesdream_model.distributions.base import Family
from bayesdream_model.plates import Plates
from bayesdream_model.streaming import CellStream


@dataclass(frozen=True)
class TechnicalModel:
    """A Pyro model callable; `observe=False` skips the likelihood (posterior sampling).

    With `observe=False` nothing of size N is touched, so drawing posterior samples never
    evaluates the likelihood and never builds an [S, N, T] tensor. With a `stream`, the
    data is the stream's current batch of cells, its log-likelihood scaled to the whole.
    """

    family: Family
    inputs: dict[str, torch.Tensor]  # empirical prior parameters, on the fit device
    n_groups: int
    data: FitTensors | None = None
    stream: CellStream | None = None

    def __call__(self, observe: bool = True) -> dict:
        """Sample the latents; observe the data when asked and present."""
        plates = Plates.make(self.family.n_features(self.inputs), self.n_groups)
        params = self.family.sample_latents(self.inputs, plates)
        if observe and self.stream is not None:
            with poutine.scale(scale=self.stream.scale):
                self.family.observe(params, self.stream.current, plates)
        elif observe and self.data is not None:
            self.family.observe(params, self.data, plates)
        return params
