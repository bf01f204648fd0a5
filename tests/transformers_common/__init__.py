"""transformers' own common model and config tests, vendored from the transformers 5.25.0 source release (PyPI sdist
transformers-5.25.0.tar.gz) under its Apache-2.0 licence (LICENSE beside this file), and run against the VK-OOD heads
by tests/test_transformers_common.py.

test_modeling_common.py and test_configuration_common.py are verbatim copies (excluded from ruff). The sdist does not
ship the three modules they import from transformers' test tree, so exporters/, generation/ and utils/ hold stand-ins
with the names they import: no export or generation mixin tests run from here (the model's export and generation have
their own tests), and `config_common_kwargs` is the dict of transformers' tests/utils/test_configuration_utils.py.
Pinned: upgrading transformers means replacing these files with the new release's.
"""
