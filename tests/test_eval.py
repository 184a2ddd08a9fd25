"""train.eval: kNN and the linear probe against naive references, the key-hash split, and python -m train.eval end to
end on CPU (random init, a tiny training run's checkpoint, its export, box crops, JSON, clear errors).

The labelled data is an ImageNet-style tree of solid-colour images (one colour per class, a few darker rectangles
so selective search finds boxes) turned into shards by `prep imagenet`: any encoder that keeps colour separates it,
a random-init resnet18 included."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from imagegen import jpeg_bytes, photo_path
from test_cli import invoke
from test_train import ENV, ROOT, TINY, run_train

from shards import reader, schema
from shards.writer import ShardWriter
from train import eval as ev

pytestmark = pytest.mark.usefixtures("torch_one_thread")

COLOURS = [(200, 40, 40), (40, 180, 40), (40, 40, 200), (200, 200, 40)]
SIZE = ["--size", "32", "--no-progress"]
CPU = torch.device("cpu")


def write_colour_tree(root: str, per_class: int = 12, seed: int = 0) -> str:
    """ROOT/<wnid>/*.jpg: 48 x 40 images of the class colour with two darker rectangles and mild noise."""
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(COLOURS):
        folder = os.path.join(root, f"n{c:08d}")
        os.makedirs(folder)
        for i in range(per_class):
            img = np.empty((40, 48, 3), np.float64)
            img[:] = colour
            for _ in range(2):
                (x0, y0), (w, h) = rng.integers(0, 32, 2), rng.integers(10, 16, 2)
                img[y0 : y0 + h, x0 : x0 + w] = np.array(colour) * rng.uniform(0.3, 0.7)
            img += rng.normal(0, 4, img.shape)
            with open(os.path.join(folder, f"img{i:02d}.jpg"), "wb") as f:
                f.write(jpeg_bytes(np.clip(img, 0, 255).astype(np.uint8)))
    return root


def prep_shards(kind: str, tree: str, out: str) -> str:
    r = invoke(
        kind,
        tree,
        "--out",
        out,
        "--mode",
        "fast",
        "--workers",
        "1",
        "--min-side",
        "8",
        "--max-boxes",
        "5",
        "--shard-size",
        "16",
        "--no-progress",
    )
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    return write_colour_tree(str(tmp_path_factory.mktemp("tree") / "root"))


@pytest.fixture(scope="module")
def labelled(tree, tmp_path_factory) -> str:
    """Three shards of 16 labelled samples (4 classes x 12)."""
    return prep_shards("imagenet", tree, str(tmp_path_factory.mktemp("labelled")))


@pytest.fixture(scope="module")
def tiny_run(labelled, tmp_path_factory) -> str:
    """The checkpoint of a 2-step tiny training run (resnet18) on the labelled shards."""
    out = str(tmp_path_factory.mktemp("run"))
    run_train(*TINY, "--data", labelled, "--out", out, "--max-steps", "2")
    return os.path.join(out, "ckpt-00000002.pt")


def _main(capsys, *argv) -> tuple[int, str, str]:
    code = ev.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- classifiers against naive references --------------------------------------------------------------------------
def naive_knn_votes(train_f, train_y, val_f, k, temperature, n_classes):
    """One val sample at a time: cosine similarity to every train sample, the k largest vote exp(sim / T)."""
    votes = np.zeros((len(val_f), n_classes))
    tn = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)
    for i, v in enumerate(val_f):
        sims = tn @ (v / np.linalg.norm(v))
        for j in np.argsort(-sims, kind="stable")[:k]:
            votes[i, train_y[j]] += np.exp(sims[j] / temperature)
    return votes


@pytest.mark.parametrize("k, classes", [(5, 3), (20, 7), (100, 4)])  # k = 100 > the 60 train samples
def test_knn_matches_a_naive_loop(k, classes):
    g = torch.Generator().manual_seed(k)
    train_f, val_f = torch.randn(60, 16, generator=g), torch.randn(25, 16, generator=g)
    train_y, val_y = torch.randint(classes, (60,), generator=g), torch.randint(classes, (25,), generator=g)
    scores = ev.knn_scores(train_f, train_y, val_f, k=k, temperature=0.1, n_classes=classes)
    ref = naive_knn_votes(train_f.double().numpy(), train_y.numpy(), val_f.double().numpy(), k, 0.1, classes)
    np.testing.assert_allclose(scores.numpy(), ref, rtol=1e-4)
    top1 = (ref.argmax(1) == val_y.numpy()).mean()
    assert ev.knn_top1(train_f, train_y, val_f, val_y, k=k, temperature=0.1) == pytest.approx(top1)
    top3 = np.mean([y in np.argsort(-r)[:3] for r, y in zip(ref, val_y.numpy(), strict=True)])
    assert ev.topk_accuracy(scores, val_y, 3) == pytest.approx(top3)


def test_knn_ignores_feature_scale():
    g = torch.Generator().manual_seed(0)
    train_f, val_f = torch.randn(40, 8, generator=g), torch.randn(10, 8, generator=g)
    y = torch.randint(3, (40,), generator=g)
    scaled = train_f * torch.rand(40, 1, generator=g) * 100
    torch.testing.assert_close(ev.knn_scores(scaled, y, val_f * 7), ev.knn_scores(train_f, y, val_f), rtol=1e-5, atol=0)


def _blobs(n: int, seed: int, dim: int = 16, classes: int = 4, spread: float = 0.3):
    """Linearly separable classes: Gaussian blobs around far-apart centres, on a large offset and scale (the probe
    standardises)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    y = torch.arange(n) % classes
    return 1000 + 50 * (centres[y] + spread * torch.randn(n, dim, generator=g)), y


def test_linear_probe_fits_separable_classes_deterministically():
    train_f, train_y = _blobs(80, seed=1)
    val_f, val_y = _blobs(40, seed=2)
    assert ev.linear_top1(train_f, train_y, val_f, val_y) == 1.0
    a = ev.linear_scores(train_f, train_y, val_f)
    b = ev.linear_scores(train_f.clone(), train_y.clone(), val_f.clone())
    assert torch.equal(a, b)
    # the fit learns from the labels: shuffled train labels leave no signal for val
    shuffled = train_y[torch.randperm(80, generator=torch.Generator().manual_seed(0))]
    assert ev.linear_top1(train_f, shuffled, val_f, val_y) < 0.6


def test_linear_probe_penalty_bounds_the_weights_on_separable_data():
    # without the penalty, separable data would push the logits to infinity; with it they stay finite, and a
    # larger penalty gives smaller ones
    train_f, train_y = _blobs(40, seed=3, spread=0.05)
    small = ev.linear_scores(train_f, train_y, train_f, wd=1e-4)
    large = ev.linear_scores(train_f, train_y, train_f, wd=1e-1)
    assert torch.isfinite(small).all() and small.abs().max() > 2 * large.abs().max()
    assert (small.argmax(1) == train_y).all() and (large.argmax(1) == train_y).all()


# --- split -------------------------------------------------------------------------------------------------------
def test_split_is_deterministic_disjoint_and_keeps_box_crops_together():
    keys = [f"n{c:08d}__img_{i:04d}" for c in range(5) for i in range(200)]
    val = ev.in_val(keys, 0.2)
    assert 0.15 < val.float().mean() < 0.25
    order = np.random.default_rng(0).permutation(len(keys))
    shuffled = ev.in_val([keys[i] for i in order], 0.2)
    assert torch.equal(shuffled, val[order])  # membership depends on the key only
    assert torch.equal(ev.in_val(keys, 0.2), val)
    boxes = ev.in_val([f"{k}#{i}" for k in keys[:50] for i in range(3)], 0.2)
    assert torch.equal(boxes, val[:50].repeat_interleave(3))

    data = ev.Labelled(torch.zeros(len(keys), 3, 2, 2, dtype=torch.uint8), torch.arange(len(keys)), keys)
    train_part, val_part = ev.split(data, 0.2)
    assert set(train_part.keys).isdisjoint(val_part.keys)
    assert sorted(train_part.keys + val_part.keys) == sorted(keys)
    assert val_part.keys == [k for k, v in zip(keys, val.tolist(), strict=True) if v]
    assert [keys[i] for i in val_part.labels.tolist()] == val_part.keys  # images, labels and keys stay paired
    with pytest.raises(ev.EvalError, match="leaves the val split empty"):
        ev.split(data.subset(torch.arange(len(keys)) < 3), 0.001)


# --- data and features ---------------------------------------------------------------------------------------------
def test_random_init_separates_the_colour_classes(labelled):
    data = ev.load_labelled(labelled, size=32)
    assert data.images.shape == (48, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.keys == sorted(data.keys) and sorted(set(data.labels.tolist())) == [0, 1, 2, 3]
    assert all(k.startswith(f"n{y:08d}__") for k, y in zip(data.keys, data.labels.tolist(), strict=True))
    train, val = ev.split(data, 0.3)
    encoder, info = ev.load_encoder(random_init=True, arch="resnet18")
    assert info == {"source": "random-init", "arch": "resnet18", "seed": 0}
    encoder.train()
    result = ev.evaluate(encoder, train, val, device=CPU)
    assert encoder.training  # restored
    assert result["knn_top1"] == 1.0 and result["linear_top1"] == 1.0, result
    assert result["n_train"] == len(train) and result["n_val"] == len(val) and result["n_classes"] == 4
    assert "knn_top5" not in result  # only with more than 5 classes


@pytest.mark.parametrize("photo", ["coffee.jpg", "astronaut.jpg"])  # 320 x 213 and 320 x 320
def test_centre_view_is_torchvision_resize_and_centre_crop(photo):
    from PIL import Image
    from torchvision.transforms import v2

    with open(photo_path(photo), "rb") as f:
        jpeg = f.read()
    rgb = Image.open(io.BytesIO(jpeg)).convert("RGB")
    decoded = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
    ref = v2.CenterCrop(32)(v2.Resize(37, antialias=True)(decoded))
    ours = ev.centre_view(jpeg, rgb.width, rgb.height, size=32, resize=37)
    assert ours.shape == (3, 32, 32) and torch.equal(ours, ref)


def test_random_init_is_the_training_runs_step_0_encoder():
    from train.config import preset
    from train.model import ModelConfig, UniVIP

    torch.manual_seed(3)
    model = UniVIP(ModelConfig.from_train(preset("tiny")))
    encoder, _ = ev.load_encoder(random_init=True, arch="resnet18", seed=3)
    for name, value in model.online.encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], value), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_features_and_classifiers_match_the_cpu():
    # bf16 autocast and channels_last change the features a little, not the answers; needs no shards (no prep)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 4
    colours = torch.tensor(COLOURS, dtype=torch.float32)[labels]
    noise = torch.randn(64, 3, 32, 32, generator=g) * 8
    images = (colours[:, :, None, None] + noise).clamp(0, 255).to(torch.uint8)
    data = ev.Labelled(images, labels, [f"k{i:03d}" for i in range(64)])
    train, val = ev.split(data, 0.3)
    encoder, _ = ev.load_encoder(random_init=True, arch="resnet18")
    cpu_f = ev.extract(encoder, images, device=CPU)
    cuda = torch.device("cuda")
    encoder = encoder.to(cuda).to(memory_format=torch.channels_last)
    cuda_f = ev.extract(encoder, images, device=cuda, batch_size=16)
    assert cuda_f.device == CPU and cuda_f.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(cuda_f, cpu_f, dim=1)
    assert cos.min() > 0.99, cos.min()
    assert ev.evaluate(encoder, train, val, device=cuda) == ev.evaluate(encoder.cpu(), train, val, device=CPU)


# --- the command line ----------------------------------------------------------------------------------------------
def _load_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def test_cli_random_init_matches_the_api_and_writes_json(labelled, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, err = _main(
        capsys,
        "--random-init",
        "--arch",
        "resnet18",
        "--data",
        labelled,
        "--val-fraction",
        "0.3",
        *SIZE,
        "--workers",
        "2",
        "--json",
        out,
    )
    assert code == 0, err
    r = _load_json(out)
    assert stdout == (
        f"knn_top1 1.000 linear_top1 1.000 | resnet18 random-init seed 0 | train {r['n_train']} "
        f"val {r['n_val']} | 4 classes\n"
    )
    assert r["n_train"] + r["n_val"] == 48 and r["n_classes"] == 4
    assert r["model"] == {"source": "random-init", "arch": "resnet18", "seed": 0}
    s = r["settings"]
    assert (s["size"], s["resize"], s["k"], s["temperature"], s["boxes"]) == (32, 37, 20, 0.07, False)
    assert s["device"] == "cpu" and s["wd"] == ev.DEFAULT_WD
    assert s["data"] == labelled and s["val_fraction"] == 0.3 and s["knn"] and s["linear"]
    # the streaming path (2 workers) gives the features of the in-memory one, so the same split and accuracies
    data = ev.load_labelled(labelled, size=32)
    train, val = ev.split(data, 0.3)
    assert (len(train), len(val)) == (r["n_train"], r["n_val"])
    encoder, _ = ev.load_encoder(random_init=True, arch="resnet18")
    f, y, keys = ev.stream_features(encoder, labelled, device=CPU, size=32, workers=2)
    assert keys == data.keys and torch.equal(y, data.labels)
    torch.testing.assert_close(f, ev.extract(encoder, data.images, device=CPU))

    # --json -: JSON alone on stdout, the line on stderr; --no-linear drops the probe. Val = train with k = 1:
    # every sample's nearest neighbour is itself
    code, stdout, err = _main(
        capsys,
        "--random-init",
        "--arch",
        "resnet18",
        "--train-data",
        labelled,
        "--val-data",
        labelled,
        *SIZE,
        "--workers",
        "0",
        "--no-linear",
        "--k",
        "1",
        "--json",
    )
    r = json.loads(stdout)
    assert code == 0 and "linear_top1" not in r and r["knn_top1"] == 1.0 and r["n_train"] == r["n_val"] == 48
    assert r["settings"]["k"] == 1 and not r["settings"]["linear"]
    assert err.startswith("knn_top1 1.000 | resnet18")


def test_cli_checkpoint_export_and_encoders_agree(tiny_run, labelled, tmp_path, capsys):
    from train import export

    args = ["--data", labelled, "--val-fraction", "0.3", *SIZE, "--workers", "0", "--json", "-"]
    code, stdout, err = _main(capsys, tiny_run, *args)
    assert code == 0, err
    online = json.loads(stdout)
    assert online["model"] == {
        "source": "checkpoint",
        "path": tiny_run,
        "step": 2,
        "arch": "resnet18",
        "encoder": "online",
    }
    assert f"resnet18 {tiny_run} step 2 online" in err
    code, stdout, err = _main(capsys, "--checkpoint", tiny_run, "--encoder", "target", "--arch", "resnet18", *args)
    assert code == 0 and json.loads(stdout)["model"]["encoder"] == "target"

    exported = str(tmp_path / "r18.pth")
    assert export.main([tiny_run, "--format", "torchvision", "-o", exported]) == 0
    code, stdout, err = _main(capsys, "--export", exported, *args)
    assert code == 0, err
    from_export = json.loads(stdout)
    assert from_export["model"] == {"source": "export", "path": exported, "arch": "resnet18"}
    for key in ("knn_top1", "linear_top1", "n_train", "n_val"):
        assert from_export[key] == online[key], key  # the same weights

    # the loaded encoders: the online branch of the model state, and the export holds exactly it
    ckpt = torch.load(tiny_run, weights_only=True)["model"]
    for source in ({"checkpoint": tiny_run}, {"export": exported}):
        encoder, _ = ev.load_encoder(**source)
        for name, value in encoder.net.state_dict().items():
            assert torch.equal(value, ckpt[f"online.encoder.net.{name}"]), (source, name)
    target, _ = ev.load_encoder(checkpoint=tiny_run, encoder="target")
    assert torch.equal(target.net.conv1.weight, ckpt["target.encoder.net.conv1.weight"])
    assert not torch.equal(target.net.conv1.weight, encoder.net.conv1.weight)  # two steps of EMA apart


def test_cli_boxes_give_one_item_per_box(labelled, capsys):
    boxes = [len(s["meta"]["boxes"]) for u in reader.expand_spec(labelled) for s in reader.read_shard(u)]
    assert sum(boxes) > 48 and min(boxes) >= 1
    for extra, expected in (([], sum(boxes)), (["--max-boxes", "2"], sum(min(2, b) for b in boxes))):
        code, stdout, err = _main(
            capsys,
            "--random-init",
            "--arch",
            "resnet18",
            "--data",
            labelled,
            "--val-fraction",
            "0.3",
            *SIZE,
            "--workers",
            "0",
            "--boxes",
            *extra,
            "--json",
            "-",
        )
        r = json.loads(stdout)
        assert code == 0 and r["n_train"] + r["n_val"] == expected, (extra, r)
        assert r["settings"]["boxes"] and r["knn_top1"] > 0.75 and "box crops" in err  # chance: 0.25
    data = ev.load_labelled(labelled, size=16, boxes=True, max_boxes=1)
    assert data.images.shape == (48, 3, 16, 16) and all(k.endswith("#0") for k in data.keys)


# --- errors --------------------------------------------------------------------------------------------------------
def test_unlabelled_shards_are_refused_naming_the_shard(tree, tmp_path):
    # through the real entry point and a DataLoader worker: a clean message, no traceback
    unlabelled = prep_shards("folder", tree, str(tmp_path / "folder"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.eval",
            "--random-init",
            "--arch",
            "resnet18",
            "--data",
            unlabelled,
            "--val-fraction",
            "0.3",
            *SIZE,
            "--workers",
            "1",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("python -m train.eval: error: ") and "Traceback" not in proc.stderr
    assert os.path.join(unlabelled, "folder-000000.tar") in proc.stderr and "label null" in proc.stderr


def test_bad_samples_are_skipped_counted_and_named(labelled, tmp_path, capsys):
    from test_check import rewrite_tar

    copy = tmp_path / "copy"
    shutil.copytree(labelled, copy)
    seen = []

    def damage(name: str, data: bytes):
        seen.append(name)
        if len(seen) == 2:  # the first sample: a box past the image
            return json.dumps({**json.loads(data), "boxes": [[0, 0, 9000, 9000]]}).encode()
        if len(seen) == 3:  # the second sample's JPEG: another size than its KEY.json says
            return jpeg_bytes(np.zeros((10, 10, 3), np.uint8))
        if len(seen) == 6:  # the third sample's KEY.json: gone
            return None
        return data

    rewrite_tar(str(copy / "imagenet-000001.tar"), damage)
    bad = [seen[0], seen[2], seen[4]]
    args = ["--random-init", "--arch", "resnet18", "--data", copy, "--val-fraction", "0.3", *SIZE, "--workers", "2"]
    with pytest.warns(RuntimeWarning) as record:
        code, stdout, err = _main(capsys, *args, "--json", tmp_path / "r.json")
    assert code == 0, err
    r = _load_json(tmp_path / "r.json")
    assert r["n_train"] + r["n_val"] == 45 and r["samples_skipped"] == {
        "bad_boxes": 1,
        "bad_image": 1,
        "missing_member": 1,
    }
    assert stdout.rstrip().endswith("| 3 bad samples skipped (bad_boxes 1, bad_image 1, missing_member 1)")
    (message,) = [str(w.message) for w in record]  # once per shard, naming it and the first bad key
    shard = str(copy / "imagenet-000001.tar")
    assert message.startswith(
        f"skipping a bad sample: {shard}: sample {bad[0].split('.')[0]!r}: box 0 [0, 0, 9000, 9000] is"
    )


def test_wrong_architecture_is_refused(tiny_run, labelled, tmp_path, capsys):
    from train import export

    args = ["--data", labelled, "--val-fraction", "0.3", *SIZE, "--workers", "0"]
    code, _, err = _main(capsys, tiny_run, "--arch", "resnet50", *args)
    assert code == 1 and err == f"python -m train.eval: error: {tiny_run} holds a resnet18 backbone, not resnet50\n"
    exported = str(tmp_path / "r18.pth")
    export.main([tiny_run, "--format", "torchvision", "-o", exported])
    code, _, err = _main(capsys, "--export", exported, "--arch", "resnet34", *args)
    assert code == 1 and f"{exported} holds a resnet18 backbone, not resnet34" in err
    state = torch.load(exported, weights_only=True)
    del state["layer4.1.conv2.weight"]
    torch.save(state, exported)
    code, _, err = _main(capsys, "--export", exported, *args)
    assert code == 1 and f"{exported}: its" in err and "not the backbone of any of resnet18" in err
    code, _, err = _main(capsys, "--export", tiny_run, *args)
    assert code == 1 and "is a training checkpoint, not an export" in err


def test_empty_split_and_no_samples(labelled, tmp_path, capsys):
    base = ["--random-init", "--arch", "resnet18", *SIZE, "--workers", "0"]
    code, _, err = _main(capsys, *base, "--data", labelled, "--val-fraction", "0.001")
    assert code == 1 and "--val-fraction 0.001 of 48 items leaves the val split empty" in err
    code, _, err = _main(capsys, *base, "--data", labelled, "--val-fraction", "0.999")
    assert code == 1 and "leaves the train split empty" in err
    empty = tmp_path / "empty"
    with ShardWriter(str(empty), schema.shard_name("e", 0), config={}, fingerprint="test", min_boxes=4):
        pass
    code, _, err = _main(capsys, *base, "--train-data", labelled, "--val-data", str(empty))
    assert code == 1 and f"{empty}: no samples" in err
    code, _, err = _main(capsys, *base, "--data", str(tmp_path / "nowhere"), "--val-fraction", "0.5")
    assert code == 1 and "nowhere" in err


def test_usage_errors_and_help(capsys):
    for argv, message in (
        (["--data", "d", "--val-fraction", "0.5"], "exactly one encoder source"),
        (["--random-init", "--data", "d", "--val-fraction", "0.5"], "--random-init needs --arch"),
        (["--random-init", "--arch", "resnet18", "--data", "d"], "--data needs --val-fraction"),
        (["--random-init", "--arch", "resnet18", "--train-data", "d"], "give --train-data and --val-data"),
        (
            ["--random-init", "--arch", "resnet18", "--encoder", "target", "--data", "d", "--val-fraction", "0.5"],
            "--encoder picks a branch of a checkpoint",
        ),
    ):
        with pytest.raises(SystemExit) as e:
            ev.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        ev.main(["--help"])
    out = capsys.readouterr().out
    for text in (
        "usage: python -m train.eval",
        "N x C float32",
        "--val-fraction F",
        "--boxes",
        "--max-boxes N",
        "--no-linear",
        "--json [FILE]",
        "--encoder {online,target}",
    ):
        assert text in out, text


# --- BatchNorm statistics re-estimated on the probe's images --------------------------------------------------------
def test_recompute_bn_averages_each_batch_statistics_and_leaves_the_encoder_alone():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.ReLU(), torch.nn.BatchNorm2d(5)
    )
    net[1].running_mean.fill_(7.0)  # statistics from "training", to be replaced
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    out = ev.recompute_bn(net, images, device=CPU, batch_size=4)  # batches of 4, 4, 2
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the caller's encoder untouched
    assert not out.training and all(m.momentum is None for m in ev._bn_layers(out))
    # naive: the plain average over the batches of each batch's mean and unbiased variance, layer by layer
    x = ev.normalize(images)
    with torch.no_grad():
        conv = net[0](x)
        means = [conv[i : i + 4].mean(dim=(0, 2, 3)) for i in (0, 4, 8)]
        variances = [conv[i : i + 4].var(dim=(0, 2, 3), unbiased=True) for i in (0, 4, 8)]
    torch.testing.assert_close(out[1].running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(out[1].running_var, torch.stack(variances).mean(0))
    assert int(out[1].num_batches_tracked) == 3
    # a batch of one is skipped (no statistics of one value), not an error; nothing but batches of one is
    assert int(ev.recompute_bn(net, images[:9], device=CPU, batch_size=4)[1].num_batches_tracked) == 2
    with pytest.raises(ev.EvalError, match="at least one batch"):
        ev.recompute_bn(net, images[:1], device=CPU)


def test_cli_recompute_bn_uses_only_the_train_split(labelled, tmp_path, capsys):
    common = ["--random-init", "--arch", "resnet18", "--data", labelled, "--val-fraction", "0.3", *SIZE]
    code, _, err = _main(capsys, *common, "--workers", "0", "--json", tmp_path / "a.json")
    assert code == 0, err
    code, _, err = _main(capsys, *common, "--workers", "0", "--recompute-bn", "--json", tmp_path / "b.json")
    assert code == 0, err
    a, b = _load_json(tmp_path / "a.json"), _load_json(tmp_path / "b.json")
    assert b["settings"]["recompute_bn"] and not a["settings"]["recompute_bn"]
    # the same as the API on the in-memory train split: statistics of the train images only
    train, val = ev.split(ev.load_labelled(labelled, size=32), 0.3)
    encoder, _ = ev.load_encoder(random_init=True, arch="resnet18")
    adapted = ev.recompute_bn(encoder, train.images, device=CPU)
    assert b["knn_top1"] == ev.evaluate(adapted, train, val, device=CPU, linear=False)["knn_top1"]
