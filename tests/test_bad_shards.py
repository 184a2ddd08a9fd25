"""train.bad_shards: 'skip' warns once per URL and counts once, 'fail' raises naming the URL, broken transforms stop."""

from __future__ import annotations

import warnings

import pytest

from shards import schema
from train.bad_shards import MAX_FAILURES_IN_A_ROW, BadShardError, BadShardPolicy


def test_skip_counts_each_shard_and_sample_once_and_warns_once_per_url():
    p = BadShardPolicy("skip")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        p.bad_shard("/d/a.tar", "cannot read shard: /d/a.tar")
        p.bad_shard("/d/a.tar", "cannot read shard: /d/a.tar")  # met again wherever the plan meets it
        p.bad_sample("/d/b.tar", "k1", "/d/b.tar: sample 'k1': bad metadata", reason="bad_meta")
        p.bad_sample("/d/b.tar", "k1", "/d/b.tar: sample 'k1': bad metadata", reason="bad_meta")  # met again: borrowing
        p.bad_sample("/d/b.tar", "k2", "/d/b.tar: sample 'k2': box 0 ...", reason="bad_boxes")
        p.bad_sample("/d/b.tar", None, "/d/b.tar: tar: 512 bytes at byte 0 ...", reason="damaged_tar")
    assert p.counts["shards_skipped"] == 1 and p.counts["samples_skipped"] == 3
    assert {k: n for k, n in p.counts.items() if n and k.startswith("skipped_")} == {
        "skipped_bad_meta": 1,
        "skipped_bad_boxes": 1,
        "skipped_damaged_tar": 1,
    }
    assert p.bad_urls == {"/d/a.tar"}
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and "/d/a.tar" in messages[0]
    assert messages[1] == (
        "skipping a bad sample: /d/b.tar: sample 'k1': bad metadata (further bad samples of /d/b.tar are not reported)"
    )
    with pytest.raises(ValueError, match="unknown skip reason"):
        p.bad_sample("/d/b.tar", "k3", "?", reason="gremlins")


def test_fail_raises_naming_the_url_and_counts_nothing():
    p = BadShardPolicy("fail")
    cause = OSError("boom")
    with pytest.raises(BadShardError, match="/d/a.tar") as e:
        p.bad_shard("/d/a.tar", "cannot read shard: /d/a.tar", cause)
    assert e.value.__cause__ is cause
    with pytest.raises(BadShardError, match="k7"):
        p.bad_sample("/d/a.tar", "k7", "sample 'k7': bad metadata", reason="bad_meta")
    assert not any(p.counts.values())


def test_transform_failures_skip_until_the_transform_looks_broken():
    p = BadShardPolicy("skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for n in range(1, 6):
            p.transform_failed("/d/a.tar", f"k{n}", ValueError("bad jpeg"), in_a_row=n, total_samples=5)
        p.transform_failed("/d/a.tar", "k0", schema.InvalidSample("bad_image", "JPEG is 8x8 but ..."), 1, 5)
    assert p.counts["samples_skipped"] == 6
    assert p.counts["skipped_transform"] == 5 and p.counts["skipped_bad_image"] == 1  # the data's fault, by name
    # one more failure than there are samples: nothing can succeed, so stop under 'skip' too
    with pytest.raises(BadShardError, match="failed on 6 samples in a row.*bad jpeg"):
        p.transform_failed("/d/a.tar", "k6", ValueError("bad jpeg"), in_a_row=6, total_samples=5)
    with pytest.raises(BadShardError, match=f"{MAX_FAILURES_IN_A_ROW + 1} samples in a row"):
        p.transform_failed("/d/a.tar", "k", ValueError("x"), in_a_row=MAX_FAILURES_IN_A_ROW + 1, total_samples=10**9)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="on_bad_shard"):
        BadShardPolicy("ignore")
