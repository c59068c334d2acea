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


def set_torch_threads(requested: int | None) -> int:
    """Torch intra-op threads for a CPU fit: `fit.threads` (threads, not elements), default 1.

    The likelihoods run block by block over cells in cache-sized pieces; on this
    project's 2-core reference machine one thread was 5-20x faster than two for them
    (Student-t pass over 4,000 x 3,000: 29 ms on 1 thread, 640 ms on 2 beside another busy
    process). Parallelism comes from running modality chains side by side instead.
    """
    threads = requested or 1
    torch.set_num_threads(threads)
    return threads
