"""The test suite. A regular package, so that its helpers import as `tests.utils.*` from the repository root (see
[tool.pytest.ini_options] `pythonpath` in pyproject.toml) and no other installed `tests` package can shadow them."""
