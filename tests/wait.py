"""A bounded wait on a condition, for tests that watch another thread or process: fast when the condition comes
early, a clear failure naming what never happened when it does not, instead of a fixed sleep that is either too
short on a loaded machine or wasted time on an idle one."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout: float, what: str, *, interval: float = 0.01) -> T:
    """The first truthy value of ``cond()``, checked every ``interval`` seconds. ``AssertionError`` naming ``what``
    once ``timeout`` seconds have passed; ``cond`` may raise to end the wait early (the process it watches died)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(interval)
