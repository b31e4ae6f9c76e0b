"""Component versions and Greengrass version requirements (``>=0.1.0 <1.0.0``).

The agent's own version (``agent.__version__``) is the one source: the requirement that packaged
model components declare on the agent is derived from it (``compatible_requirement``), so the
agent that `scripts/build-component` builds by default always satisfies the models this version
packages. ``satisfies`` is what `deploy` checks before it prints or sends a deployment that
Greengrass would refuse in dependency resolution.
"""

from __future__ import annotations

import re
from typing import Tuple  # noqa: UP035 - runtime alias below must work on Python 3.8

Version = Tuple[int, int, int]  # noqa: UP006

_VERSION = re.compile(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:[-+].*)?$")
_COMPARATOR = re.compile(r"^(>=|<=|>|<|=)?\s*(.+)$")


def parse_version(text: str) -> Version:
    """major.minor.patch (missing parts are 0; a pre-release/build suffix is ignored)."""
    match = _VERSION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a version (major.minor.patch)")
    return (int(match[1]), int(match[2] or 0), int(match[3] or 0))


def compatible_requirement(version: str) -> str:
    """The agent versions a model packaged by agent ``version`` runs on: the same major line.

    0.x: from 0.<minor>.0 (a 0.x minor may add manifest fields older agents don't know), below 1.0.0.
    """
    major, minor, _ = parse_version(version)
    low = f"0.{minor}.0" if major == 0 else f"{major}.0.0"
    return f">={low} <{major + 1}.0.0"


def satisfies(version: str, requirement: str) -> bool:
    """Does version meet a Greengrass (npm semver) requirement?

    Handles what recipes use: space-separated comparators (``>=1.0.0 <2.0.0``), a bare or ``=``
    version, ``^x.y.z``, ``~x.y.z``, ``*``, and ``||`` alternatives. Raises ValueError for
    anything else, so a caller can say it could not check rather than guess.
    """
    have = parse_version(version)
    for alternative in requirement.split("||"):
        terms = alternative.split()
        if all(_term_holds(have, term) for term in _join_operators(terms)):
            return True
    return False


def _join_operators(terms: list[str]) -> list[str]:
    """``>= 1.0.0`` written with a space is one comparator."""
    out: list[str] = []
    for term in terms:
        if out and out[-1] in (">=", "<=", ">", "<", "="):
            out[-1] += term
        else:
            out.append(term)
    return out


def _term_holds(have: Version, term: str) -> bool:
    if term in ("*", "x", "X"):
        return True
    if term.startswith("^"):
        low = parse_version(term[1:])
        if low[0] > 0:
            high = (low[0] + 1, 0, 0)
        elif low[1] > 0:
            high = (0, low[1] + 1, 0)
        else:
            high = (0, 0, low[2] + 1)
        return low <= have < high
    if term.startswith("~"):
        low = parse_version(term[1:])
        return low <= have < (low[0], low[1] + 1, 0)
    match = _COMPARATOR.match(term)
    if not match:
        raise ValueError(f"{term!r} is not a version comparator")
    op, want = match[1] or "=", parse_version(match[2])
    return {">=": have >= want, "<=": have <= want, ">": have > want, "<": have < want, "=": have == want}[op]
