"""The reader under fuzzing (``bench/fuzz.py``): a bounded mutation campaign over shards prep made, with a fixed seed;
property-based member sequences (hypothesis); and proof that the oracle catches a reader that loses good samples.

``make fuzz`` runs the same campaign for as long as asked."""

from __future__ import annotations

import os
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import fuzz
from shards import layout, reader, schema

# in the suite: the same cases on every run (a fixed seed, no example database), bounded in time
PROPERTY = settings(
    max_examples=250, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
CAMPAIGN_CASES, CAMPAIGN_SECONDS = 2500, 15


@pytest.fixture(scope="module")
def shards(sample_output) -> list[fuzz.Shard]:
    urls = [os.path.join(sample_output, n) for n in layout.tars(os.listdir(sample_output))]
    loaded = fuzz.load_shards(urls)
    assert sum(len(s.good) for s in loaded) == 8  # every ok sample of the output, read cleanly
    return loaded


def test_mutated_prep_shards_cost_only_their_bad_samples(shards, tmp_path):
    # every cut point of every shard, then random mutations: cases are a function of (seed, index), so a run under
    # load stops earlier but never tries other cases
    result = fuzz.campaign(shards, str(tmp_path), seed=0, cases=CAMPAIGN_CASES, seconds=CAMPAIGN_SECONDS, limit_s=5)
    assert result.failures == []
    assert result.cases >= 300, f"only {result.cases} cases in {CAMPAIGN_SECONDS} s"
    # the campaign reached every kind of fault the rule names, not only the easy ones
    for reason in schema.INVALID_REASONS:
        if reason != "bad_image":  # found where a JPEG is decoded, not by the reader
            assert result.rejected.get(reason, 0) > 0, (reason, result.rejected)


def test_the_oracle_catches_a_reader_that_drops_the_rest_of_a_shard(shards, tmp_path, monkeypatch):
    real = reader.group_by_key

    def whole_shard_on_first_fault(members, url):  # what the reader did before: one bad sample, shard lost
        for item in real(members, url):
            if isinstance(item, reader.Rejected):
                raise reader.ShardError(item.message)
            yield item

    monkeypatch.setattr(reader, "group_by_key", whole_shard_on_first_fault)
    result = fuzz.campaign(shards, str(tmp_path), seed=0, cases=60, every_cut=False)
    assert any("lost good samples" in line for line in result.failures), result.failures[:3]


def test_the_oracle_catches_a_reader_that_ends_a_shard_at_a_damaged_header(shards, tmp_path, monkeypatch):
    def tarfile_members(stream, limit=None):  # tarfile's stream mode: a bad checksum ends the archive silently
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for m in tar:
                f = tar.extractfile(m) if m.isfile() else None
                if f is not None:
                    yield reader.Member(m.name, f.read(), m.offset)

    monkeypatch.setattr(reader, "tar_members", tarfile_members)
    result = fuzz.campaign(shards, str(tmp_path), seed=0, cases=100, every_cut=True)
    assert any("read a cut shard without an error" in line for line in result.failures)
    assert any("lost good samples" in line and "flip_header" in line for line in result.failures)


def test_the_oracle_catches_a_reader_that_writes_or_hangs(shards, tmp_path, monkeypatch):
    real = reader.validate

    def writing(items, **kw):  # a reader that leaves a file behind: the audit hook sees the open for writing
        with open(tmp_path / "leak.txt", "w") as f:
            f.write("x")
        yield from real(items, **kw)

    monkeypatch.setattr(reader, "validate", writing)
    result = fuzz.campaign(shards[:1], str(tmp_path), seed=0, cases=3, every_cut=False)
    assert len(result.failures) == 3 and all("wrote to the file system" in f for f in result.failures)

    def hanging(items, **kw):
        while True:
            pass
        yield from real(items, **kw)

    monkeypatch.setattr(reader, "validate", hanging)
    result = fuzz.campaign(shards[:1], str(tmp_path), seed=0, cases=1, every_cut=False, limit_s=0.5)
    assert len(result.failures) == 1 and "still reading after 0.5 s" in result.failures[0]


# --- member sequences ------------------------------------------------------------------------------------------------
def _sample(key: str) -> list[fuzz.Entry]:
    jpg = f"jpeg of {key}".encode()
    meta = schema.encode_meta(
        key=key, path=f"{key}.jpg", width=8, height=8, boxes=[[0, 0, 4, 4]], image_sha256=schema.image_sha256(jpg)
    )
    return [fuzz.Entry(f"{key}.jpg", jpg), fuzz.Entry(f"{key}.json", meta)]


GOOD = {k: _sample(k) for k in ("a", "b", "c", "d")}
NAMES = ["a.jpg", "a.json", "b.jpg", "x.txt", "../a.jpg", "/abs/b.json", "dir/c.jpg", "c.x.json", "c", "C.JPG"]
TYPES = [tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE]

odd_entry = st.builds(
    fuzz.Entry,
    name=st.sampled_from(NAMES),
    data=st.sampled_from([b"", b"junk", GOOD["a"][1].data, b"{}"]),
    type=st.sampled_from(TYPES),
    linkname=st.sampled_from(["", "/etc/passwd", "../../x"]),
)
# whole good samples and single members, good or odd, in any order
piece = st.one_of(st.sampled_from(list(GOOD.values())), st.lists(st.one_of(odd_entry, st.sampled_from(
    [e for pair in GOOD.values() for e in pair])), min_size=1, max_size=2))  # fmt: skip


@PROPERTY
@given(st.lists(piece, max_size=8))
def test_member_sequences_deliver_exactly_the_untouched_samples(pieces):
    entries = [e for p in pieces for e in p]
    data, _, _ = fuzz.write_tar(entries)
    original = [e for pair in GOOD.values() for e in pair]
    # a key is untouched when its only run is its two members, as the format has them
    must = fuzz.untouched(original, entries, set(GOOD))
    items = list(reader.group_by_key(reader.tar_members(_stream(data)), "seq.tar"))
    samples = [i for i in reader.validate(items) if not isinstance(i, reader.Rejected)]
    case = fuzz.Case(data, {k: (v[0].data, v[1].data) for k, v in GOOD.items()}, must, may_fail=False)
    assert fuzz.check_case(case, samples, None) == []
    rejected = [i for i in items if isinstance(i, reader.Rejected)]
    assert all(r.reason in schema.INVALID_REASONS and "seq.tar" in r.message for r in rejected)
    # every run that is not a whole good sample costs one rejection naming its key (later pieces of a rejected key
    # are folded into it), and nothing else is rejected
    assert {r.key for r in rejected} <= {k for k, _ in fuzz.runs(entries)}


def _stream(data: bytes):
    import io

    return io.BytesIO(data)
