"""Plain helpers of the test suite (functions, constants, the scripts the distributed tests launch).

Import them as `from tests.utils.<module> import ...`; pytest fixtures live in tests/conftest.py.
"""
