"""The Laplace start of the per-feature guide: each feature's MAP and Laplace covariance.

Given the global sites (negbinom's beta_o), the log joint is a sum over features of
terms that each depend on one feature's D unconstrained latents z_t (its effects,
baseline, dispersion or scale): its gradient [T, D] is one backward pass, its Hessian
[T, D, D] is D more (double backward where the family's likelihood is plain torch), or
2D gradients at z ± h e_d (central differences where the likelihood is a custom
autograd Function with a hand-written first derivative only: negbinom, Student-t; while
the features are still far from their MAP, D gradients at z + h e_d, one-sided). So a
few damped Newton steps, batched over every feature at once, reach every feature's MAP
for the price of a few dozen SVI steps, and the inverse negative Hessian there is the
Laplace covariance. The guide starts at N(MAP, H^-1); SVI then only polishes (the
variational optimum of a nearly Gaussian posterior is close to its Laplace
approximation) instead of walking from the initial values at a learning rate that must
first warm up: the fits of the benchmark screens took 4,500-13,000 steps that way.

Newton per feature: the step -|H|^-1 g (eigenvalues taken by absolute value and floored,
so a saddle or a flat direction still gives a descent direction), at most `max_radius`
posterior standard deviations long; no per-feature objective value exists (the
likelihood is one sum over features), so the line search works on the directional
derivative g(z + a p).p, which must fall below half its starting size in absolute value
(on a quadratic: a < 1.5 a*, where the objective still decreases); otherwise a shrinks
to the secant estimate of the line minimum. A feature has converged when its Hessian is
positive definite and its Newton decrement g^T H^-1 g (twice the predicted excess of its
objective over the optimum, in nats) is below `tolerance`. Features that do not converge
keep the guide's usual start (initial values, scales 0.1), and the fit then runs the
reference's schedule (`bayesdream_model.fit.svi_settings`). Global sites get the same
Newton steps with the features held, alternating with them (`laplace_start`).

Everything is deterministic (no random draws), so a resumed fit need not repeat it: the
checkpoint holds the guide it produced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from pyro import poutine

from bayesdream_model.feature_guide import AUX_SITE, AutoFeatureMVN

log = logging.getLogger(__name__)

SecondDerivatives = Literal["autograd", "finite_differences"]
Passes = Callable[[], Iterator[None]]  # sets each part of the data in turn (a cell stream)


@dataclass(frozen=True)
class LaplaceSettings:
    """Newton's limits; the finite-difference step is `fd_fraction` of a posterior sd."""

    max_iters: int = 25
    tolerance: float = 1e-3  # the Newton decrement: ~0.03 posterior sd from the MAP
    max_backtracks: int = 8
    max_radius: float = 30.0  # a step is at most this many posterior sds (|H| metric)
    #: and moves no coordinate further than this (unconstrained units: log o_y, log mu, log2
    #: effects): where the curvature vanishes (a dispersion near the Poisson limit) the sds
    #: are huge, and a step of 30 of them ran to phi ~ e^50, where no gradient is accurate
    max_move: float = 4.0
    fd_fraction: float = 0.1
    #: one-sided differences (D gradients, not 2D) while some moving feature's decrement
    #: was above this at the iteration before: far from the MAP a Hessian off by a few %
    #: still gives a good step (the next decrement is ~its square's share of this), and
    #: the iterations that decide convergence and give the covariance are central
    one_sided_above: float = 30.0
    fd_first: float = 1e-2  # first step's h, x (1 + |z|), before any curvature is known
    eigen_floor: float = 1e-9  # |eigenvalues| floored at this x the largest (per feature)
    global_rounds: int = 1  # globals, then the features again (models with global sites)


@dataclass(frozen=True)
class LaplaceResult:
    """How the start went: Newton iterations, gradient evaluations (each of the whole
    data, about one SVI step's work), features that took the Laplace start or kept theirs."""

    iterations: int
    gradient_evaluations: int
    features_converged: int
    features_kept_start: int
    seconds: float
    kept_features: list[int]  # the features that kept their start (indices)

    def summary(self) -> dict:
        """Plain data (stored with the fit and in its checkpoints)."""
        return asdict(self)


