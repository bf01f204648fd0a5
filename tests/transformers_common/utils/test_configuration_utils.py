"""Stand-in for transformers' tests/utils/test_configuration_utils.py, which the 5.25.0 sdist does not ship: the one
name `test_configuration_common` imports from it, the config kwargs it checks (only for configs without
sub-configs, so never for VK-OOD's)."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
