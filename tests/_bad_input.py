"""Harness for the table-driven bad-input tests (``tests/test_bad_input_*.py``).

Each row is a :class:`BadInput`: a ``sgcl`` command line (run in-process through
:func:`sgcl.cli.main`, so no interpreter start-up per row), the exit code it must end with and a
regular expression its output (stdout + stderr) must contain. Placeholders in ``argv`` such as
``{tmp}`` or ``{slide}`` are filled from keyword arguments of :func:`run_case`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest


@dataclass(frozen=True)
class BadInput:
    """One deliberate fault: the command, the exit code and the message that must name it."""

    id: str
    argv: tuple[str, ...]
    code: int
    message: str  # a regular expression searched (case-insensitively) in stdout + stderr
    absent: tuple[str, ...] = field(default=())  # regexes that must NOT appear (e.g. "Traceback")

    def param(self):
        return pytest.param(self, id=self.id)


def run_case(case: BadInput, capfd: pytest.CaptureFixture[str], **paths: object) -> str:
    """Run ``case`` in-process; assert its exit code and message; return the captured output."""
    from sgcl.cli import main

    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in case.argv]
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors exit 2 through SystemExit
        code = exc.code if isinstance(exc.code, int) else 1
    out = "".join(capfd.readouterr())
    assert code == case.code, f"{case.id}: exit {code}, expected {case.code}; output:\n{out[-3000:]}"
    assert re.search(case.message, out, re.IGNORECASE), (
        f"{case.id}: output does not match {case.message!r}:\n{out[-3000:]}"
    )
    for pattern in ("Traceback",) + case.absent:
        assert not re.search(pattern, out), f"{case.id}: output matches {pattern!r}:\n{out[-3000:]}"
    return out
