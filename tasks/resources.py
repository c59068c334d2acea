"""What this machine offers: the fit device, its VRAM, and the memory budget for sampling."""

from __future__ import annotations

import os

import psutil
import torch

from bayesdream_model.memory import MemoryBudget, memory_budget
from tasks.errors import ConfigError


def resolve_device(requested: str) -> str:
    """auto -> cuda when a GPU is present, else cpu; cuda without a GPU is an error."""
    available = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if available else "cpu"
    if requested == "cuda" and not available:
        raise ConfigError(
            "fit.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu', or "
            "install a CUDA build of torch."
        )
    return requested


def total_vram(device: str) -> int | None:
    """Total memory of the GPU, for the guide choice."""
    if device != "cuda":
        return None
    return int(torch.cuda.get_device_properties(0).total_memory)


def sampling_budget(device: str) -> MemoryBudget:
    """SLURM allocation, else available RAM; free VRAM when sampling on the GPU."""
    cuda_free = int(torch.cuda.mem_get_info()[0]) if device == "cuda" else None
    return memory_budget(
        os.environ, available_ram=int(psutil.virtual_memory().available), cuda_free=cuda_free
    )


SMALL_PROBLEM_ELEMENTS = 2_000_000


def set_torch_threads(n_elements: int) -> int:
    """One thread for small fits, all cores for large ones; returns the number set.

    Small SVI steps are dominated by thread synchronisation: on this project's 2-core
    reference machine a 491 x 58 fit ran at 300 ms/step with 2 threads beside another
    busy process, and 8 ms/step with 1.
    """
    threads = 1 if n_elements < SMALL_PROBLEM_ELEMENTS else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads
