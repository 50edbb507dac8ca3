"""Progress artifacts for long steps, fed by the tqdm bars the stages already draw.

Stages stay free of Prefect: they report progress with tqdm. Inside `tqdm_progress(stage)` every
tqdm bar updated in this context (this task's thread) also moves a Prefect progress artifact,
at most once per `interval` seconds.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext

_reporter: contextvars.ContextVar[_Reporter | None] = contextvars.ContextVar(
    "t2i_progress", default=None
)
_patched = False
log = logging.getLogger(__name__)


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


class _Reporter:
    def __init__(self, stage: str, interval: float) -> None:
        self.stage = stage
        self.interval = interval
        self.artifact_id = None
        self.last = 0.0

    def report(self, bar: Any, final: bool = False) -> None:
        total = getattr(bar, "total", None)
        if not total or getattr(bar, "disable", False):
            return
        now = time.monotonic()
        if now - self.last < self.interval and not final and bar.n < total:
            return
        self.last = now
        percent = min(100.0, 100.0 * bar.n / total)
        description = f"{self.stage}: {bar.desc or 'working'} {bar.n}/{total}"
        try:
            if self.artifact_id is None:
                key = artifact_key(f"{self.stage}-progress")
                self.artifact_id = create_progress_artifact(
                    percent, key=key, description=description
                )
            else:
                update_progress_artifact(self.artifact_id, percent, description=description)
        except Exception as error:  # progress is a courtesy; never fail the stage for it
            log.debug("progress artifact not updated: %s", error)


def _patch_tqdm() -> None:
    global _patched
    if _patched:
        return
    import tqdm.std

    original_update, original_close = tqdm.std.tqdm.update, tqdm.std.tqdm.close

    def update(self, n=1):
        result = original_update(self, n)
        reporter = _reporter.get()
        if reporter is not None:
            reporter.report(self)
        return result

    def close(self):  # bars driven by iteration report their last count only here
        reporter = _reporter.get()
        if reporter is not None and not getattr(self, "disable", True):
            reporter.report(self, final=True)
        return original_close(self)

    tqdm.std.tqdm.update, tqdm.std.tqdm.close = update, close
    _patched = True


@contextmanager
def tqdm_progress(stage: str, interval: float = 2.0) -> Iterator[None]:
    """Mirror tqdm bars into a progress artifact while inside a Prefect task run."""
    if TaskRunContext.get() is None:
        yield
        return
    _patch_tqdm()
    token = _reporter.set(_Reporter(stage, interval))
    try:
        yield
    finally:
        _reporter.reset(token)
