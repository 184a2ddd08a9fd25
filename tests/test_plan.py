"""train.plan: per-epoch ranges per (rank, slot) from the counts alone — quotas met, disjoint, rank-independent."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train.plan import EpochPlanner


def planner(counts, **kw) -> EpochPlanner:
    urls = [f"/x/t-{j:06d}.tar" for j in range(len(counts))]
    kw = {"batch_size": 2, "world_size": 1, "streams": 1, "seed": 0} | kw
    return EpochPlanner.of(dict(zip(urls, counts, strict=True)), **kw)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 30), min_size=1, max_size=8),
    world=st.integers(1, 4),
    streams=st.integers(1, 3),
    batch=st.integers(1, 5),
    epoch=st.integers(0, 3),
)
def test_plan_ranges_are_disjoint_and_fill_every_quota(counts, world, streams, batch, epoch):
    if sum(counts) < world * batch:
        return
    p = planner(counts, batch_size=batch, world_size=world, streams=streams)
    used = {u: [] for u in p.urls}
    for r in range(world):
        for s, ranges in enumerate(p.ranges(epoch, r)):
            assert sum(b - a for _, a, b in ranges) == p.quota(s)
            for u, a, b in ranges:
                used[u].append((a, b))
    assert sum(p.quota(s) for s in range(streams)) == p.samples_per_epoch == p.steps_per_epoch * batch
    for u, n in zip(p.urls, counts, strict=True):
        spans = sorted(used[u])
        assert all(0 <= a < b <= n for a, b in spans)
        assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))


def test_plan_is_a_function_of_the_counts_and_seed_only():
    counts = [7, 3, 12, 5, 9]
    a = planner(counts, world_size=2, streams=2, seed=4)
    # URLs given in another order: sorted first, so every rank builds the same planner
    b = EpochPlanner.of(
        dict(reversed(list(zip(a.urls, counts, strict=True)))), batch_size=2, world_size=2, streams=2, seed=4
    )
    assert a == b and a.ranges(3, 1) == b.ranges(3, 1)
    assert a.ranges(0, 0) != a.ranges(1, 0)  # each epoch permutes the shards anew
    assert a.ranges(0, 0) != planner(counts, world_size=2, streams=2, seed=5).ranges(0, 0)


def test_borrow_order_is_a_fresh_permutation_per_pass_and_slot():
    p = planner([4] * 12, world_size=2, streams=2)
    first = p.borrow_order(0, 1, 1, 1)
    assert sorted(first) == list(p.urls)
    assert first == p.borrow_order(0, 1, 1, 1)
    assert first != p.borrow_order(0, 1, 1, 2) and first != p.borrow_order(0, 1, 0, 1)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="cannot fill one step"):
        planner([3], batch_size=2, world_size=2)
    with pytest.raises(ValueError, match="negative"):
        planner([3, -1])
    with pytest.raises(ValueError, match="bad layout"):
        planner([3], streams=0)
    with pytest.raises(ValueError, match="seed"):
        planner([3], seed=-1)
