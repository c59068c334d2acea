"""Adam under a one-cycle learning-rate schedule, the arithmetic of torch.optim's Adam and
OneCycleLR without torch.optim.

torch.optim's optimisers import torch._dynamo the first time they add parameters or step
(1.9 s on a 2-core reference machine, 12 % of the fit stage of a 4,000 x 3,000 screen),
for compiler hooks a fit never uses. These classes do the same operations in the same
order (tested bit for bit against torch.optim.Adam and OneCycleLR, including learning
rates changed between steps), and their state dicts have torch's layout, so a checkpoint
written with either resumes with the other.
"""

from __future__ import annotations

import math

import torch

#: the one-cycle momentum range (torch's OneCycleLR defaults): beta1 falls from 0.95 to
#: 0.85 while the rate rises, and rises back while it falls
BASE_MOMENTUM, MAX_MOMENTUM = 0.85, 0.95


class Adam:
    """Adam (no weight decay, no AMSGrad) on one parameter group, as torch.optim.Adam."""

    def __init__(
        self,
        params: list[torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.param_groups = [
            {
                "params": list(params),
                "lr": lr,
                "betas": betas,
                "eps": eps,
                "weight_decay": 0,
                "amsgrad": False,
                "maximize": False,
            }
        ]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every parameter's gradient (or zero it in place: `set_to_none=False`)."""
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none or p.grad is None:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every parameter that has a gradient."""
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(p)
                if state is None:
                    state = self.state[p] = {
                        "step": torch.tensor(0.0, dtype=torch.get_default_dtype()),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    }
                grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = state["step"].item()
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)

    def state_dict(self) -> dict:
        """torch.optim's layout: per-parameter state by index, groups with indices."""
        groups, state, index = [], {}, 0
        for group in self.param_groups:
            params = group["params"]
            groups.append(
                {k: v for k, v in group.items() if k != "params"}
                | {"params": list(range(index, index + len(params)))}
            )
            for i, p in enumerate(params, start=index):
                if p in self.state:
                    state[i] = self.state[p]
            index += len(params)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict) -> None:
        """Continue from `state_dict()` (ours or torch.optim.Adam's); tensors are copied."""
        groups = saved["param_groups"]
        if len(groups) != len(self.param_groups) or any(
            len(g["params"]) != len(mine["params"])
            for g, mine in zip(groups, self.param_groups, strict=True)
        ):
            raise ValueError("optimizer state of another set of parameters")
        self.state = {}
        for group, mine in zip(groups, self.param_groups, strict=True):
            for i, p in zip(group["params"], mine["params"], strict=True):
                if i in saved["state"]:
                    self.state[p] = {
                        k: v.to(p.device, p.dtype).clone() if k != "step" else v.clone()
                        for k, v in saved["state"][i].items()
                    }
            mine.update({k: v for k, v in group.items() if k != "params"})
            mine["betas"] = tuple(mine["betas"])


def _annealing_cos(start: float, end: float, pct: float) -> float:
    """Cosine from `start` to `end` as pct goes 0 -> 1 (torch's formula, to the bit)."""
    cos_out = math.cos(math.pi * pct) + 1
    return end + (start - end) / 2.0 * cos_out


class OneCycle:
    """torch's OneCycleLR (two phases, cosine, momentum cycled through beta1): the rate
    rises from max_lr / div_factor to max_lr over `pct_start` of `total_steps`, then
    falls to max_lr / div_factor / final_div_factor. It reads the group's rates anew each
    step, so scaling them (a recovery) lowers the rest of the schedule."""

    def __init__(
        self,
        optimizer: Adam,
        *,
        max_lr: float,
        total_steps: int,
        pct_start: float,
        div_factor: float,
        final_div_factor: float,
    ) -> None:
        self.optimizer = optimizer
        self.total_steps = total_steps
        self._schedule_phases = [
            {
                "end_step": float(pct_start * total_steps) - 1,
                "start_lr": "initial_lr",
                "end_lr": "max_lr",
                "start_momentum": "max_momentum",
                "end_momentum": "base_momentum",
            },
            {
                "end_step": total_steps - 1,
                "start_lr": "max_lr",
                "end_lr": "min_lr",
                "start_momentum": "base_momentum",
                "end_momentum": "max_momentum",
            },
        ]
        for group in optimizer.param_groups:
            group["initial_lr"] = max_lr / div_factor
            group["max_lr"] = max_lr
            group["min_lr"] = group["initial_lr"] / final_div_factor
            group["betas"] = (MAX_MOMENTUM, *group["betas"][1:])
            group["max_momentum"] = MAX_MOMENTUM
            group["base_momentum"] = BASE_MOMENTUM
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = -1
        self.step()

    def step(self) -> None:
        """Advance one step: set each group's rate and beta1 for the next update."""
        self.last_epoch += 1
        step_num = self.last_epoch
        if step_num > self.total_steps:
            raise ValueError(
                f"Tried to step {step_num} times. The specified number of total steps is "
                f"{self.total_steps}"
            )
        self._last_lr = []
        for group in self.optimizer.param_groups:
            start_step = 0.0
            for i, phase in enumerate(self._schedule_phases):
                end_step = phase["end_step"]
                if step_num <= end_step or i == len(self._schedule_phases) - 1:
                    pct = (step_num - start_step) / (end_step - start_step)
                    lr = _annealing_cos(group[phase["start_lr"]], group[phase["end_lr"]], pct)
                    momentum = _annealing_cos(
                        group[phase["start_momentum"]], group[phase["end_momentum"]], pct
                    )
                    break
                start_step = phase["end_step"]
            group["betas"] = (momentum, *group["betas"][1:])
            group["lr"] = lr
            self._last_lr.append(lr)

    def state_dict(self) -> dict:
        """The schedule's position and layout (the keys torch's OneCycleLR saves for them)."""
        return {
            "total_steps": self.total_steps,
            "_schedule_phases": [dict(phase) for phase in self._schedule_phases],
            "base_lrs": list(self.base_lrs),
            "last_epoch": self.last_epoch,
            "_step_count": self.last_epoch + 1,
            "_last_lr": list(self._last_lr),
            "_anneal_func_type": "cos",
            "cycle_momentum": True,
            "use_beta1": True,
        }

    def load_state_dict(self, saved: dict) -> None:
        """Continue from `state_dict()` (ours or torch's OneCycleLR's)."""
        self.total_steps = int(saved["total_steps"])
        self._schedule_phases = [dict(phase) for phase in saved["_schedule_phases"]]
        self.base_lrs = list(saved["base_lrs"])
        self.last_epoch = int(saved["last_epoch"])
        self._last_lr = list(saved["_last_lr"])
