"""What the job was doing when it failed: a timed-out collective is reported with the phase it hung in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from train.config import TrainingError


def is_timeout(error: BaseException) -> bool:
    """A collective's deadline passed: gloo says "Timed out ..." (a plain RuntimeError), NCCL and the
    shared-memory transport "... timed out ..." / "timeout"; there is no exception type to tell by."""
    text = str(error).lower()
    return (
        isinstance(error, RuntimeError)
        and not isinstance(error, TrainingError)
        and ("timed out" in text or "timeout" in text)
    )


@contextmanager
def phase(what: str, timeout_s: float) -> Iterator[None]:
    """Run a phase of the job (`what`: "start-up", "training step 12", ...); a collective timing out
    inside it becomes a TrainingError that names the timeout and the phase."""
    try:
        yield
    except RuntimeError as e:
        if not is_timeout(e):
            raise
        first_line = str(e).strip().splitlines()[0][:200]
        raise TrainingError(
            f"a collective timed out after {timeout_s:g} s (parallel.timeout_s) during {what}: "
            f"a peer is hung or gone ({first_line})"
        ) from e
