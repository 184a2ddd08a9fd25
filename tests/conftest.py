import itertools
import os
import sys

import pytest

# Tests import the packages from the checkout, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.servers import FaultyHTTPServer, MotoServer, S3Endpoint, TCPProxy  # noqa: E402  (needs the path above)


@pytest.fixture
def umask():
    """``umask(mask)`` sets the process umask inside one test; the one before the test is restored after it."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny tensors: a second intra-op thread only adds contention on a shared 2-core machine.
    Use with ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``."""
    import torch  # here, not at the top: prep and shards tests must run without importing torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --- real servers on 127.0.0.1 (tests/servers.py), shared by the storage, reader, prep and train tests ---------------
@pytest.fixture(scope="session")
def moto_server():
    """One moto S3 server per session: its start costs about a second; tests share it through ``s3_server``."""
    server = MotoServer()
    server.start()
    yield server
    server.stop()


_buckets = itertools.count()


@pytest.fixture
def s3_server(moto_server, monkeypatch):
    """An ``S3Endpoint``: a fresh bucket on the session's moto server, fake credentials in the environment."""
    from shards import storage

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    # fake identity and no user config files: tests never touch a real account
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    if moto_server._server is None:  # a previous test stopped it
        moto_server.start()
    endpoint = S3Endpoint(moto_server.endpoint)
    endpoint.bucket = f"test-{os.getpid()}-{next(_buckets)}"
    endpoint.client().create_bucket(Bucket=endpoint.bucket)
    yield endpoint
    storage.configure()
    if moto_server._server is None:
        moto_server.start()


@pytest.fixture
def http_server():
    """``http_server(directory)`` -> a ``FaultyHTTPServer`` serving it; every server made is stopped after the test."""
    servers: list[FaultyHTTPServer] = []

    def make(directory) -> FaultyHTTPServer:
        servers.append(FaultyHTTPServer(directory))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def tcp_proxy():
    """``tcp_proxy(port)`` -> a ``TCPProxy`` to 127.0.0.1:port; every proxy made is closed after the test."""
    proxies: list[TCPProxy] = []

    def make(target_port: int) -> TCPProxy:
        proxies.append(TCPProxy(target_port))
        return proxies[-1]

    yield make
    for p in proxies:
        p.close()


# --- a finished output of the bundled COCO sample, shared by the report and export tests ------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_COCO = os.path.join(REPO, "data", "sample", "coco")
# Two ground-truth objects (x, y, w, h in source pixels) so that `prep eval-proposals` has something to find.
SAMPLE_OBJECTS = {1: [120.0, 160.0, 200.0, 240.0], 2: [90.0, 40.0, 220.0, 150.0]}


class SampleOutput(str):
    """The output directory, carrying its annotation file (the sample's images, the two failed inputs' entries and
    ``SAMPLE_OBJECTS``)."""

    annotations: str


@pytest.fixture(scope="session")
def sample_output(tmp_path_factory) -> SampleOutput:
    """``prep coco`` of the 8 sample photos plus an empty file and a missing one (10 inputs: 8 ok, failed ``empty``
    and ``missing``) in 4 shards of 3, stored at 240 px (boxes are in stored pixels, sources are 400 px wide), with
    first-tier sides >= 100 px and a fallback tier down to 40 px that 2 photos need. About a second."""
    import json
    import shutil

    from prep import run as prep_run
    from prep.config import PrepConfig

    root = tmp_path_factory.mktemp("sample_coco")
    images = root / "images"
    shutil.copytree(os.path.join(SAMPLE_COCO, "images"), images)
    (images / "000000000009.jpg").write_bytes(b"")
    with open(os.path.join(SAMPLE_COCO, "annotations", "instances_sample.json")) as f:
        ann = json.load(f)
    ann["images"] += [
        {"id": 9, "file_name": "000000000009.jpg", "width": 10, "height": 10},
        {"id": 10, "file_name": "000000000010.jpg", "width": 10, "height": 10},
    ]
    ann["annotations"] = [
        {"id": i + 1, "image_id": image, "bbox": box, "area": box[2] * box[3], "category_id": 1, "iscrowd": 0}
        for i, (image, box) in enumerate(SAMPLE_OBJECTS.items())
    ]
    annotations = root / "annotations.json"
    annotations.write_text(json.dumps(ann))
    cfg = PrepConfig(
        kind="coco",
        root=str(images),
        annotations=str(annotations),
        ss_max_side=128,
        max_side=240,
        min_side=100,
        fallback_min_side=40,
        shard_size=3,
    )
    out = SampleOutput(root / "out")
    prep_run.run(cfg, out, workers=1, progress=False)
    out.annotations = str(annotations)
    return out
