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
