"""shards.layout: which file names are shards, which shards are done, what a killed run left, on a real output."""

from __future__ import annotations

import os

import pytest

from shards import layout, schema, storage
from shards.writer import ShardWriter

# A listing as a killed run leaves it: one done shard, one with only a tar, a tar being written for a third, the run
# files, and names that are no shard (the user's own files, another run's prefix, hidden files, a bad index).
LISTING = [
    "coco-000000.tar",
    "coco-000000.parquet",
    "coco-000000.stats.json",
    "coco-000001.tar",
    ".coco-000002.tar.0123456789ab.tmp",
    ".coco-000000.stats.json.ba9876543210.tmp",
    schema.RUN_CONFIG_NAME,
    schema.MANIFEST_NAME,
    "notes.txt",
    "mine.tar",
    "other-000000.tar",
    ".coco-000003.tar",
    "coco-12.tar",
]


def test_split_names_the_shard_and_its_file():
    assert layout.split("coco-000003.stats.json") == ("coco-000003", schema.STATS_SUFFIX)
    assert layout.split("a-b-000001.parquet") == ("a-b-000001", schema.PARQUET_SUFFIX)
    for name in ("mine.tar", "coco-12.tar", ".coco-000003.tar", schema.MANIFEST_NAME, "coco-000001.jpg"):
        assert layout.split(name) is None, name


def test_shards_and_done_shards_of_a_listing():
    assert layout.shard_names(LISTING) == ["coco-000000", "coco-000001", "other-000000"]
    assert layout.shard_names(LISTING, schema.STATS_SUFFIX) == ["coco-000000"]
    assert layout.done(LISTING) == {"coco-000000"}
    # the stats file is the done marker only beside the files it describes
    assert layout.done(["x-000000.stats.json", "x-000000.tar"]) == set()


def test_tars_keep_any_tar_but_hidden_files():
    assert layout.tars(LISTING) == ["coco-000000.tar", "coco-000001.tar", "mine.tar", "other-000000.tar", "coco-12.tar"]
    assert layout.tars(["/d/.x.tar", "/d/y.tar", "s3://b/p/z.tar"]) == ["/d/y.tar", "s3://b/p/z.tar"]


def test_sibling_and_shard_file():
    assert layout.sibling("s3://b/p/coco-000001.tar", schema.STATS_SUFFIX) == "s3://b/p/coco-000001.stats.json"
    assert layout.shard_file("s3://b/p/", "coco-000001", schema.TAR_SUFFIX) == "s3://b/p/coco-000001.tar"
    with pytest.raises(ValueError, match="not a shard file"):
        layout.sibling("/d/manifest.json", schema.TAR_SUFFIX)


def test_temp_files_name_their_shard(tmp_path):
    f, path = storage.temp_file(str(tmp_path), "coco-000004.parquet")
    f.close()
    name = os.path.basename(path)
    assert name.startswith(".") and layout.split(name) is None
    assert storage.temp_target(name) == "coco-000004.parquet"
    assert layout.temp_shard(name) == "coco-000004"
    assert layout.temp_shard("coco-000004.parquet") is None
    assert layout.temp_shard(".notes.txt.0123456789ab.tmp") is None


def test_run_files_are_the_runs_and_nothing_else():
    assert layout.run_files(LISTING, {"coco"}) == [
        "coco-000000.tar",
        "coco-000000.parquet",
        "coco-000000.stats.json",
        "coco-000001.tar",
        ".coco-000002.tar.0123456789ab.tmp",
        ".coco-000000.stats.json.ba9876543210.tmp",
        schema.RUN_CONFIG_NAME,
        schema.MANIFEST_NAME,
    ]
    assert "other-000000.tar" in layout.run_files(LISTING, {"coco", "other"})


def test_done_on_a_written_output(tmp_path):
    out = str(tmp_path)
    with ShardWriter(out, "t-000000", config={}, fingerprint="f", min_boxes=4):
        pass
    with pytest.raises(RuntimeError), ShardWriter(out, "t-000001", config={}, fingerprint="f", min_boxes=4):
        raise RuntimeError("killed")
    assert layout.done_shards(out) == {"t-000000"} == set(layout.shard_names(layout.listing(out)))
    assert layout.is_done(out, "t-000000") and not layout.is_done(out, "t-000001")
    os.remove(layout.shard_file(out, "t-000000", schema.PARQUET_SUFFIX))
    assert layout.done_shards(out) == set() and not layout.is_done(out, "t-000000")


def test_listing_over_http_follows_the_manifest_then_the_plan(tmp_path, http_server):
    out = tmp_path / "out"
    out.mkdir()
    server = http_server(str(out))
    with pytest.raises(FileNotFoundError, match="neither manifest.json nor prep_config.json"):
        layout.listing(server.url)
    for name in ("a-000000.parquet", "a-000000.stats.json", "a-000000.tar", "a-000001.tar"):
        (out / name).write_bytes(b"x")
    (out / schema.RUN_CONFIG_NAME).write_bytes(schema.dumps({"shards": ["a-000000", "a-000001"]}))
    assert layout.listing(server.url) == {schema.RUN_CONFIG_NAME, "a-000000.parquet", "a-000000.stats.json"}
    (out / schema.MANIFEST_NAME).write_bytes(schema.dumps({"shards": [{"name": "a-000000"}]}))
    assert layout.listing(server.url) == {schema.MANIFEST_NAME, "a-000000.parquet", "a-000000.stats.json"}
    # the manifest names shards beside it: a name that would resolve elsewhere is refused, naming the manifest
    for name in ("../other/a-000000", "sub/a-000000", "/etc/a-000000", "not-a-shard"):
        (out / schema.MANIFEST_NAME).write_bytes(schema.dumps({"shards": [{"name": name}]}))
        with pytest.raises(ValueError, match=r"manifest.json: .* is not the name of a shard beside it"):
            layout.listing(server.url)
