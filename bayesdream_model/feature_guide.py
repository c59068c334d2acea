"""A guide with a full covariance per feature over that feature's latents.

Mean-field under-covers here: the baseline (mu_ntc) and the group effects of a feature
are strongly correlated a posteriori (the baseline group's cells inform mu, group g's
cells inform mu + effect_g), so a factorised guide returns the conditional rather than
the marginal spread of each effect; with 3 equal groups the 90 % intervals covered ~75 %
of true effects on simulated screens. Here every feature t gets a Gaussian over its D
unconstrained latents (its C-1 effects, its baseline, its dispersion/scale) with a
D x D Cholesky factor; global sites (beta_o) stay mean-field. Parameters: T (D + D^2) + 2G.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoGuide
from pyro.nn import PyroParam
from torch.distributions import constraints

from bayesdream_model.constants import FEATURE_PLATE, GROUP_PLATE

INIT_SCALE = 0.1
AUX_SITE = "_feature_latent"


class AutoFeatureMVN(AutoGuide):
    """Per-feature multivariate normal over feature-plated sites; mean-field for the rest."""

    def __init__(self, model, *, init_loc_fn) -> None:
        super().__init__(model)
        self.init_loc_fn = init_loc_fn

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        self._layout: list[tuple[str, int, int]] = []  # (site, offset, width per feature)
        self._globals: list[str] = []
        locs, n_features = [], None
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            plates = {f.name for f in site["cond_indep_stack"]}
            value = self.init_loc_fn(site).detach()
            unconstrained = biject_to(site["fn"].support).inv(value)
            if FEATURE_PLATE not in plates:
                self._globals.append(name)
                setattr(self, f"loc_{name}", PyroParam(unconstrained.clone()))
                setattr(
                    self,
                    f"scale_{name}",
                    PyroParam(torch.full_like(unconstrained, INIT_SCALE), constraints.positive),
                )
                continue
            per_feature = unconstrained.reshape(-1, unconstrained.shape[-1]).T  # [T, k]
            n_features = per_feature.shape[0]
            offset = sum(width for _, _, width in self._layout)
            self._layout.append((name, offset, per_feature.shape[1]))
            locs.append(per_feature)
        loc = torch.cat(locs, dim=-1)  # [T, D]
        eye = torch.eye(loc.shape[-1], dtype=loc.dtype, device=loc.device)
        self.loc = PyroParam(loc.contiguous())
        self.scale_tril = PyroParam(
            (INIT_SCALE * eye).expand(n_features, -1, -1).clone(), constraints.lower_cholesky
        )

    def forward(self, *args, **kwargs) -> dict:
        """Draw every latent: one D-variate normal per feature, then each site by bijection."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        values = {}
        for name in self._globals:
            site = self.prototype_trace.nodes[name]
            base = dist.Normal(getattr(self, f"loc_{name}"), getattr(self, f"scale_{name}"))
            posterior = dist.TransformedDistribution(base, biject_to(site["fn"].support))
            values[name] = pyro.sample(name, posterior.to_event(base.batch_shape.__len__()))
        with plates[FEATURE_PLATE]:
            z = pyro.sample(
                AUX_SITE,
                dist.MultivariateNormal(self.loc, scale_tril=self.scale_tril),
                infer={"is_auxiliary": True},
            )  # [..., T, D]
            for name, offset, width in self._layout:
                values[name] = self._site(name, z[..., offset : offset + width], plates)
        return values

    def _site(self, name: str, z: torch.Tensor, plates: dict) -> torch.Tensor:
        """Place a feature block [..., T, k] at its site's shape; sample it as a Delta."""
        site = self.prototype_trace.nodes[name]
        if width_is_group_axis := GROUP_PLATE in {f.name for f in site["cond_indep_stack"]}:
            z = z.movedim(-1, -2)  # [..., k, T]
            if z.dim() > 3:  # a vectorised particle dim sits left of the group dim
                z = z.squeeze(-3)
        else:
            z = z.squeeze(-1)  # [..., T]
        transform = biject_to(site["fn"].support)
        value = transform(z)
        log_density = transform.inv.log_abs_det_jacobian(value, z)
        if width_is_group_axis:
            with plates[GROUP_PLATE]:
                return pyro.sample(name, dist.Delta(value, log_density=log_density))
        return pyro.sample(name, dist.Delta(value, log_density=log_density))