def laplace_start(
    model,
    guide: AutoFeatureMVN,
    *,
    second_derivatives: SecondDerivatives,
    passes: Passes | None = None,
    settings: LaplaceSettings = LaplaceSettings(),
    start: dict[str, torch.Tensor] | None = None,
) -> LaplaceResult:
    """Move `guide`'s per-feature normals to each feature's MAP and Laplace covariance, and
    its global sites (beta_o) to their MAP given the features.

    Features and globals alternate (`global_rounds` times): the globals couple the
    features only through their priors (beta_o through o_y ~ Exponential(beta_o)), weakly,
    so two rounds reach the joint MAP. (Globals first, at their MAP given the features'
    start, would save the features' second run, but the start would then depend on the
    initial values: two starts ended 0.05 posterior sd apart.) `passes`, for a fit whose cells are streamed, loads
    each batch of cells in turn: every gradient is then the mean of the batches' (scaled)
    gradients, the whole data's exactly, so the start is the in-memory fit's start.
    `start` (constrained values by site, `Family.newton_start`) is where Newton begins
    for the sites it names; the others begin at the guide's loc.
    """
    began = time.perf_counter()
    start = start or {}
    objective = _Objective(model, guide, second_derivatives, passes)
    objective.set_globals(start)
    newton = _Newton(objective, settings)
    z, hessian, converged, iterations = newton.run(guide.feature_point(start))
    precision = None
    for _ in range(settings.global_rounds if objective.u.numel() else 0):
        precision, steps = _global_newton(objective, z, settings)
        z, hessian, converged, more = newton.run(z, near=True)
        iterations += steps + more
    cov_chol, ok = _laplace_cholesky(hessian)
    use = converged & ok
    guide.set_feature_normal(z, cov_chol, use)
    if precision is not None and bool(torch.isfinite(precision).all() & (precision > 0).all()):
        scale = precision.clamp_min(1e-30).rsqrt()  # the mean-field optimum: 1 / sqrt(H_ii)
        for name, (loc, sd) in objective.split(objective.u, scale).items():
            guide.set_global_normal(name, loc, sd)
    result = LaplaceResult(
        iterations=iterations,
        gradient_evaluations=objective.evaluations,
        features_converged=int(use.sum()),
        features_kept_start=int((~use).sum()),
        seconds=round(time.perf_counter() - began, 3),
        kept_features=torch.nonzero(~use).flatten().tolist(),
    )
    if result.features_kept_start:
        _warn_kept(converged, ok, settings)
    log.info(
        "Laplace start: %d features at their MAP after %d Newton iterations (%d gradient "
        "evaluations, %.1f s); %d kept the initial values",
        result.features_converged,
        iterations,
        result.gradient_evaluations,
        result.seconds,
        result.features_kept_start,
    )
    return result


def _warn_kept(converged: torch.Tensor, ok: torch.Tensor, settings: LaplaceSettings) -> None:
    """Why features kept the initial values, counted (they are flagged in the results)."""
    log.warning(
        "Laplace start: %d features kept their initial values (%d did not reach their MAP "
        "within %d Newton iterations, %d had no positive-definite curvature there); the fit "
        "runs the long schedule, and the results flag them (start_not_converged)",
        int((~(converged & ok)).sum()),
        int((~converged).sum()),
        settings.max_iters,
        int((converged & ~ok).sum()),
    )


