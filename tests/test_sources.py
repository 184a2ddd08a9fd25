import json
import os

import pytest

from prep.sources import Record, SourceError, load_source, unique_keys
from shards import schema

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample")


def touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def coco_json(*entries):
    return {
        "info": {},
        "images": [{"id": i, "file_name": n, "width": 10, "height": 10} for i, n in entries],
        "annotations": [],
        "categories": [],
    }


def test_coco_annotations_sorted_by_id_and_missing_file_kept(tmp_path):
    root = tmp_path / "images"
    touch(str(root / "b.jpg"))
    touch(str(root / "sub" / "a.jpg"))
    ann = tmp_path / "instances.json"
    write_json(str(ann), coco_json((42, "b.jpg"), (7, "sub/a.jpg"), (100, "gone.jpg")))

    src = load_source("coco", str(root), str(ann))
    assert src.kind == "coco" and src.classes is None and src.root == str(root)
    assert [r.image_id for r in src.records] == [7, 42, 100]
    assert [r.key for r in src.records] == ["000000000007", "000000000042", "000000000100"]
    assert src.records[0] == Record(
        key="000000000007", path=str(root / "sub" / "a.jpg"), relpath="sub/a.jpg", image_id=7
    )
    missing = src.records[2]
    assert missing.relpath == "gone.jpg" and not os.path.exists(missing.path)


@pytest.mark.parametrize(
    "content, reason",
    [
        ("{not json", "invalid JSON at line 1"),
        (json.dumps({"annotations": []}), "no 'images' list"),
        (json.dumps([1, 2]), "no 'images' list"),
        (json.dumps({"images": [{"id": "1", "file_name": "a.jpg"}]}), "images[0] needs an integer 'id'"),
        (json.dumps({"images": [{"id": 1, "file_name": "../a.jpg"}]}), "images[0]"),
        (json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}]}), "listed twice"),
    ],
)
def test_coco_bad_annotations_name_the_file(tmp_path, content, reason):
    touch(str(tmp_path / "images" / "a.jpg"))
    ann = tmp_path / "bad.json"
    ann.write_text(content)
    with pytest.raises(SourceError) as e:
        load_source("coco", str(tmp_path / "images"), str(ann))
    assert str(ann) in str(e.value) and reason in str(e.value)


def test_coco_errors_before_any_work(tmp_path):
    touch(str(tmp_path / "images" / "a.jpg"))
    with pytest.raises(SourceError, match="does not exist"):
        load_source("coco", str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="not a directory"):
        load_source("coco", str(tmp_path / "images" / "a.jpg"))
    with pytest.raises(SourceError, match=r"missing\.json: annotation file does not exist"):
        load_source("coco", str(tmp_path / "images"), str(tmp_path / "missing.json"))
    os.mkdir(tmp_path / "empty_dir")
    touch(str(tmp_path / "empty_dir" / "readme.txt"))
    with pytest.raises(SourceError, match="no image files"):
        load_source("folder", str(tmp_path / "empty_dir"))
    with pytest.raises(SourceError, match="unknown source kind"):
        load_source("voc", str(tmp_path))
    # every listed file absent: ROOT is almost surely the wrong directory
    ann = tmp_path / "a.json"
    write_json(str(ann), coco_json((1, "x.jpg"), (2, "y.jpg")))
    with pytest.raises(SourceError, match="none of the 2 images"):
        load_source("coco", str(tmp_path / "images"), str(ann))


