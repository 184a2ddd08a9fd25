"""shards.schema: shard names, sample keys, KEY.json bytes, the Parquet schema across format versions, the stats and
manifest content. (Reading KEY.json of both versions: test_reader; Parquet files of version 1 through prep stats:
test_stats.)"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shards import schema

# property tests in the suite: the same examples on every run (fixed seed, no example database)
PROPERTY = settings(
    max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)

SHA = schema.image_sha256(b"jpeg bytes")


# --- names -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix, index", [("coco", 0), ("coco", 3), ("a-b", 999_999), ("imagenet_val", 12)])
def test_shard_name_round_trip_through_every_file_name(prefix, index):
    stem = schema.shard_name(prefix, index)
    assert len(stem) == len(prefix) + 1 + schema.SHARD_DIGITS
    for suffix in ("", schema.TAR_SUFFIX, schema.PARQUET_SUFFIX, schema.STATS_SUFFIX):
        assert schema.parse_shard_name(stem + suffix) == (prefix, index)


def test_shard_name_index_range():
    with pytest.raises(ValueError, match="out of range"):
        schema.shard_name("c", 10**schema.SHARD_DIGITS)
    with pytest.raises(ValueError, match="out of range"):
        schema.shard_name("c", -1)


@pytest.mark.parametrize(
    "name",
    [
        "coco-00001",  # five digits
        "coco-0000001",  # seven
        "coco000001",  # no dash
        "-000001",  # no prefix
        "coco-000001.tar.tmp",  # a temporary file
        "coco-000001.jpg",
        schema.MANIFEST_NAME,
    ],
)
def test_parse_shard_name_rejects_other_names(name):
    with pytest.raises(ValueError, match="not a shard name"):
        schema.parse_shard_name(name)


# --- keys ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path, key",
    [
        ("img_001.jpg", "img_001"),
        ("dir/sub/a.JPEG", "dir__sub__a"),
        ("a b/ç.d.jpg", "a_b__d"),  # only the last extension goes; runs of other characters become one '_'
        ("v1.2/photo", "v1_2__photo"),  # a dot in a directory is not an extension
        ("no_extension", "no_extension"),
        ("dir/.hidden.png", "dir__hidden"),
        ("dir/ç.png", "dir___"),  # nothing safe left in a part: '_'
    ],
)
def test_sanitize_key(path, key):
    # keys are written into the tars: a change here changes the bytes of every shard
    assert schema.sanitize_key(path) == key
    assert schema.is_valid_key(key)


def test_sanitize_long_paths_keep_the_end_and_stay_distinct():
    a = "x" * 200 + "/same_tail.jpg"
    b = "y" * 200 + "/same_tail.jpg"
    ka, kb = schema.sanitize_key(a), schema.sanitize_key(b)
    assert len(ka) == len(kb) == schema.KEY_MAX_LEN
    assert ka != kb and ka.split("-")[0].endswith("same_tail") and schema.is_valid_key(ka)
    assert schema.sanitize_key(a) == ka  # a digest, not a counter: the same path gives the same key in any run


@pytest.mark.parametrize(
    "key, valid",
    [
        ("a", True),
        ("A-b_9", True),
        ("x" * schema.KEY_MAX_LEN, True),
        ("x" * (schema.KEY_MAX_LEN + 1), False),
        ("", False),
        ("a.b", False),  # WebDataset would split the key at the dot
        ("a/b", False),  # a directory inside the tar
        ("a b", False),
        ("é", False),
    ],
)
def test_is_valid_key(key, valid):
    assert schema.is_valid_key(key) is valid


# --- KEY.json --------------------------------------------------------------------------------------------------------
def test_meta_round_trip():
    boxes = np.array([[0, 1, 5, 6], [2, 2, 8, 7]], dtype=np.int16)
    data = schema.encode_meta(
        key="k", path="d/k.jpg", width=np.int64(8), height=7, boxes=boxes, image_sha256=SHA, label=3, image_id=42
    )
    meta = schema.decode_meta(data)
    assert meta["boxes"].dtype == np.int32 and meta["boxes"].tolist() == boxes.tolist()
    rest = {k: v for k, v in meta.items() if k != "boxes"}
    assert rest == {
        "format_version": schema.FORMAT_VERSION,
        "key": "k",
        "path": "d/k.jpg",
        "width": 8,
        "height": 7,
        "image_sha256": SHA,
        "label": 3,
        "image_id": 42,
    }


def test_meta_bytes_are_canonical():
    kw = dict(key="k", path="k.jpg", width=8, height=8, image_sha256=SHA)
    flat = schema.encode_meta(boxes=[0, 0, 4, 4, 1, 1, 8, 8], **kw)  # any shape with 4 per box
    assert flat == schema.encode_meta(boxes=np.array([[0, 0, 4, 4], [1, 1, 8, 8]], dtype=np.int32), **kw)
    text = flat.decode()
    assert " " not in text and list(json.loads(text)) == sorted(json.loads(text))
    assert json.loads(text)["label"] is None and json.loads(text)["image_id"] is None
    empty = schema.decode_meta(schema.encode_meta(boxes=np.zeros((0, 4)), **kw))["boxes"]
    assert empty.shape == (0, 4)


@pytest.mark.parametrize(
    "data, reason, message",
    [
        (b"[1, 2]", "bad_meta", "a JSON list, not an object"),
        (b"null", "bad_meta", "a JSON NoneType, not an object"),
        (b'{"format_version": 2}', "bad_meta", "no 'boxes'"),
        (b"{not json", "bad_meta", "not JSON"),
        (b"[" * 100_000, "bad_meta", "not JSON: RecursionError"),  # deep nesting: not a crash
        (b"\xff\xfe{}", "bad_meta", "not JSON"),
        (b" " * (schema.META_MAX_BYTES + 1), "bad_meta", "more than the limit"),
        (b'{"boxes": [], "boxes": [[0, 0, 1, 1]]}', "bad_meta", "repeats the name 'boxes'"),
    ],
)
def test_decode_meta_refuses_what_is_not_a_key_json(data, reason, message):
    with pytest.raises(schema.InvalidSample, match=re.escape(message)) as e:
        schema.decode_meta(data)
    assert e.value.reason == reason and isinstance(e.value, ValueError)


def _valid(**change) -> bytes:
    meta = json.loads(schema.encode_meta(key="k", path="k.jpg", width=400, height=300, boxes=[[0, 0, 400, 300]],
                                         image_sha256=SHA))  # fmt: skip
    meta.update(change)
    return json.dumps({k: v for k, v in meta.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    "change, reason, message",
    [  # the cases of issue 17, then every field of the rule
        (dict(boxes=[[0, 0, 1e12, 1e12]]), "bad_boxes", "not 4 integers"),
        (dict(boxes=[[0.5, 1e308, float("nan"), 3]]), "bad_boxes", "not 4 integers"),
        (dict(boxes=[[0, 0, 10**12, 10**12]]), "bad_boxes", "not inside the 400x300 image"),
        (dict(boxes=[[-5, 0, 10, 10]]), "bad_boxes", "not inside"),
        (dict(boxes=[[5000, 5000, 9000, 9000]]), "bad_boxes", "not inside"),
        (dict(boxes=[[4, 4, 4, 10]]), "bad_boxes", "positive area"),  # zero area
        (dict(boxes=[[10, 0, 4, 8]]), "bad_boxes", "positive area"),  # inverted
        (
            dict(boxes=[[0, 0, 1, 1]] * (schema.MAX_BOXES + 1)),
            "bad_boxes",
            f"more than the limit of {schema.MAX_BOXES}",
        ),
        (dict(boxes=[[0, 0, 1, 1, 1]]), "bad_boxes", "not 4 integers"),
        (dict(boxes=[[True, 0, 1, 1]]), "bad_boxes", "not 4 integers"),
        (dict(boxes={"0": [0, 0, 1, 1]}), "bad_boxes", "not a list"),
        (dict(width=...), "bad_meta", "width None"),
        (dict(height=0), "bad_meta", "not integers in [1, 65535]"),
        (dict(width=70_000), "bad_meta", "not integers in [1, 65535]"),
        (dict(width=400.0), "bad_meta", "not integers"),
        (dict(format_version=True), "bad_meta", "format_version True"),
        (dict(format_version=3), "bad_meta", "format_version 3"),
        (dict(key="other"), "bad_meta", "key 'other', the member's key is 'k'"),
        (dict(key=...), "bad_meta", "key None"),
        (dict(path=7), "bad_meta", "path 7"),
        (dict(label="cat"), "bad_meta", "label 'cat'"),
        (dict(image_id=1.5), "bad_meta", "image_id 1.5"),
        (dict(image_sha256="abc"), "bad_meta", "no image_sha256 of 64"),
    ],
)
def test_decode_meta_applies_the_rule(change, reason, message):
    with pytest.raises(schema.InvalidSample, match=re.escape(message)) as e:
        schema.decode_meta(_valid(**change), key="k")
    assert e.value.reason == reason


def test_decode_meta_accepts_the_edges_of_the_rule():
    meta = schema.decode_meta(_valid(boxes=[[0, 0, 400, 300], [399, 299, 400, 300]], extra="kept"), key="k")
    assert meta["boxes"].tolist() == [[0, 0, 400, 300], [399, 299, 400, 300]] and meta["extra"] == "kept"
    assert schema.decode_meta(_valid(boxes=[]))["boxes"].shape == (0, 4)  # no boxes: Algorithm 1 falls back
    assert len(schema.decode_meta(_valid(boxes=[[0, 0, 1, 1]] * schema.MAX_BOXES))["boxes"]) == schema.MAX_BOXES


# --- the rule under hypothesis -----------------------------------------------------------------------------------------
FIELDS = ("format_version", "key", "path", "width", "height", "boxes", "image_sha256", "label", "image_id")
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-2, 70_000)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip
# coordinates around the edges of the 400 x 300 image of _valid(), where the rule decides
x_edge, y_edge = st.sampled_from([-1, 0, 1, 399, 400, 401]), st.sampled_from([-1, 0, 1, 299, 300, 301])
odd = st.floats(-1, 500) | st.booleans() | st.none() | st.integers(-(2**70), 2**70)
box = st.tuples(x_edge, y_edge, x_edge, y_edge).map(list) | st.lists(x_edge | odd, min_size=3, max_size=5)
boxes_like = st.lists(box, min_size=1, max_size=2) | st.lists(box, max_size=4)
edge = x_edge | y_edge


def _follows_the_rule(meta, key: str) -> bool:
    """The rule of docs/format.md written out plainly, independently of schema.decode_meta."""

    def integer(v):
        return type(v) is int

    if not isinstance(meta, dict) or "boxes" not in meta:
        return False
    w, h, version, sha = meta.get("width"), meta.get("height"), meta.get("format_version"), meta.get("image_sha256")
    return (
        integer(version) and version in (1, 2)
        and (sha is None and version == 1 or isinstance(sha, str) and re.fullmatch("[0-9a-f]{64}", sha) is not None)
        and meta.get("key") == key and isinstance(meta.get("path"), str)
        and all(meta.get(f) is None or integer(meta[f]) for f in ("label", "image_id"))
        and integer(w) and integer(h) and 1 <= w <= 65535 and 1 <= h <= 65535
        and isinstance(meta["boxes"], list) and len(meta["boxes"]) <= schema.MAX_BOXES
        and all(
            isinstance(b, list) and len(b) == 4 and all(map(integer, b))
            and 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h
            for b in meta["boxes"]
        )
    )  # fmt: skip


@settings(PROPERTY, max_examples=600)
@given(
    st.fixed_dictionaries({"boxes": boxes_like}, optional={"width": edge, "height": edge})
    | st.dictionaries(st.sampled_from(FIELDS), json_values | boxes_like | edge, max_size=2)
)
def test_decode_meta_accepts_exactly_what_the_rule_allows(changes):
    base = json.loads(_valid())
    meta = {**base, **changes}
    data = json.dumps(meta).encode()  # NaN and Infinity as JSON's extensions: what another tool may write
    try:
        decoded = schema.decode_meta(data, key="k")
    except schema.InvalidSample as e:
        assert e.reason in ("bad_meta", "bad_boxes") and not _follows_the_rule(json.loads(data), "k")
        return
    assert _follows_the_rule(json.loads(data), "k")
    assert decoded["boxes"].dtype == np.int32 and decoded["boxes"].tolist() == meta["boxes"]


@PROPERTY
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_decode_meta_raises_nothing_but_invalid_sample(data):
    try:
        schema.decode_meta(data)
    except schema.InvalidSample:
        pass


@st.composite
def written_samples(draw):
    """What prep can write: any valid key, any path, sizes up to the JPEG limit, boxes inside, label and id or null."""
    w, h = draw(st.integers(1, schema.MAX_SIDE)), draw(st.integers(1, schema.MAX_SIDE))
    x0 = st.integers(0, w - 1)
    y0 = st.integers(0, h - 1)
    boxes = draw(
        st.lists(st.tuples(x0, y0).flatmap(lambda p: st.tuples(st.just(p[0]), st.just(p[1]),
                 st.integers(p[0] + 1, w), st.integers(p[1] + 1, h))), max_size=30)
    )  # fmt: skip
    return dict(
        key=draw(st.from_regex(r"[A-Za-z0-9_\-]{1,80}", fullmatch=True)),
        path=draw(st.text(max_size=200)),
        width=w,
        height=h,
        boxes=np.array(boxes, dtype=np.int64).reshape(-1, 4),
        image_sha256=schema.image_sha256(draw(st.binary(max_size=16))),
        label=draw(st.none() | st.integers(0, 21_841)),
        image_id=draw(st.none() | st.integers(0, 2**53)),
    )


@PROPERTY
@given(written_samples())
def test_whatever_prep_writes_passes_the_rule(fields):
    meta = schema.decode_meta(schema.encode_meta(**fields), key=fields["key"])
    assert meta["boxes"].tolist() == fields["boxes"].tolist()
    assert {k: meta[k] for k in fields if k != "boxes"} == {k: v for k, v in fields.items() if k != "boxes"}


# --- Parquet rows and format versions --------------------------------------------------------------------------------
def test_make_row_fills_every_column_and_checks_names():
    row = schema.make_row("k", "k.jpg", width=4, height=4, boxes=np.array([1, 2, 3, 4]))
    assert list(row) == schema.PARQUET_SCHEMA.names
    assert row["status"] == schema.STATUS_OK and row["boxes"] == [[1, 2, 3, 4]] and row["error"] is None
    for reason in schema.FAILURE_REASONS:
        assert schema.make_row("k", "k.jpg", reason, error="why")["status"] == reason
    with pytest.raises(ValueError, match="unknown status 'broken'"):
        schema.make_row("k", "k.jpg", "broken")
    with pytest.raises(ValueError, match=r"unknown parquet columns \['colour'\]"):
        schema.make_row("k", "k.jpg", colour="red")


def _table() -> pa.Table:
    return schema.rows_to_table(
        [
            schema.make_row(
                "a",
                "a.jpg",
                width=10,
                height=8,
                raw_boxes=5,
                kept_boxes=2,
                fallback_boxes=1,
                boxes=[[0, 0, 4, 4], [1, 1, 9, 7]],
                image_sha256=SHA,
            ),
            schema.make_row("b", "b.jpg", "corrupt", error="truncated"),
        ]
    )


def test_rows_to_table_has_the_schema():
    t = _table()
    assert t.schema.equals(schema.PARQUET_SCHEMA) and t.num_rows == 2
    assert schema.parquet_version(t.schema) == schema.FORMAT_VERSION
    assert t["boxes"].to_pylist() == [[[0, 0, 4, 4], [1, 1, 9, 7]], None]
    assert schema.rows_to_table([]).schema.equals(schema.PARQUET_SCHEMA)  # no rows: still every column


def test_every_column_added_since_version_1_is_in_the_schema():
    added = [c for cols in schema.ADDED_COLUMNS.values() for c in cols]
    assert set(added) <= set(schema.PARQUET_SCHEMA.names) and len(added) == len(set(added))
    assert max(schema.ADDED_COLUMNS) == schema.FORMAT_VERSION and schema.FORMAT_VERSION in schema.READABLE_VERSIONS


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.drop_columns(["fallback_boxes"]),  # half of what version 2 added: neither version
        lambda t: t.drop_columns(["ss_seconds"]),
        lambda t: t.append_column("extra", pa.array([1, 2])),
        lambda t: t.set_column(t.schema.get_field_index("width"), "width", t["width"].cast(pa.int64())),
    ],
)
def test_parquet_version_of_no_known_version(change):
    t = change(_table())
    assert schema.parquet_version(t.schema) is None
    with pytest.raises(ValueError, match=r"^shard x: columns differ .* every format version \(1, 2\)"):
        schema.conform_table(t, "shard x")


def test_conform_table_of_version_1_adds_null_columns():
    v2 = _table()
    v1 = v2.drop_columns(list(schema.ADDED_COLUMNS[2]))
    assert schema.parquet_version(v1.schema) == 1
    got = schema.conform_table(v1, "v1")
    assert got.schema.equals(schema.PARQUET_SCHEMA)
    for name in schema.PARQUET_SCHEMA.names:
        if name in schema.ADDED_COLUMNS[2]:
            assert got[name].null_count == got.num_rows
        else:
            assert got[name].to_pylist() == v2[name].to_pylist()
    assert schema.conform_table(v2, "v2").equals(v2)  # this version: unchanged


# --- stats and manifest ----------------------------------------------------------------------------------------------
def _rows():
    ok = dict(width=10, height=10, boxes=None)
    return [
        schema.make_row("a", "a.jpg", kept_boxes=6, fallback_boxes=None, ss_seconds=0.25, **ok),
        schema.make_row("b", "b.jpg", kept_boxes=2, fallback_boxes=0, ss_seconds=0.5, **ok),  # tier 2 ran, added none
        schema.make_row("c", "c.jpg", kept_boxes=5, fallback_boxes=3, ss_seconds=None, **ok),
        schema.make_row("d", "d.jpg", "too_small", error="8 x 8"),
        schema.make_row("e", "e.jpg", "corrupt", error="truncated", ss_seconds=0.1254),
        schema.make_row("f", "f.jpg", "corrupt", error="truncated"),
    ]


def _stats(name: str, rows, **kw):
    args = dict(config_fingerprint="fp", tar_bytes=100, parquet_bytes=10, seconds=1.23456, min_boxes=4)
    return schema.make_stats(shard=name, rows=rows, **{**args, **kw})


def test_make_stats_counts():
    st = _stats("c-000000", _rows())
    assert st == {
        "format_version": schema.FORMAT_VERSION,
        "shard": "c-000000",
        "fingerprint": "fp",
        "inputs": 6,
        "samples": 3,
        "failed": {"corrupt": 2, "too_small": 1},
        "few_boxes": 1,  # b: 2 < min_boxes
        "min_boxes": 4,
        "fallback_images": 2,  # b and c: the second tier ran, whether or not it added boxes
        "boxes": 13,
        "tar_bytes": 100,
        "parquet_bytes": 10,
        "seconds": 1.235,
        "ss_seconds": 0.875,  # failures' selective-search time counts too; None is none
    }
    assert list(st["failed"]) == sorted(st["failed"])  # stable bytes in the stats file


def test_make_manifest_totals_and_order():
    rows = _rows()
    stats = [_stats("c-000001", rows[3:], tar_bytes=7), _stats("c-000000", rows[:3])]
    config = {"kind": "folder", "min_side": 96}
    m = schema.make_manifest(config=config, versions={"opencv": "4.9"}, classes=["cat"], stats=stats)
    assert m["format_version"] == schema.FORMAT_VERSION and m["config"] == config and m["classes"] == ["cat"]
    assert m["fingerprint"] == schema.fingerprint(config) and m["versions"] == {"opencv": "4.9"}
    assert m["shards"] == [
        {"name": "c-000000", "tar": "c-000000.tar", "samples": 3, "inputs": 3},
        {"name": "c-000001", "tar": "c-000001.tar", "samples": 0, "inputs": 3},
    ]
    assert m["totals"] == {
        "shards": 2,
        "inputs": 6,
        "samples": 3,
        "failed": {"corrupt": 2, "too_small": 1},
        "few_boxes": 1,
        "fallback_images": 2,
        "boxes": 13,
        "tar_bytes": 107,
    }
    # one shard's stats from before version 2 (no fallback_images): the total would be a guess, so it is left out
    old = {k: v for k, v in stats[0].items() if k != "fallback_images"}
    totals = schema.make_manifest(config=config, versions={}, classes=None, stats=[old, stats[1]])["totals"]
    assert "fallback_images" not in totals and totals["samples"] == 3


def test_fingerprint_is_of_the_content_not_the_spelling():
    a = {"kind": "folder", "min_side": 96, "fallback_min_side": None}
    assert schema.fingerprint(a) == schema.fingerprint(dict(reversed(list(a.items()))))
    assert re.fullmatch("[0-9a-f]{16}", schema.fingerprint(a))
    assert schema.fingerprint(a) != schema.fingerprint({**a, "min_side": 95})
    assert schema.fingerprint(a) != schema.fingerprint({**a, "fallback_min_side": 0})  # null is not 0
    assert schema.fingerprint(a) != schema.fingerprint({k: v for k, v in a.items() if k != "fallback_min_side"})


def test_dumps_is_stable_and_readable():
    obj = {"b": [1, 2], "a": {"y": None, "x": 1.5}}
    data = schema.dumps(obj)
    assert data.endswith(b"\n") and data.count(b"\n") > 1  # indented, for people
    assert data == schema.dumps(dict(reversed(list(obj.items()))))
    assert json.loads(data) == obj
