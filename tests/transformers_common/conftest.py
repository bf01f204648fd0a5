"""Nothing in this folder is a test module of its own: tests/test_transformers_common.py imports the mixins."""

collect_ignore_glob = ["*"]