def test_folder_odd_names_give_valid_unique_keys(tmp_path):
    names = [
        "a b.jpg",
        "a_b.png",
        "A B.JPG",
        "x.y.z.jpeg",
        "ç/é.webp",
        "日本/猫.PNG",
        "deep/er/img.TIF",
        "g.gif",
        "b.bmp",
        "long/" + "n" * 120 + ".jpg",
        "k.tiff",
    ]
    for n in names:
        touch(str(tmp_path / n))
    touch(str(tmp_path / "notes.txt"))
    touch(str(tmp_path / ".hidden.jpg"))
    touch(str(tmp_path / ".cache" / "c.jpg"))
    touch(str(tmp_path / "noext"))

    src = load_source("folder", str(tmp_path))
    rels = [r.relpath for r in src.records]
    assert rels == sorted(names)  # images only, hidden skipped, sorted by relpath
    keys = [r.key for r in src.records]
    assert all(schema.is_valid_key(k) for k in keys)
    assert len({k.lower() for k in keys}) == len(keys)
    by_rel = {r.relpath: r for r in src.records}
    assert by_rel["x.y.z.jpeg"].key == "x_y_z"
    assert by_rel["deep/er/img.TIF"].key == "deep__er__img"
    # "a b", "a_b" and "A B" collide (case-insensitively): all three get a path digest
    assert {by_rel[n].key[:4] for n in ("a b.jpg", "a_b.png", "A B.JPG")} <= {"a_b-", "A_B-"}
    for r in src.records:
        assert r.path == os.path.join(str(tmp_path), *r.relpath.split("/")) and r.label is None and r.image_id is None


def test_folder_order_and_keys_are_deterministic(tmp_path):
    for n in ["z.jpg", "a/b.jpg", "a b.jpg", "a_b.jpg", "M.png"]:
        touch(str(tmp_path / n))
    first = load_source("folder", str(tmp_path)).records
    # another copy of the tree, files created in another order, gives the same relpaths and keys
    other = tmp_path.parent / (tmp_path.name + "_copy")
    for n in ["a_b.jpg", "M.png", "z.jpg", "a b.jpg", "a/b.jpg"]:
        touch(str(other / n))
    second = load_source("folder", str(other)).records
    assert [(r.key, r.relpath) for r in first] == [(r.key, r.relpath) for r in second]
    assert [r.relpath for r in first] == sorted(r.relpath for r in first)


def test_unique_keys_rare_second_collision():
    # "a_b-<digest of 'a b.jpg'>" exists literally as a file name: the suffixed key is widened, still unique
    from hashlib import sha1

    literal = "a_b-" + sha1(b"a b.jpg").hexdigest()[:8] + ".jpg"
    keys = unique_keys(sorted(["a b.jpg", "a_b.jpg", literal]))
    assert len(set(keys)) == 3 and all(schema.is_valid_key(k) for k in keys)


def test_imagenet_labels_and_classes(tmp_path):
    for n in ["n02/b.JPEG", "n02/a.JPEG", "n01/x/deep.jpg", "n01/c.jpg", "n03/.hidden.jpg"]:
        touch(str(tmp_path / n))
    touch(str(tmp_path / "stray.jpg"))  # not in a class folder: ignored
    os.mkdir(tmp_path / ".git")
    src = load_source("imagenet", str(tmp_path))
    assert src.classes == ["n01", "n02", "n03"]  # n03 has no images but keeps its index
    assert [(r.relpath, r.label) for r in src.records] == [
        ("n01/c.jpg", 0),
        ("n01/x/deep.jpg", 0),
        ("n02/a.JPEG", 1),
        ("n02/b.JPEG", 1),
    ]
    assert [r.key for r in src.records] == ["n01__c", "n01__x__deep", "n02__a", "n02__b"]


def test_imagenet_errors(tmp_path):
    touch(str(tmp_path / "flat.jpg"))
    with pytest.raises(SourceError, match="no class folders"):
        load_source("imagenet", str(tmp_path))
    os.mkdir(tmp_path / "n01")
    with pytest.raises(SourceError, match="no image files"):
        load_source("imagenet", str(tmp_path))
    with pytest.raises(SourceError, match="only used with coco"):
        load_source("imagenet", str(tmp_path), str(tmp_path / "a.json"))


def test_bundled_sample_data():
    coco = load_source(
        "coco",
        os.path.join(SAMPLE, "coco", "images"),
        os.path.join(SAMPLE, "coco", "annotations", "instances_sample.json"),
    )
    assert len(coco.records) >= 8 and all(os.path.isfile(r.path) for r in coco.records)
    inet = load_source("imagenet", os.path.join(SAMPLE, "imagenet"))
    assert len(inet.classes) == 3 and {r.label for r in inet.records} == {0, 1, 2}
    walked = load_source("coco", os.path.join(SAMPLE, "coco"))  # no annotations: every image under ROOT
    assert len(walked.records) == len(coco.records)
