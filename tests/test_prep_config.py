"""prep.config: PrepConfig defaults, validation, fingerprint, the JSON records it is read back from. (The proposal
tiers' settings, min_side / fallback_min_side / min_boxes: test_proposals.)"""

from __future__ import annotations

import dataclasses
import json

import pytest

from prep.config import SOURCE_KINDS, SS_MODES, PrepConfig
from shards import schema


def cfg(**kw) -> PrepConfig:
    return PrepConfig(**{"kind": "folder", "root": "/data/images", **kw})


def test_defaults():
    c = cfg()
    assert (c.mode, c.ss_max_side, c.seed) == ("fast", 500, 0)
    assert (c.max_aspect, c.iou, c.max_boxes) == (3.0, 0.5, 100)
    assert (c.max_side, c.jpeg_quality, c.max_pixels, c.shard_size) == (None, 95, 89_478_485, 1000)
    assert c.annotations is None and c.prefix == "" and c.shard_prefix == "folder"
    assert cfg(kind="coco", prefix="train2017").shard_prefix == "train2017"
    assert {k: cfg(kind=k).kind for k in SOURCE_KINDS} == {k: k for k in SOURCE_KINDS}
    assert {m: cfg(mode=m).mode for m in SS_MODES} == {m: m for m in SS_MODES}


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg().min_side = 10  # type: ignore[misc]


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"kind": "laion"}, "kind must be one of"),
        ({"mode": "slow"}, "mode must be one of"),
        ({"ss_max_side": 0}, "ss_max_side must be positive, got 0"),
        ({"max_boxes": 0}, "max_boxes must be positive"),
        ({"shard_size": -1}, "shard_size must be positive"),
        ({"max_pixels": 0}, "max_pixels must be positive"),
        ({"iou": 0.0}, r"iou must be in \(0, 1\]"),
        ({"iou": 1.01}, r"iou must be in \(0, 1\]"),
        ({"max_aspect": 0.99}, "max_aspect must be >= 1"),
        ({"jpeg_quality": 0}, r"jpeg_quality must be in \[1, 100\]"),
        ({"jpeg_quality": 101}, r"jpeg_quality must be in \[1, 100\]"),
        ({"max_side": 15}, "max_side must be >= 16, got 15"),
        ({"max_boxes": schema.MAX_BOXES + 1}, f"max_boxes must be at most {schema.MAX_BOXES}"),
    ],
)
def test_invalid_settings(setting, message):
    with pytest.raises(ValueError, match=message):
        cfg(**setting)


def test_edges_of_the_valid_ranges():
    c = cfg(iou=1.0, max_aspect=1.0, jpeg_quality=1, max_side=16, ss_max_side=1, max_boxes=1, shard_size=1)
    assert (c.iou, c.max_aspect, c.jpeg_quality, c.max_side) == (1.0, 1.0, 1, 16)
    assert cfg(jpeg_quality=100).jpeg_quality == 100


# One other value per setting. A setting added to PrepConfig must be added here, or the test below fails: every
# setting but root decides what the shards hold, so every one must change the fingerprint.
OTHER_VALUES = {
    "kind": "imagenet",
    "annotations": "instances_train.json",
    "mode": "quality",
    "ss_max_side": 400,
    "seed": 1,
    "min_side": 80,
    "fallback_min_side": 48,
    "max_aspect": 2.5,
    "iou": 0.7,
    "max_boxes": 50,
    "min_boxes": 5,
    "max_side": 1024,
    "jpeg_quality": 90,
    "max_pixels": 10_000_000,
    "shard_size": 500,
    "prefix": "part1",
}


def test_every_content_setting_changes_the_fingerprint_and_root_does_not():
    base = cfg()
    names = {f.name for f in dataclasses.fields(PrepConfig)}
    assert set(OTHER_VALUES) == names - {"root"}, "a setting without a value in OTHER_VALUES"
    seen = {base.fingerprint()}
    for name, value in OTHER_VALUES.items():
        fp = dataclasses.replace(base, **{name: value}).fingerprint()
        assert fp not in seen, f"{name}={value!r} leaves the fingerprint as it was"
        seen.add(fp)
    # a data set mounted elsewhere resumes
    assert dataclasses.replace(base, root="/mnt/elsewhere").fingerprint() == base.fingerprint()


def test_equal_configs_have_equal_fingerprints():
    a = cfg(**OTHER_VALUES)
    b = PrepConfig(**dict(reversed(list(a.to_dict().items()))))  # another keyword order
    assert a == b and a.fingerprint() == b.fingerprint()
    # the fingerprint is written into every output (run config, stats, manifest) and compared on resume: the same
    # settings must give the same value in any process and any later version of this code, or outputs made before
    # stop resuming. A change of this value needs a note for users with existing outputs.
    assert cfg().fingerprint() == "339704547934f757"
    # the manifest's fingerprint, made by shards.schema from the config without root, is the same value
    assert cfg().fingerprint() == schema.fingerprint({k: v for k, v in cfg().to_dict().items() if k != "root"})


def test_a_float_setting_given_as_an_int_has_the_same_fingerprint():
    assert cfg(max_aspect=3) == cfg(max_aspect=3.0)
    assert cfg(max_aspect=3).fingerprint() == cfg(max_aspect=3.0).fingerprint()
    assert cfg(iou=1).fingerprint() == cfg(iou=1.0).fingerprint()


def test_json_round_trip_of_a_recorded_config():
    c = cfg(**OTHER_VALUES, root="/data/imagenet")
    recorded = json.loads(schema.dumps({"config": c.to_dict()}))["config"]  # as stats, manifest and run config hold it
    back = PrepConfig.from_dict(recorded)
    assert back == c and back.fingerprint() == c.fingerprint() and back.root == "/data/imagenet"
    assert isinstance(back.iou, float) and isinstance(back.max_side, int)
    # a key this version does not know (written by another version) is left out, not an error
    assert PrepConfig.from_dict({**recorded, "retired_setting": 1}) == c
    with pytest.raises(TypeError):  # without the source, there is no config
        PrepConfig.from_dict({k: v for k, v in recorded.items() if k != "kind"})
    with pytest.raises(ValueError, match="iou"):  # a record is validated like a command line
        PrepConfig.from_dict({**recorded, "iou": 2})
