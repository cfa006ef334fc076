"""What the structured-log tests share: the shape of a line's ``ts``, and a tenant whose API
key and read-token secret must never appear in any line a broker writes."""

from __future__ import annotations

import re

#: The tenant ``tenant-a``: its API key, and the secret its read tokens are signed with.
KEY = "key-of-tenant-a-for-the-log-test"
SECRET = "secret-that-signs-read-tokens-in-the-log-test"
AUTH = {"BROKER_API_KEYS": f"{KEY}:tenant-a", "BROKER_READ_TOKEN_SECRETS": SECRET}
#: The ``ts`` of every line: UTC, to the millisecond.
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
