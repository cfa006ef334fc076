import pytest

# The shared helpers' asserts (tests/support/) report their operands as the tests' own do.
pytest.register_assert_rewrite("tests.support")
