"""Real servers on 127.0.0.1 for storage tests; tests/conftest.py wraps them as the fixtures ``moto_server``,
``s3_server``, ``http_server`` and ``tcp_proxy``, which any test module takes as arguments without importing them.

``S3Endpoint`` (the value of ``s3_server``): moto in server mode (the S3 API over HTTP, in-process threads); per test
a fresh bucket, fake credentials and ``AWS_ENDPOINT_URL`` in the environment. A ``str`` (the endpoint URL) with
``.bucket``, ``.url(*names)`` -> ``s3://bucket/...``, ``.client()`` and ``.require_auth()`` (make the server check
credentials).

``FaultyHTTPServer(directory)`` (made by ``http_server(directory)``): serves a directory with Range support and
switchable faults (``stop``/``restart`` on the same port, ``drop_after(nbytes, times)``, ``fail(times, status)``).

``TCPProxy(port)`` (made by ``tcp_proxy(port)``): a TCP forwarder that can cut connections after N bytes (S3
mid-stream faults).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import socket
import sys
import threading
import uuid

__all__ = ["S3Endpoint", "MotoServer", "FaultyHTTPServer", "TCPProxy", "free_port", "write_tiny_shard"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- S3 (moto server mode) -------------------------------------------------------------------------------------------
class S3Endpoint(str):
    """The endpoint URL, carrying the test's bucket."""

    bucket: str

    def url(self, *names: str) -> str:
        return "/".join([f"s3://{self.bucket}", *names])

    def client(self, **credentials):
        import boto3

        return boto3.client("s3", endpoint_url=str(self), region_name="us-east-1", **credentials)

    @contextlib.contextmanager
    def require_auth(self):
        """Make moto check signatures; yields ``(access_key_id, secret)`` of an IAM user allowed ``s3:*``."""
        import boto3
        import requests

        iam = boto3.client("iam", endpoint_url=str(self), region_name="us-east-1")
        user = "u" + uuid.uuid4().hex[:8]
        iam.create_user(UserName=user)
        iam.put_user_policy(
            UserName=user,
            PolicyName="s3",
            PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}',
        )
        key = iam.create_access_key(UserName=user)["AccessKey"]
        requests.post(f"{self}/moto-api/reset-auth", data=b"0").raise_for_status()
        try:
            yield key["AccessKeyId"], key["SecretAccessKey"]
        finally:
            requests.post(f"{self}/moto-api/reset-auth", data=b"inf").raise_for_status()


class MotoServer:
    """moto's threaded server on a fixed loopback port; stop and start again keep the data (in-process backends)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log lines in test output

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            # moto's stop() leaves the socket listening: close it so clients are refused, and the port can be reused
            self._server._server.server_close()
            self._server = None


# --- HTTP with Range and faults --------------------------------------------------------------------------------------
class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Files only (no listings), single ``bytes=a-b`` ranges, ETag from mtime and size; faults from the server."""

    protocol_version = "HTTP/1.1"  # keep-alive, as real servers and requests' connection pool expect

    def log_message(self, *args) -> None:  # quiet test output
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        server: FaultyHTTPServer = self.server.owner
        with server._lock:
            server.requests += 1
            server.log.append((self.command, self.path, self.headers.get("Range")))
        status = server._take("fail_left", server.fail_status)
        if status:
            self.send_error(status)
            return
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        size = os.path.getsize(path)
        start, end, code = 0, size - 1, 200
        if "Range" in self.headers:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers["Range"].strip())
            if not m or int(m.group(1)) >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end, code = int(m.group(1)), min(int(m.group(2) or size - 1), size - 1), 206
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{os.stat(path).st_mtime_ns:x}-{size:x}"')
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        budget = server._take("drop_left", server.drop_bytes)
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left:
                chunk = f.read(min(left, 1 << 16, budget if budget is not None else left))
                self.wfile.write(chunk)
                left -= len(chunk)
                if budget is not None:
                    budget -= len(chunk)
                    if budget <= 0 and left:
                        # cut the connection mid-body, as a crashing server or a reset would
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner, *args, **kwargs):
        self.owner = owner
        super().__init__(*args, **kwargs)

    def handle_error(self, request, client_address) -> None:
        # clients that give up on a connection (the point of the fault tests) are not server errors
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def process_request(self, request, client_address):
        self.owner._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        self.owner._connections.discard(request)
        super().shutdown_request(request)


class FaultyHTTPServer:
    def __init__(self, directory: str, port: int | None = None):
        self.directory = os.fspath(directory)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests = 0
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header) per request
        self.fail_left = self.drop_left = 0
        self.fail_status, self.drop_bytes = 500, 0
        self._lock = threading.Lock()
        self._connections: set = set()
        self._httpd = self._thread = None
        self.start()

    def url_for(self, *names: str) -> str:
        return "/".join([self.url, *names])

    def fail(self, times: int, status: int = 500) -> None:
        """Answer the next ``times`` requests with ``status``."""
        self.fail_left, self.fail_status = times, status

    def drop_after(self, nbytes: int, times: int = 1) -> None:
        """Cut the connection after ``nbytes`` of the body on the next ``times`` GET requests."""
        self.drop_left, self.drop_bytes = times, nbytes

    def _take(self, counter: str, value):
        with self._lock:
            if getattr(self, counter) > 0:
                setattr(self, counter, getattr(self, counter) - 1)
                return value
        return None

    def start(self) -> None:
        handler = functools.partial(_RangeHandler, directory=self.directory)
        self._httpd = _Server(self, ("127.0.0.1", self.port), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and cut every open connection (clients see resets / refused connections)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join()
        self._httpd = None

    def restart(self) -> None:
        self.stop()
        self.start()


# --- TCP proxy that cuts connections ---------------------------------------------------------------------------------
class TCPProxy:
    """Forwards 127.0.0.1:port to a target port; ``cut_after(nbytes, times)`` closes the next ``times`` connections
    after ``nbytes`` bytes from the target (counting response headers)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cut_left, self.cut_bytes, self.connections = 0, 0, 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, nbytes: int, times: int = 1) -> None:
        self.cut_left, self.cut_bytes = times, nbytes

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self.connections += 1
                budget = None
                if self.cut_left > 0:
                    self.cut_left -= 1
                    budget = self.cut_bytes
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, budget), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, budget: int | None) -> None:
        try:
            while True:
                data = src.recv(1 << 16 if budget is None else max(1, min(1 << 16, budget)))
                if not data:
                    break
                dst.sendall(data)
                if budget is not None:
                    budget -= len(data)
                    if budget <= 0:
                        break
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


# --- a tiny valid shard ----------------------------------------------------------------------------------------------
def write_tiny_shard(path, n: int = 3, *, prefix: str = "img", size: int = 16) -> list[tuple[str, bytes, bytes]]:
    """Write ``n`` samples (a PIL JPEG and ``schema.encode_meta`` JSON each) as a shard tar; returns
    ``(key, jpg, json)`` per sample, in order."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from shards import schema

    samples = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            key = f"{prefix}{i:04d}"
            rgb = np.full((size, size, 3), (i * 40) % 256, np.uint8)
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
            boxes = np.array([[0, 0, size // 2, size // 2], [1, 2, size, size]])
            meta = schema.encode_meta(
                key=key,
                path=f"{key}.jpg",
                width=size,
                height=size,
                boxes=boxes,
                image_id=i,
                image_sha256=schema.image_sha256(buf.getvalue()),
            )
            for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
            samples.append((key, buf.getvalue(), meta))
    return samples
