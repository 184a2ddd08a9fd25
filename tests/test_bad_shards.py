"""train.bad_shards: 'skip' warns once per URL and counts once, 'fail' raises naming the URL, broken transforms stop."""

from __future__ import annotations

import warnings

import pytest

from train.bad_shards import MAX_FAILURES_IN_A_ROW, BadShardError, BadShardPolicy


def test_skip_counts_each_shard_and_sample_once_and_warns_once_per_url():
    p = BadShardPolicy("skip")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        p.bad_shard("/d/a.tar", "cannot read shard: /d/a.tar")
        p.bad_shard("/d/a.tar", "cannot read shard: /d/a.tar")  # met again wherever the plan meets it
        p.bad_sample("/d/b.tar", "k1", "bad metadata")
        p.bad_sample("/d/b.tar", "k1", "bad metadata")  # met again while borrowing
        p.bad_sample("/d/b.tar", "k2", "bad metadata")
    assert p.counts == {"shards_skipped": 1, "samples_skipped": 2}
    assert p.bad_urls == {"/d/a.tar"}
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and "/d/a.tar" in messages[0] and "/d/b.tar" in messages[1]


def test_fail_raises_naming_the_url_and_counts_nothing():
    p = BadShardPolicy("fail")
    cause = OSError("boom")
    with pytest.raises(BadShardError, match="/d/a.tar") as e:
        p.bad_shard("/d/a.tar", "cannot read shard: /d/a.tar", cause)
    assert e.value.__cause__ is cause
    with pytest.raises(BadShardError, match="k7"):
        p.bad_sample("/d/a.tar", "k7", "sample 'k7': bad metadata")
    assert p.counts == {"shards_skipped": 0, "samples_skipped": 0}


def test_transform_failures_skip_until_the_transform_looks_broken():
    p = BadShardPolicy("skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for n in range(1, 6):
            p.transform_failed("/d/a.tar", f"k{n}", ValueError("bad jpeg"), in_a_row=n, total_samples=5)
    assert p.counts["samples_skipped"] == 5
    # one more failure than there are samples: nothing can succeed, so stop under 'skip' too
    with pytest.raises(BadShardError, match="failed on 6 samples in a row.*bad jpeg"):
        p.transform_failed("/d/a.tar", "k6", ValueError("bad jpeg"), in_a_row=6, total_samples=5)
    with pytest.raises(BadShardError, match=f"{MAX_FAILURES_IN_A_ROW + 1} samples in a row"):
        p.transform_failed("/d/a.tar", "k", ValueError("x"), in_a_row=MAX_FAILURES_IN_A_ROW + 1, total_samples=10**9)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="on_bad_shard"):
        BadShardPolicy("ignore")
