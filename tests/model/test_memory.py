"""Memory planning for posterior sampling: budgets from faked environments, batch plans."""

from __future__ import annotations

import pytest

from bayesdream_model.memory import (
    MemoryBudget,
    SamplingPlan,
    bytes_per_sample,
    memory_budget,
    plan_sampling,
    slurm_bytes,
)

MIB = 1024**2
GIB = 1024**3
RAM = 16 * GIB


# -- slurm_bytes --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"SLURM_MEM_PER_NODE": "4096"}, 4096 * MIB),
        ({"SLURM_MEM_PER_CPU": "2000", "SLURM_CPUS_ON_NODE": "4"}, 8000 * MIB),
        ({"SLURM_MEM_PER_CPU": "2000", "SLURM_CPUS_PER_TASK": "3"}, 6000 * MIB),
        # the per-node figure wins over per-CPU
        (
            {"SLURM_MEM_PER_NODE": "1000", "SLURM_MEM_PER_CPU": "64", "SLURM_CPUS_ON_NODE": "2"},
            1000 * MIB,
        ),
        # CPUs on the node, where both are given
        (
            {"SLURM_MEM_PER_CPU": "100", "SLURM_CPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "2"},
            800 * MIB,
        ),
    ],
)
def test_slurm_bytes_reads_the_allocation(environ: dict[str, str], expected: int) -> None:
    assert slurm_bytes(environ) == expected


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"PATH": "/usr/bin", "HOME": "/root"},
        {"SLURM_MEM_PER_NODE": "lots"},
        {"SLURM_MEM_PER_NODE": ""},
        {"SLURM_MEM_PER_CPU": "2G", "SLURM_CPUS_ON_NODE": "4"},
        {"SLURM_MEM_PER_CPU": "2000", "SLURM_CPUS_ON_NODE": "four"},
        {"SLURM_MEM_PER_CPU": "2000", "SLURM_JOB_CPUS_PER_NODE": "4(x2)"},
        {"SLURM_MEM_PER_CPU": "2000"},  # no CPU count: not an allocation
        {"SLURM_CPUS_ON_NODE": "4"},
    ],
)
def test_slurm_bytes_ignores_missing_and_garbage(environ: dict[str, str]) -> None:
    assert slurm_bytes(environ) is None


@pytest.mark.parametrize("value", ["0", "-5"])
def test_slurm_bytes_ignores_non_positive_allocations(value: str) -> None:
    """sbatch --mem=0 means all of the node's memory: no number to plan with (was a bug)."""
    assert slurm_bytes({"SLURM_MEM_PER_NODE": value}) is None
    assert slurm_bytes({"SLURM_MEM_PER_CPU": value, "SLURM_CPUS_ON_NODE": "4"}) is None
    assert memory_budget({"SLURM_MEM_PER_NODE": value}, available_ram=RAM).usable_bytes == RAM


# -- memory_budget ------------------------------------------------------------------------
def test_budget_from_slurm_uses_safety_0_7() -> None:
    budget = memory_budget({"SLURM_MEM_PER_NODE": "8192"}, available_ram=RAM)
    assert budget.usable_bytes == 8 * GIB
    assert budget.safety == 0.7
    assert budget.safe_bytes == pytest.approx(0.7 * 8 * GIB)
    assert "SLURM" in budget.source


@pytest.mark.parametrize("environ", [{}, {"SLURM_MEM_PER_NODE": "garbage"}])
def test_budget_without_slurm_uses_available_ram_and_safety_0_35(environ: dict[str, str]) -> None:
    budget = memory_budget(environ, available_ram=RAM)
    assert budget.usable_bytes == RAM
    assert budget.safety == 0.35
    assert budget.safe_bytes == pytest.approx(0.35 * RAM)


@pytest.mark.parametrize("environ", [{}, {"SLURM_MEM_PER_NODE": "8192"}])
def test_cuda_free_memory_wins(environ: dict[str, str]) -> None:
    budget = memory_budget(environ, available_ram=RAM, cuda_free=3 * GIB)
    assert budget.usable_bytes == 3 * GIB
    assert budget.safety == 0.35
    assert "cuda" in budget.source.lower()


# -- plan_sampling ------------------------------------------------------------------------
def budget_for(n_draws: float, shape: tuple[int, int, int]) -> MemoryBudget:
    """A budget whose safe part holds the inputs plus `n_draws` draws (safety 1 for clarity)."""
    n_cells, n_features, n_groups = shape
    usable = n_draws * bytes_per_sample(n_cells, n_features, n_groups)
    return MemoryBudget(int(usable), "test budget", 1.0)


def assert_covers_exactly_once(plan: SamplingPlan) -> None:
    covered = [i for start, stop in plan.batches() for i in range(start, stop)]
    assert covered == list(range(plan.nsamples))
    assert len(plan.batches()) == plan.n_batches
    assert all(0 < stop - start <= plan.batch_size for start, stop in plan.batches())


