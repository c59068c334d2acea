"""A guide with a full covariance per feature over that feature's latents.

Mean-field under-covers here: the baseline (mu_ntc) and the group effects of a feature
are strongly correlated a posteriori (the baseline group's cells inform mu, group g's
cells inform mu + effect_g), so a factorised guide returns the conditional rather than
the marginal spread of each effect; with 3 equal groups the 90 % intervals covered ~75 %
of true effects on simulated screens. Here every feature t gets a Gaussian over its D
unconstrained latents (its C-1 effects, its baseline, its dispersion/scale) with a
D x D Cholesky factor; global sites (beta_o) stay mean-field. Parameters: T (2D + D^2) + 2G.

The Cholesky factor is `unit_tril @ diag(scale)`, i.e. the covariance is
U diag(scale^2) U^T with U unit lower-triangular: positive scales of the successive
innovations, and off-diagonal entries that are regression coefficients on them. A plain
lower-Cholesky parameter holds its off-diagonal entries in absolute units; once the
scales shrink to the posterior's (~0.01 for a multinomial baseline with 10^4 counts),
Adam's steps of ~lr around the one-cycle peak in those entries dwarf them, the loss
climbs and the fit diverged (multinomial, lr 0.01). Scaling the rows instead
(diag(scale) @ U) is stable too, but a direction the data leave to the prior (the mean
over categories of multinomial raw effects, which the centring removes) then needs
coefficients of ~prior/posterior width (~1e3), and fits stopped far from the optimum
with intervals too wide. With column scaling that direction is one wide innovation
with coefficients ~1.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoGuide
from pyro.nn import PyroParam
from torch.distributions.transforms import Transform

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
        self._layout: list[_Block] = []
        self._globals: list[str] = []
        locs, n_features = [], None
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            frames = {f.name: f for f in site["cond_indep_stack"]}
            value = self.init_loc_fn(site).detach()
            unconstrained = biject_to(site["fn"].support).inv(value)
            if FEATURE_PLATE not in frames:
                self._globals.append(name)
                setattr(self, f"loc_{name}", PyroParam(unconstrained.clone()))
                setattr(
                    self,
                    f"scale_{name}",
                    PyroParam(torch.full_like(unconstrained, INIT_SCALE), constraints.positive),
                )
                continue
            # the feature axis of the unconstrained value: plate dims count from the batch's end
            axis = len(site["fn"].batch_shape) + frames[FEATURE_PLATE].dim
            moved = unconstrained.movedim(axis, 0)  # [T, ...]
            n_features = moved.shape[0]
            per_feature = moved.reshape(n_features, -1)  # [T, k]
            offset = sum(block.width for block in self._layout)
            self._layout.append(
                _Block(
                    name,
                    offset,
                    per_feature.shape[1],
                    axis,
                    tuple(moved.shape),
                    GROUP_PLATE in frames,
                )
            )
            locs.append(per_feature)
        self._nesting = max(
            [
                -f.dim
                for _, s in self.prototype_trace.iter_stochastic_nodes()
                for f in s["cond_indep_stack"]
            ]
            + [1]
        )
        loc = torch.cat(locs, dim=-1)  # [T, D]
        eye = torch.eye(loc.shape[-1], dtype=loc.dtype, device=loc.device)
        self.loc = PyroParam(loc.contiguous())
        self.scale = PyroParam(torch.full_like(loc, INIT_SCALE), constraints.softplus_positive)
        self.unit_tril = PyroParam(
            eye.expand(n_features, -1, -1).clone(), constraints.unit_lower_cholesky
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
            transform = _Elementwise(biject_to(site["fn"].support))
            posterior = dist.TransformedDistribution(base, transform)
            values[name] = pyro.sample(name, posterior.to_event(base.batch_shape.__len__()))
        with plates[FEATURE_PLATE]:
            z = pyro.sample(AUX_SITE, self._posterior(), infer={"is_auxiliary": True})
            # z: [..., T, D]; under a vectorised particle plate [S, 1, ..., T, D]
            extra = z.shape[:-2]
            particles = extra[: max(len(extra) - (self._nesting - 1), 0)]
            z = z.reshape(*particles, *z.shape[-2:])  # plate placeholders dropped
            for block in self._layout:
                values[block.name] = self._site(block, z, particles, plates)
        return values

    def feature_point(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """The guide's loc [T, D] (a copy) with the feature sites named in `values`
        (constrained, each at its site's shape) put at their unconstrained values; other
        names are ignored."""
        loc = self.loc.detach().clone()
        for block in self._layout:
            if block.name not in values:
                continue
            support = self.prototype_trace.nodes[block.name]["fn"].support
            value = torch.as_tensor(values[block.name]).to(loc)
            unconstrained = biject_to(support).inv(value).movedim(block.axis, 0)
            loc[:, block.offset : block.offset + block.width] = unconstrained.reshape(
                loc.shape[0], block.width
            )
        return loc

    def feature_locs(self) -> dict[str, torch.Tensor]:
        """Each feature site's guide loc (its posterior mean, unconstrained), at the site's
        shape without the sample dims (detached copies)."""
        loc = self.loc.detach()
        return {
            block.name: loc[:, block.offset : block.offset + block.width]
            .reshape(block.moved)
            .movedim(0, block.axis)
            .clone()
            for block in self._layout
        }

    def global_locs(self) -> dict[str, torch.Tensor]:
        """Each global site's guide loc, unconstrained (detached copies)."""
        return {name: getattr(self, f"loc_{name}").detach().clone() for name in self._globals}

    def global_transform(self, name: str) -> Transform:
        """The bijection from a global site's unconstrained loc to its support."""
        return biject_to(self.prototype_trace.nodes[name]["fn"].support)

    def set_global_normal(self, name: str, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """A global site's mean-field normal, in its unconstrained space."""
        with torch.no_grad():
            setattr(self, f"loc_{name}", loc.to(getattr(self, f"loc_{name}")).contiguous())
            setattr(self, f"scale_{name}", scale.to(getattr(self, f"scale_{name}")).contiguous())

    def feature_log_density(self, trace) -> torch.Tensor:
        """Σ of the feature sites' log densities in a trace of this guide: the log Jacobians
        -log|dx/dz| of their bijections, so that log p(x) minus this is the log joint of the
        unconstrained latents z, the density the per-feature normal approximates."""
        total = 0.0
        for block in self._layout:
            site = trace.nodes[block.name]
            total = total + site["fn"].log_prob(site["value"]).sum()
        return total

    def set_feature_normal(
        self, loc: torch.Tensor, scale_tril: torch.Tensor, use: torch.Tensor
    ) -> None:
        """Start features where `use` [T] holds at N(loc [T, D], L L^T), L = scale_tril
        [T, D, D] lower-triangular with a positive diagonal; the others keep their start."""
        scale = torch.diagonal(scale_tril, dim1=-2, dim2=-1)
        unit = scale_tril / scale.unsqueeze(-2)  # columns divided by their scale
        pick = use.to(self.loc.device)
        # contiguous: a Cholesky factor comes column-major from LAPACK, and a parameter
        # laid out so sums in another order than one restored from a checkpoint (the
        # resumed fit would differ in the last bit)
        with torch.no_grad():
            self.loc = torch.where(pick[:, None], loc.to(self.loc), self.loc).contiguous()
            self.scale = torch.where(pick[:, None], scale.to(self.scale), self.scale).contiguous()
            self.unit_tril = torch.where(
                pick[:, None, None], unit.to(self.unit_tril), self.unit_tril
            ).contiguous()

    def scale_tril(self) -> torch.Tensor:
        """[T, D, D]: each feature's Cholesky factor, unit_tril @ diag(scale)."""
        return self.unit_tril * self.scale.unsqueeze(-2)

    def _posterior(self) -> dist.TransformedDistribution:
        """N(loc, L L^T) per feature, as standard normal noise through z = loc + L eps.

        The same law as MultivariateNormal(loc, scale_tril=L), but its density is taken
        from the cached noise (log N(eps) - sum log scale) rather than a triangular
        solve, and L eps is a broadcast product rather than T tiny matrix products: the
        guide's share of a multinomial step (T = 3000, D = 11) halves.
        """
        base = dist.Normal(torch.zeros_like(self.loc), torch.ones_like(self.loc)).to_event(1)
        return dist.TransformedDistribution(
            base, _FeatureAffine(self.loc, self.scale_tril(), self.scale)
        )

    def _site(self, block: _Block, z: torch.Tensor, particles: tuple, plates: dict):
        """A feature block [P, T, k] at its site's shape, sampled as a Delta."""
        site = self.prototype_trace.nodes[block.name]
        fn = site["fn"]
        lead = len(particles)
        part = z[..., block.offset : block.offset + block.width].reshape(*particles, *block.moved)
        part = part.movedim(lead, lead + block.axis)  # [P, *batch, *event] of the site
        if particles:  # particle dims sit left of all plate dims: pad the site's batch
            pad = self._nesting - len(fn.batch_shape)
            part = part.reshape(*particles, *([1] * pad), *part.shape[lead:])
        transform = biject_to(fn.support)
        value = transform(part)
        log_density = transform.inv.log_abs_det_jacobian(value, part)
        delta = dist.Delta(value, log_density=log_density, event_dim=fn.event_dim)
        if block.in_groups:
            with plates[GROUP_PLATE]:
                return pyro.sample(block.name, delta)
        return pyro.sample(block.name, delta)


@dataclass(frozen=True)
class _Block:
    """Where one feature-plated site sits in a feature's D latents."""

    name: str
    offset: int
    width: int
    axis: int  # the feature axis in the site's unconstrained value
    moved: tuple[int, ...]  # that value's shape with the feature axis first
    in_groups: bool


class _Elementwise(Transform):
    """An elementwise bijection whose output shape is its input's.

    torch works out the shape of a TransformedDistribution through `torch.broadcast_shapes`
    where the bijection holds an affine part (a Gamma's support, x >= 0, maps as
    exp then + 0), and that call imports sympy: ~0.5 s once per process, a tenth of a fit
    stage. An elementwise map cannot change a shape, so this asks nothing of torch."""

    bijective = True

    def __init__(self, inner: Transform) -> None:
        super().__init__()
        self.inner = inner
        self.domain, self.codomain = inner.domain, inner.codomain

    @property
    def sign(self) -> int:
        return self.inner.sign

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.inner.inv(y)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.inner.log_abs_det_jacobian(x, y)


class _FeatureAffine(Transform):
    """z = loc + L eps for a batch of lower-triangular L with diagonal `diag`."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor, diag: torch.Tensor) -> None:
        super().__init__(cache_size=1)  # log_prob of a drawn z reuses its eps
        self.loc, self.scale_tril, self.diag = loc, scale_tril, diag

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.loc + (self.scale_tril * x.unsqueeze(-2)).sum(-1)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        centred = (y - self.loc).unsqueeze(-1)
        tril = self.scale_tril.expand(*centred.shape[:-2], *self.scale_tril.shape[-2:])
        return torch.linalg.solve_triangular(tril, centred, upper=False).squeeze(-1)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.diag.log().sum(-1).expand(x.shape[:-1])
