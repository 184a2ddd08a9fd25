"""``pipe:command``: the standard output of a shell command as a stream, refused unless enabled (``config``)."""

from __future__ import annotations

import io
import subprocess
from typing import Any

from shards.storage.config import ALLOW_PIPE_ENV, pipe_allowed
from shards.storage.streams import STREAM_BUFFER


def open_pipe(url: str, allow_pipe: bool | None) -> io.BufferedReader:
    if not pipe_allowed(allow_pipe):
        raise PermissionError(
            f"{url!r}: pipe: URLs run a shell command and are disabled; enable them explicitly "
            f"(--allow-pipe, storage.configure(allow_pipe=True) or {ALLOW_PIPE_ENV}=1)"
        )
    cmd = url[len("pipe:") :]
    proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE)
    return io.BufferedReader(PipeStream(url, proc), STREAM_BUFFER)


class PipeStream(io.RawIOBase):
    """stdout of a shell command; a non-zero exit status at end of stream is an error."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes]):
        assert isinstance(proc.stdout, io.BufferedReader), "started with stdout=PIPE and the default buffering"
        self.url, self._proc, self._stdout = url, proc, proc.stdout

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = self._stdout.readinto(buf)
        if n == 0 and self._proc.wait() != 0:
            raise OSError(f"{self.url!r}: command exited with status {self._proc.returncode}")
        return n

    def close(self) -> None:
        if self._proc.poll() is None:  # closed before the end: stop the command instead of leaving it blocked
            self._proc.terminate()
        self._stdout.close()
        self._proc.wait()
        super().close()