@pytest.mark.parametrize(
    ("n_cells", "n_features", "n_groups"), [(1, 1, 1), (500, 30, 1), (2000, 100, 4)]
)
def test_bytes_per_sample(n_cells: int, n_features: int, n_groups: int) -> None:
    c, t, n = n_groups, n_features, n_cells
    expected = (2 * c * t + 3 * t) * 4 + 16 * (c + 1) * t * 4
    assert bytes_per_sample(n, t, c) == expected
    assert bytes_per_sample(10 * n, t, c) == expected  # no per-cell term: no likelihood
    plan = plan_sampling(nsamples=5, shape=(n, t, c), budget=budget_for(1e6, (n, t, c)))
    assert plan.bytes_per_sample == expected


def test_a_genome_scale_screen_draws_vectorised_batches_of_100() -> None:
    """20,000 cells x 20,000 genes: one draw holds ~6 MB, so batches of 100 (counting the
    4 N T floats of per-cell temporaries that sampling never builds made this one draw at
    a time); vectorised where all 1,000 draws fit, as the rule has it."""
    shape = (20_000, 20_000, 3)
    small = plan_sampling(
        nsamples=1000, shape=shape, budget=memory_budget({}, available_ram=8 * GIB)
    )
    assert small.batch_size == 100 and not small.parallel  # 514 of the 1,000 fit
    large = plan_sampling(nsamples=1000, shape=shape, budget=memory_budget({}, available_ram=RAM))
    assert large.batch_size == 100 and large.parallel
    assert large.bytes_per_sample < 10 * 2**20


def test_whole_draw_fits_in_one_parallel_batch() -> None:
    shape = (1000, 50, 3)
    budget = budget_for(1000, shape)
    plan = plan_sampling(nsamples=1000, shape=shape, budget=budget, max_batch=None)
    assert plan.batch_size == 1000 and plan.n_batches == 1 and plan.parallel
    assert plan.batches() == [(0, 1000)]
    realistic = memory_budget({}, available_ram=RAM)
    plan = plan_sampling(nsamples=1000, shape=(200, 20, 2), budget=realistic, max_batch=None)
    assert plan.batches() == [(0, 1000)] and plan.parallel


@pytest.mark.parametrize("nsamples", [100, 1000, 10_000])
def test_batch_memory_does_not_grow_with_nsamples(nsamples: int) -> None:
    """Even when the whole draw fits, at most 100 draws are held at once (still parallel)."""
    realistic = memory_budget({}, available_ram=RAM)
    plan = plan_sampling(nsamples=nsamples, shape=(200, 20, 2), budget=realistic)
    assert plan.batch_size == 100 and plan.parallel
    assert plan.batches()[-1][1] == nsamples


@pytest.mark.parametrize(
    ("fits", "expected_batch"),
    [(999, 100), (250, 100), (100, 100), (37, 37), (10, 10), (10.5, 10)],
)
def test_small_budget_batches_between_10_and_100_without_parallel(
    fits: float, expected_batch: int
) -> None:
    shape = (1000, 50, 3)
    plan = plan_sampling(nsamples=1000, shape=shape, budget=budget_for(fits, shape))
    assert plan.batch_size == expected_batch
    assert 10 <= plan.batch_size <= 100
    assert plan.parallel is False
    assert_covers_exactly_once(plan)


@pytest.mark.parametrize("fits", [9, 3, 1, 0.5, 0, -100])
def test_tiny_budget_still_draws_at_least_one(fits: float) -> None:
    shape = (1000, 50, 3)
    plan = plan_sampling(nsamples=57, shape=shape, budget=budget_for(fits, shape))
    assert 1 <= plan.batch_size < 10
    assert plan.batch_size == max(1, int(fits))
    assert plan.parallel is False
    assert_covers_exactly_once(plan)


@pytest.mark.parametrize("nsamples", [1, 99, 1000, 1001])
def test_uneven_batches_cover_every_draw(nsamples: int) -> None:
    shape = (1000, 50, 3)
    plan = plan_sampling(nsamples=nsamples, shape=shape, budget=budget_for(0.5 * nsamples, shape))
    assert_covers_exactly_once(plan)


@pytest.mark.parametrize("budget_draws", [1e9, 20, 2])
def test_user_batch_wins(budget_draws: float) -> None:
    shape = (1000, 50, 3)
    budget = budget_for(budget_draws, shape)
    plan = plan_sampling(nsamples=1000, shape=shape, budget=budget, user_batch=250)
    assert plan.batch_size == 250
    assert plan.batches() == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    plan = plan_sampling(nsamples=30, shape=shape, budget=budget, user_batch=7)
    assert plan.batch_size == 7
    assert_covers_exactly_once(plan)
    plan = plan_sampling(nsamples=30, shape=shape, budget=budget, user_batch=500)
    assert plan.batches() == [(0, 30)]