class _Objective:
    """f(z, u) = -log p(x) - log|dx/dz| - log|dx/du|: the negative log joint of the
    features' unconstrained latents z [T, D] and the globals' u [G] (flattened)."""

    def __init__(self, model, guide, second: SecondDerivatives, passes: Passes | None) -> None:
        self.model, self.guide, self.second = model, guide, second
        self.passes = passes or _one_pass
        locs = guide.global_locs()
        self.shapes = {name: loc.shape for name, loc in locs.items()}
        self.u = torch.cat([loc.reshape(-1) for loc in locs.values()] or [guide.loc.new_zeros(0)])
        self.evaluations = 0  # gradients of the whole data (a pass counts once per point)

    def set_globals(self, values: dict[str, torch.Tensor]) -> None:
        """Put the globals named in `values` (constrained) at their unconstrained values."""
        pieces = []
        for name, (loc,) in self.split(self.u).items():
            if name in values:
                loc = self.guide.global_transform(name).inv(torch.as_tensor(values[name]).to(loc))
            pieces.append(loc.reshape(-1))
        self.u = torch.cat(pieces) if pieces else self.u

    def split(self, *flat: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
        """Flat global vectors [G] -> each global site's pieces, by name."""
        out, offset = {}, 0
        for name, shape in self.shapes.items():
            size = shape.numel()
            out[name] = tuple(f[offset : offset + size].reshape(shape) for f in flat)
            offset += size
        return out

    def value(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """f at (z, u), on the current data."""
        fixed, log_jacobian = {}, 0.0
        for name, (loc,) in self.split(u).items():
            transform = self.guide.global_transform(name)
            fixed[name] = transform(loc)
            log_jacobian = log_jacobian + transform.log_abs_det_jacobian(loc, fixed[name]).sum()
        data = {AUX_SITE: z, **fixed}
        guide_trace = poutine.trace(poutine.condition(self.guide, data=data)).get_trace()
        held = poutine.condition(self.model, data=fixed)  # the globals, as observed
        model_trace = poutine.trace(poutine.replay(held, trace=guide_trace)).get_trace()
        log_joint = model_trace.log_prob_sum() + log_jacobian
        return self.guide.feature_log_density(guide_trace) - log_joint

    def _gradient(self, z, u, *, wrt_globals: bool = False, graph: bool = False):
        z, u = z.detach().requires_grad_(not wrt_globals), u.detach().requires_grad_(wrt_globals)
        point = u if wrt_globals else z
        (grad,) = torch.autograd.grad(self.value(z, u), point, create_graph=graph)
        return point, grad

    def gradients(self, points: list[torch.Tensor], *, z=None) -> list[torch.Tensor]:
        """f's gradient at each point: points of z [T, D] (u held), or with `z` given,
        points of u [G] (z held). One pass over the data for all of them."""
        totals = [torch.zeros_like(p) for p in points]
        parts = 0
        for _ in self.passes():
            parts += 1
            for total, point in zip(totals, points, strict=True):
                if z is None:
                    total += self._gradient(point, self.u)[1].detach()
                else:
                    total += self._gradient(z, point, wrt_globals=True)[1].detach()
        self.evaluations += len(points)
        return [t / parts for t in totals]

    def derivatives(
        self,
        z: torch.Tensor,
        h: torch.Tensor,
        grad: torch.Tensor | None = None,
        *,
        one_sided: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient [T, D] and Hessian [T, D, D] at z; `h` [T, D]: finite-difference steps
        (central, or `one_sided`); `grad`: the gradient at z when known (the line
        search's), not evaluated again."""
        if self.second == "autograd":
            return self._autograd_hessian(z)
        return _central_differences(self.gradients, z, h, grad, one_sided=one_sided)

    @property
    def exact_hessian(self) -> bool:
        """Whether the Hessian is autograd's (no differences to choose)."""
        return self.second == "autograd"

    def _autograd_hessian(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row d of every feature's Hessian is the gradient of Σ_t g[t, d] (features are
        independent, so no cross-feature terms): D backward passes through the gradient."""
        grad_total, hess_total, parts = torch.zeros_like(z), None, 0
        for _ in self.passes():
            parts += 1
            point, grad = self._gradient(z, self.u, graph=True)
            rows = [
                torch.autograd.grad(grad[:, d].sum(), point, retain_graph=True)[0]
                for d in range(z.shape[-1])
            ]
            hess = torch.stack(rows, dim=-2).detach()
            grad_total += grad.detach()
            hess_total = hess if hess_total is None else hess_total + hess
        self.evaluations += 1 + z.shape[-1]
        hessian = hess_total / parts
        return grad_total / parts, 0.5 * (hessian + hessian.transpose(-1, -2))


def _central_differences(
    gradients, z: torch.Tensor, h: torch.Tensor, grad=None, *, one_sided: bool = False
):
    """(g(z), symmetrised Hessian) of points [..., D] from g at z (`grad` when known) and
    z ± h_d e_d (`one_sided`: z + h_d e_d only, error O(h) instead of O(h²))."""
    width = z.shape[-1]
    points = [] if grad is not None else [z]
    for d in range(width):
        step = torch.zeros_like(z)
        step[..., d] = h[..., d]
        points += [z + step] if one_sided else [z + step, z - step]
    grads = gradients(points)
    if grad is not None:
        grads = [grad, *grads]
    if one_sided:
        columns = [(grads[1 + d] - grads[0]) / h[..., d, None] for d in range(width)]
    else:
        columns = [
            (grads[1 + 2 * d] - grads[2 + 2 * d]) / (2 * h[..., d, None]) for d in range(width)
        ]
    hessian = torch.stack(columns, dim=-1)
    return grads[0], 0.5 * (hessian + hessian.transpose(-1, -2))


def _one_pass() -> Iterator[None]:
    yield


class _Newton:
    """Damped Newton steps for every feature at once (module docstring)."""

    def __init__(self, objective: _Objective, settings: LaplaceSettings) -> None:
        self.objective, self.settings = objective, settings

    def run(
        self, z: torch.Tensor, *, near: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(z at the end, its Hessian, which features converged, Newton iterations); `near`:
        z is close to the MAP already (central differences from the first iteration)."""
        settings = self.settings
        h = settings.fd_first * (1.0 + z.abs())
        known = None  # the gradient at z, once a line search has evaluated it
        far = not (near or self.objective.exact_hessian)  # one-sided until near the MAP
        for iteration in range(settings.max_iters + 1):
            grad, hessian = self.objective.derivatives(z, h, known, one_sided=far)
            step, decrement, converged, moving = _newton_step(grad, hessian, settings)
            if far and (iteration == settings.max_iters or not moving.any()):
                # the last Hessian gives the covariance: central, at this same z
                grad, hessian = self.objective.derivatives(z, h, grad)
                step, decrement, converged, moving = _newton_step(grad, hessian, settings)
            far = far and bool(moving.any()) and decrement[moving].max() > settings.one_sided_above
            if iteration == settings.max_iters or not moving.any():
                return z, hessian, converged, iteration
            z, known = _line_search(
                self.objective.gradients, z, grad, step, settings.max_backtracks
            )
            h = _next_steps(hessian, z, h, settings)
        raise AssertionError("unreachable")


def _global_newton(
    objective: _Objective, z: torch.Tensor, settings: LaplaceSettings
) -> tuple[torch.Tensor, int]:
    """Newton on the globals u [G] with the features held at z (central differences of
    the gradient: G is tiny); updates `objective.u`, returns the Hessian's diagonal there
    and the iterations run."""
    u = objective.u[None]  # one "feature" of G coordinates
    h = settings.fd_first * (1.0 + u.abs())

    def gradients(points: list[torch.Tensor]) -> list[torch.Tensor]:
        return [g[None] for g in objective.gradients([p[0] for p in points], z=z)]

    for iteration in range(settings.max_iters + 1):
        grad, hessian = _central_differences(gradients, u, h)
        step, _, _, moving = _newton_step(grad, hessian, settings)
        if iteration == settings.max_iters or not moving.any():
            break
        u, _ = _line_search(gradients, u, grad, step, settings.max_backtracks)
        h = _next_steps(hessian, u, h, settings)
    objective.u = u[0]
    return torch.diagonal(hessian[0]), iteration


def _newton_step(grad: torch.Tensor, hessian: torch.Tensor, settings: LaplaceSettings):
    """The damped step -|H|^-1 g (at most `max_radius` sds long, no coordinate moved more
    than `max_move`; 0 where converged), the
    decrement g^T |H|^-1 g, and which rows have converged / must still move."""
    step, decrement, positive = _raw_step(grad, hessian, settings.eigen_floor)
    finite = torch.isfinite(grad).all(-1) & torch.isfinite(hessian).flatten(1).all(-1)
    converged = finite & positive & (decrement < settings.tolerance)
    moving = finite & ~converged
    radius = torch.sqrt(decrement.clamp_min(0.0))
    step = step * (settings.max_radius / radius.clamp_min(settings.max_radius))[:, None]
    move = step.abs().amax(-1)
    step = step * (settings.max_move / move.clamp_min(settings.max_move))[:, None]
    return torch.where(moving[:, None], step, 0.0), decrement, converged, moving


def _next_steps(hessian, z, h, settings: LaplaceSettings) -> torch.Tensor:
    """Finite-difference steps for the next Hessian: `fd_fraction` of each coordinate's
    posterior sd (diag |H|^-1), floored well above float32 rounding of z."""
    fresh = settings.fd_fraction * torch.sqrt(_abs_inverse_diagonal(hessian, settings.eigen_floor))
    floor = 1e-5 * (1.0 + z.abs())
    return torch.where(torch.isfinite(fresh), fresh.clamp_min(floor), h)


def _line_search(gradients, z: torch.Tensor, grad: torch.Tensor, step: torch.Tensor, tries: int):
    """z + a step per row, a from 1 down until the directional derivative at the new point
    is below half its size at z (rows that never get there stay at z); and the gradient
    at the new z (rows that stayed: `grad`)."""
    slope0 = (grad * step).sum(-1)  # < 0 where moving, 0 where not
    alpha = torch.ones_like(slope0)
    pending = slope0 < 0
    for _ in range(tries + 1):
        if not pending.any():
            break
        trial = z + (alpha * pending)[:, None] * step
        (g_new,) = gradients([trial])
        slope = (g_new * step).sum(-1)
        good = torch.isfinite(g_new).all(-1) & (slope <= 0.5 * slope0.abs())
        z = torch.where((pending & good)[:, None], trial, z)
        grad = torch.where((pending & good)[:, None], g_new, grad)
        pending = pending & ~good
        secant = slope0.abs() / (slope0.abs() + slope.clamp_min(0.0))
        shrink = torch.where(torch.isfinite(secant), secant.clamp(0.1, 0.5), 0.1)
        alpha = torch.where(pending, alpha * shrink, alpha)
    return z, grad


def _eigen(hessian: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigen-decomposition in float64 (D is small; the spread of curvatures is not):
    |eigenvalues| floored at `floor` x the largest, eigenvectors, and positive definiteness."""
    values, vectors = torch.linalg.eigh(torch.nan_to_num(hessian.double()))
    top = values.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    positive = values.amin(-1) > floor * top.squeeze(-1)
    return values.abs().clamp_min(floor * top), vectors, positive


def _raw_step(
    grad: torch.Tensor, hessian: torch.Tensor, floor: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-|H|^-1 g [T, D], the decrement g^T |H|^-1 g [T], and whether H is positive definite."""
    values, vectors, positive = _eigen(hessian, floor)
    g = torch.nan_to_num(grad.double()).unsqueeze(-1)
    rotated = vectors.transpose(-1, -2) @ g
    step = -(vectors @ (rotated / values.unsqueeze(-1))).squeeze(-1)
    decrement = (rotated.squeeze(-1) ** 2 / values).sum(-1)
    return step.to(grad.dtype), decrement.to(grad.dtype), positive


def _abs_inverse_diagonal(hessian: torch.Tensor, floor: float) -> torch.Tensor:
    """diag(|H|^-1) [T, D]: each coordinate's posterior variance (for the next FD step)."""
    values, vectors, _ = _eigen(hessian, floor)
    return ((vectors**2) / values.unsqueeze(-2)).sum(-1).to(hessian.dtype)


def _laplace_cholesky(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Cholesky factor of H^-1 [T, D, D] and where it exists (H positive definite)."""
    precision = torch.nan_to_num(hessian.double())
    chol, info = torch.linalg.cholesky_ex(precision)
    ok = info == 0
    eye = torch.eye(hessian.shape[-1], dtype=precision.dtype, device=precision.device)
    safe = torch.where(ok[:, None, None], chol, eye)
    covariance = torch.cholesky_inverse(safe)
    cov_chol, info = torch.linalg.cholesky_ex(covariance)
    ok = ok & (info == 0) & torch.isfinite(cov_chol).flatten(1).all(-1)
    return torch.where(ok[:, None, None], cov_chol, eye).to(hessian.dtype), ok
