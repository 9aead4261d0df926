"""One exception type for every user-facing failure.

Stages and helpers raise :class:`PipelineError` with a single line that names the problem and what to
do; the CLI prints it as ``error: ...`` and exits non-zero, never with a traceback.
"""


class PipelineError(Exception):
    """A problem the user can fix (bad input, missing file, budget exceeded)."""

    exit_code = 2


class BudgetExceeded(PipelineError):
    """An artifact is outside its quality budget (used by evaluate and gate)."""

    exit_code = 1


def first_line(exc: BaseException, limit: int = 240) -> str:
    """The first line of a library's message for ``exc``, or its type where it has none (for the one
    line a PipelineError quotes it in)."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]
