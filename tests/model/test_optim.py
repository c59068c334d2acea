"""Our Adam and one-cycle schedule take torch.optim's steps, bit for bit, and read its
checkpoints (they exist so that a fit does not import torch._dynamo)."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch.optim.lr_scheduler import OneCycleLR

from bayesdream_model.optim import Adam, OneCycle
from bayesdream_model.recovery import scale_learning_rates

SCHEDULE = {"max_lr": 0.05, "total_steps": 120, "pct_start": 0.25}
DIVS = {"div_factor": 25.0, "final_div_factor": 1e4}


def _params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(5, 3, generator=generator)),
        torch.nn.Parameter(torch.randn(7, generator=generator, dtype=torch.float64)),
    ]


def _loss(params: list[torch.nn.Parameter], step: int) -> torch.Tensor:
    """A non-quadratic loss whose gradients change sign and scale along the way."""
    a, b = params
    return (a.sin() * (step % 7 + 1)).sum() + (b**4).sum() - (a[0] * b[:3].float()).sum()


def _run(optimizer, scheduler, params, steps: range) -> list[torch.Tensor]:
    """SVI's pattern: zero_grad, backward, step, schedule; a recovery-like rescale of every
    rate at step 40 and an anneal-like override of the rate at 90."""
    for step in steps:
        if step == 40:
            scale_learning_rates(optimizer.param_groups, 0.3)
        if step == 90:
            optimizer.param_groups[0]["lr"] = 1e-4
        optimizer.zero_grad(set_to_none=True)
        _loss(params, step).backward()
        optimizer.step()
        if step < 95:
            scheduler.step()
    return [p.detach().clone() for p in params]


def test_adam_and_one_cycle_equal_torch_optim_bit_for_bit() -> None:
    ours, theirs = _params(0), _params(0)
    opt_ours = Adam(ours, lr=0.01)
    opt_theirs = torch.optim.Adam(theirs, lr=0.01, betas=(0.9, 0.999))
    sched_ours = OneCycle(opt_ours, **SCHEDULE, **DIVS)
    sched_theirs = OneCycleLR(opt_theirs, **SCHEDULE, **DIVS)
    got = _run(opt_ours, sched_ours, ours, range(100))
    want = _run(opt_theirs, sched_theirs, theirs, range(100))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert not torch.equal(got[0], _params(0)[0])  # it moved
    assert opt_ours.param_groups[0]["betas"] == opt_theirs.param_groups[0]["betas"]


def test_a_torch_optim_checkpoint_resumes_with_ours() -> None:
    """State dicts of torch's Adam and OneCycleLR (checkpoints of earlier versions) load
    into ours, and the fit goes on exactly as torch's would have."""
    first, second = _params(1), _params(1)
    torch_opt = torch.optim.Adam(first, lr=0.01, betas=(0.9, 0.999))
    torch_sched = OneCycleLR(torch_opt, **SCHEDULE, **DIVS)
    _run(torch_opt, torch_sched, first, range(30))
    with torch.no_grad():
        for a, b in zip(first, second, strict=True):
            b.copy_(a)
    ours = Adam(second, lr=0.01)
    schedule = OneCycle(ours, **SCHEDULE, **DIVS)
    ours.load_state_dict(torch_opt.state_dict())
    schedule.load_state_dict(torch_sched.state_dict())
    want = _run(torch_opt, torch_sched, first, range(30, 100))
    got = _run(ours, schedule, second, range(30, 100))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    # and ours round-trips through its own state dict
    again = Adam(_params(2), lr=0.01)
    again.load_state_dict(ours.state_dict())
    assert torch.equal(
        again.state[again.param_groups[0]["params"][0]]["exp_avg"],
        ours.state[second[0]]["exp_avg"],
    )


def test_a_fit_does_not_import_the_compiler() -> None:
    """The point of these classes: SVI steps without torch._dynamo (1.9 s to import)."""
    script = (
        "import sys, torch\n"
        "from bayesdream_model.optim import Adam, OneCycle\n"
        "p = [torch.nn.Parameter(torch.ones(3))]\n"
        "opt = Adam(p, lr=0.1)\n"
        "sched = OneCycle(opt, max_lr=0.1, total_steps=10, pct_start=0.3, div_factor=25.0,"
        " final_div_factor=1e4)\n"
        "p[0].sum().backward(); opt.step(); sched.step()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
