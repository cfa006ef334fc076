"""What the hypothesis fuzz tests share: their settings and their JSON values."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = 300 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 60
#: Sized to run in seconds; HYPOTHESIS_PROFILE=long runs more.
FUZZ = settings(
    max_examples=EXAMPLES,
    # CI runs the same examples every time (a red CI must mean a change broke something);
    # local runs explore new ones, and hypothesis keeps any failure it finds to replay.
    derandomize=bool(os.environ.get("CI")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def json_values(
    *,
    finite: bool = False,
    int64: bool = False,
    text: int = 40,
    items: int = 5,
    key: int = 12,
    entries: int = 6,
    leaves: int = 30,
) -> st.SearchStrategy[Any]:
    """Any JSON value: numbers (only finite floats with ``finite``, only 64-bit integers with
    ``int64``), strings of at most ``text`` characters, lists of at most ``items``, objects of
    at most ``entries`` keys of at most ``key`` characters; ``leaves`` scalars at the most."""
    integers = st.integers(-(2**63), 2**63 - 1) if int64 else st.integers()
    floats = st.floats(allow_nan=not finite, allow_infinity=not finite)
    return st.recursive(
        st.none() | st.booleans() | integers | floats | st.text(max_size=text),
        lambda children: (
            st.lists(children, max_size=items)
            | st.dictionaries(st.text(max_size=key), children, max_size=entries)
        ),
        max_leaves=leaves,
    )
