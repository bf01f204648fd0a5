"""Stand-in for transformers' tests/generation/test_utils.py, which the 5.25.0 sdist does not ship: the
`test_modeling_common` module only checks whether a tester inherits this mixin (the generative head has its own
generation tests, tests/test_generation.py)."""


class GenerationTesterMixin:
    pass
