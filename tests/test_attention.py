"""The fusion attention runs through transformers' attention interface: eager, sdpa and flex give the same outputs and
gradients, the attention bias (key padding and each knowledge item's log-gate) reaches every implementation, flash
attention is refused with its reason, and output_attentions / output_hidden_states / return_dict behave as in
transformers' own models."""

import copy
import json
import re

import pytest
import torch

from modeling_vkood import (
    VKOODForImagesAndTextClassification,
    VKOODForImageTextRetrieval,
    VKOODForQuestionAnswering,
    VKOODModel,
)
from modeling_vkood import modeling_vkood as modeling
from modeling_vkood.fusion_vkood import VKOODAttention
from modeling_vkood.outputs_vkood import FUSION_ATTENTIONS, FUSION_OUTPUTS
from tests.utils.tiny import tiny_batch, tiny_vkood_config

try:
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:  # torch without FlexAttention
    flex_attention = None

TEXT_LENGTH, ITEMS, IMAGE_TOKENS = 7, 4, 17  # tiny_batch's question length and items; 32 px / patch 8 + CLS
HEADS = {
    "vqa": (VKOODForQuestionAnswering, dict(num_labels=5)),
    "nlvr2": (VKOODForImagesAndTextClassification, dict(num_labels=2)),
    "retrieval": (VKOODForImageTextRetrieval, {}),
}


def deterministic_config(**overrides):
    """The tiny config with every dropout at 0, backbones included, so that implementations compare in train mode."""
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    config = tiny_vkood_config(**no_dropout, **overrides)
    config.text_config.hidden_dropout_prob = config.text_config.attention_probs_dropout_prob = 0.0
    return config


def padded_batch(task="vqa"):
    """tiny_batch with padded question tokens (example 1 ends in two pads) besides its padded knowledge items."""
    batch = tiny_batch(pairs=task == "nlvr2")
    batch["attention_mask"][1, 5:] = 0
    if task == "vqa":
        batch["labels"] = torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    return batch


def inputs(batch):
    return {key: value for key, value in batch.items() if key != "labels"}


def gate_half_the_items(model, batch):
    """Put tau at the median score of the real items: soft gates between 0 and 1 (hard ones: half the items out)."""
    with torch.no_grad():
        scores = model.vkood(**inputs(batch)).ood_scores
        model.vkood.ood.threshold.fill_(scores[batch["knowledge_mask"].bool()].median())


def assert_identical(actual, expected):
    """Equal tensors, or tuples of them (nested), in the same structure."""
    assert type(actual) is type(expected)
    if isinstance(expected, tuple):
        assert len(actual) == len(expected)
        for part, expected_part in zip(actual, expected):
            assert_identical(part, expected_part)
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eager_and_sdpa_give_the_same_logits_loss_and_gradients(training):
    torch.manual_seed(0)
    model = VKOODForQuestionAnswering(deterministic_config(num_labels=5)).train(training)
    batch = padded_batch()
    gate_half_the_items(model, batch)
    results = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        model.zero_grad()
        output = model(**batch)
        output.loss.backward()
        ood = model.vkood.ood
        query = model.vkood.fusion_layers[0].image_block.cross_attention.query
        results[implementation] = (output.logits, output.loss, ood.threshold.grad.clone(), query.weight.grad.clone())
    gates = output.ood_gate[batch["knowledge_mask"].bool()]
    assert ((gates > 0.05) & (gates < 0.95)).any(), gates  # the log-gate bias is soft: not a plain mask
    for eager, sdpa in zip(results["eager"], results["sdpa"]):
        torch.testing.assert_close(sdpa, eager, rtol=1e-4, atol=1e-5)
    assert results["sdpa"][2].abs().item() > 0  # the task loss reaches tau


IMPLEMENTATIONS_WITH_GRADIENTS = [
    pytest.param("sdpa", "cpu", id="sdpa"),
    pytest.param(
        "flex_attention",
        "cuda",
        id="flex_attention",
        marks=pytest.mark.skipif(
            flex_attention is None or not torch.cuda.is_available(),
            reason="needs torch's FlexAttention on CUDA: it has no CPU backward (torch raises NotImplementedError)",
        ),
    ),
]


@pytest.mark.parametrize("implementation, device", IMPLEMENTATIONS_WITH_GRADIENTS)
def test_the_attention_bias_gets_the_same_gradient_as_in_eager(implementation, device):
    """A log-gate-like bias with padded keys (-inf-like) in cross-attention (9 queries, 6 keys)."""
    torch.manual_seed(0)
    attention = VKOODAttention(deterministic_config()).to(device)
    queries, keys = torch.randn(2, 9, 32, device=device), torch.randn(2, 6, 32, device=device)
    bias = torch.nn.functional.logsigmoid(torch.randn(2, 1, 1, 6, device=device))
    bias[1, ..., 4:] = torch.finfo(bias.dtype).min
    bias.requires_grad_(True)
    results = {}
    for name in ("eager", implementation):
        bias.grad = None
        attended, _ = attention(queries, keys, bias, name)
        (attended * torch.linspace(-1, 1, 32, device=device)).sum().backward()
        results[name] = (attended, bias.grad.clone())
    torch.testing.assert_close(results[implementation][0], results["eager"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[implementation][1], results["eager"][1], rtol=1e-4, atol=1e-5)
    assert results["eager"][1][:, ..., :4].abs().min() > 0 and (results["eager"][1][1, ..., 4:] == 0).all()


@pytest.mark.skipif(flex_attention is None, reason="this torch has no FlexAttention")
def test_flex_attention_gets_the_bias_and_gives_the_eager_logits(monkeypatch):
    """transformers' flex_attention wiring (score_mod reading the bias per query and key) against eager. The CPU run
    goes through FlexAttention's uncompiled reference kernel: its compiled CPU kernel aborted the process in this
    torch build (2.13), and it has no CPU backward; on CUDA the compiled kernel runs as shipped."""
    import transformers.integrations.flex_attention as flex_integration

    if not torch.cuda.is_available():
        monkeypatch.setattr(
            flex_integration,
            "compile_friendly_flex_attention",
            lambda query, key, value, training=False, **kwargs: flex_attention(query, key, value, **kwargs),
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = deterministic_config(num_labels=5)
    config._attn_implementation = {"": "flex_attention", "vision_config": "sdpa", "text_config": "sdpa"}
    model = VKOODForQuestionAnswering(config).to(device).eval()
    assert model.config._attn_implementation == "flex_attention"
    assert model.vkood.vision_model.config._attn_implementation == "sdpa"
    batch = {key: value.to(device) for key, value in inputs(padded_batch()).items()}
    gate_half_the_items(model, batch)
    with torch.no_grad():
        flex = model(**batch).logits
        model.set_attn_implementation({"": "eager"})
        eager = model(**batch).logits
    torch.testing.assert_close(flex, eager, rtol=1e-4, atol=1e-5)


def test_output_attentions_are_probabilities_without_padded_or_hard_gated_keys():
    torch.manual_seed(0)
    config = deterministic_config(num_labels=5, ood_config=dict(hard_gate=True), num_fusion_layers=3)
    config._attn_implementation = "eager"
    model = VKOODForQuestionAnswering(config).eval()
    batch = padded_batch()
    gate_half_the_items(model, batch)
    with torch.no_grad():
        output = model(**inputs(batch), output_attentions=True)
    real_items = batch["knowledge_mask"].bool()
    assert (output.ood_gate[real_items] == 0).any() and (output.ood_gate[real_items] == 1).any()
    text_keys, heads = TEXT_LENGTH + ITEMS, 2
    shapes = {
        "text_self_attentions": (3, heads, text_keys, text_keys),
        "text_cross_attentions": (3, heads, text_keys, IMAGE_TOKENS),
        "image_self_attentions": (3, heads, IMAGE_TOKENS, IMAGE_TOKENS),
        "image_cross_attentions": (3, heads, IMAGE_TOKENS, text_keys),
    }
    # Padded question tokens, padded item slots and hard-gated-out items: no weight for them as keys.
    removed = torch.cat([batch["attention_mask"] == 0, output.ood_gate == 0], dim=1)[:, None, None, :]
    for name, shape in shapes.items():
        layers = getattr(output, name)
        assert len(layers) == 3 and all(weights.shape == shape for weights in layers), name
        for weights in layers:
            torch.testing.assert_close(weights.sum(-1), torch.ones(shape[:-1]))
            if shape[-1] == text_keys:
                assert (weights.masked_select(removed.expand(shape)) == 0).all(), name
                assert (weights.masked_select(~removed.expand(shape)) > 0).all(), name
    assert output.text_hidden_states is None and output.image_hidden_states is None


def test_output_hidden_states_hold_the_fusion_input_and_every_layer():
    torch.manual_seed(0)
    config = deterministic_config(num_fusion_layers=3)
    model = VKOODModel(config).eval()
    batch = inputs(padded_batch())
    with torch.no_grad():
        plain = model(**batch)
        output = model(**batch, output_hidden_states=True)
        config.output_hidden_states = True  # the config's value is the default
        from_config = model(**batch)
    assert all(getattr(plain, name) is None for name in FUSION_OUTPUTS)
    streams = (("text", "last_hidden_state", TEXT_LENGTH + ITEMS), ("image", "image_last_hidden_state", IMAGE_TOKENS))
    for stream, last, length in streams:
        states = getattr(output, f"{stream}_hidden_states")
        assert len(states) == config.num_fusion_layers + 1
        assert all(state.shape == (3, length, 32) for state in states)
        torch.testing.assert_close(states[-1], getattr(output, last), rtol=0, atol=0)
        assert not torch.allclose(states[0], states[1])
        assert_identical(getattr(from_config, f"{stream}_hidden_states"), states)
    torch.testing.assert_close(output.pooler_output, plain.pooler_output, rtol=0, atol=0)
    assert output.hidden_states is output.text_hidden_states  # transformers' standard field: the text stream's
    with torch.no_grad():
        selected = model(**batch, output_hidden_states=[0, -1])  # indices keep those states only, as in transformers
    assert [state is None for state in selected.image_hidden_states] == [False, True, True, False]
    assert_identical(selected.hidden_states[-1], output.hidden_states[-1])


@pytest.mark.parametrize(
    "task, return_loss", [("vqa", None), ("nlvr2", None), ("retrieval", False), ("retrieval", True)]
)
def test_return_dict_false_gives_the_outputs_tuple_and_heads_keep_their_pairs(task, return_loss):
    model_class, kwargs = HEADS[task]
    torch.manual_seed(0)
    config = deterministic_config(**kwargs)
    config._attn_implementation = "eager"
    model = model_class(config).eval()
    batch = padded_batch(task)
    if task == "nlvr2":
        batch["labels"] = torch.tensor([0, 1, 1])
    if return_loss is not None:
        batch["return_loss"] = return_loss
    requested = dict(output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        torch.manual_seed(1)  # the retrieval loss draws its hard negatives
        output = model(**batch, **requested)
        torch.manual_seed(1)
        as_tuple = model(**batch, **requested, return_dict=False)
        config.return_dict = False  # the config's value is the default
        torch.manual_seed(1)
        from_config = model(**batch, **requested)
    assert isinstance(as_tuple, tuple)
    assert_identical(as_tuple, output.to_tuple())
    assert_identical(from_config, output.to_tuple())
    pairs = (3, 2) if task == "nlvr2" else (3,)  # NLVR2: one fused pass per image; retrieval: the given pairs only
    assert output.text_self_attentions[0].shape == (*pairs, 2, TEXT_LENGTH + ITEMS, TEXT_LENGTH + ITEMS)
    assert output.image_cross_attentions[-1].shape == (*pairs, 2, IMAGE_TOKENS, TEXT_LENGTH + ITEMS)
    assert output.image_hidden_states[0].shape == (*pairs, IMAGE_TOKENS, 32)
    assert len(output.text_hidden_states) == config.num_fusion_layers + 1


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "retrieval", "base"])
def test_unknown_keyword_arguments_raise_type_error(task):
    model = VKOODModel(tiny_vkood_config()) if task == "base" else HEADS[task][0](tiny_vkood_config(**HEADS[task][1]))
    batch = inputs(padded_batch(task))
    with pytest.raises(TypeError, match="output_attention"):
        model(**batch, output_attention=True)  # a typo of output_attentions is not swallowed


def test_output_attentions_under_sdpa_warns_and_computes_that_call_in_eager(caplog):
    """sdpa computes no attention probabilities: asked for them, the model warns (naming the fix) and runs that call's
    fusion attention in eager, so the attentions come back, the eager model's, and the next call is sdpa again."""
    torch.manual_seed(0)
    model = VKOODForQuestionAnswering(deterministic_config(num_labels=5)).eval()
    assert model.config._attn_implementation == "sdpa"  # the default
    batch = inputs(padded_batch())
    modeling.logger.warning_once.cache_clear()
    with torch.no_grad(), caplog.at_level("WARNING"):
        output = model(**batch, output_attentions=True)
    assert re.search(r"runs the fusion attention in eager.*set_attn_implementation", caplog.text)
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(**batch, output_attentions=True)
    for name in FUSION_ATTENTIONS + ("attentions", "cross_attentions"):  # the backbones are eager too now
        torch.testing.assert_close(getattr(output, name), getattr(eager, name), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(output.logits, eager.logits, rtol=1e-4, atol=1e-5)


def test_flash_attention_is_refused_with_the_reason_and_the_alternatives(tmp_path):
    """Flash kernels take no additive float bias, which the soft knowledge gate and the key-only padding mask of the
    image stream's cross-attention need: refused for the fusion, whether the kernels are installed or not."""
    message = r"flash attention 2: it adds a float bias.*\"sdpa\".*\"vision_config\": \"flash_attention_2\""
    with pytest.raises(ValueError, match=message):
        VKOODForQuestionAnswering(tiny_vkood_config(num_labels=5, attn_implementation="flash_attention_2"))
    VKOODForQuestionAnswering(tiny_vkood_config(num_labels=5)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        VKOODForQuestionAnswering.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


def test_attn_implementation_is_honoured_by_from_pretrained_for_the_fusion_and_each_backbone(tmp_path):
    torch.manual_seed(0)
    model = VKOODForQuestionAnswering(tiny_vkood_config(num_labels=5, attn_implementation="eager")).eval()
    assert model.vkood.vision_model.config._attn_implementation == "eager"
    batch = inputs(padded_batch())
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    # As in transformers, the implementation is a choice of the run, not saved: a reload gets the default.
    assert "attn_implementation" not in (tmp_path / "config.json").read_text()
    assert "_attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
    per_part = {"": "eager", "vision_config": "sdpa", "text_config": "eager"}  # the fusion, then each backbone
    cases = [
        ({"attn_implementation": "eager"}, ("eager", "eager", "eager")),
        ({}, ("sdpa", "sdpa", "sdpa")),
        ({"attn_implementation": per_part}, ("eager", "sdpa", "eager")),
    ]
    for kwargs, expected_implementations in cases:
        reloaded = VKOODForQuestionAnswering.from_pretrained(tmp_path, **kwargs).eval()
        base = reloaded.vkood
        found = (
            base.config._attn_implementation,
            base.vision_model.config._attn_implementation,
            base.text_model.config._attn_implementation,
        )
        assert found == expected_implementations, (kwargs, found)
        with torch.no_grad():
            logits = reloaded(**batch).logits
        exact = found == ("eager", "eager", "eager")
        torch.testing.assert_close(logits, expected, rtol=0 if exact else 1e-4, atol=0 if exact else 1e-5)


def test_copies_of_the_fusion_layers_follow_set_attn_implementation():
    """PEFT's `modules_to_save` runs deep copies of the fusion layers: they take the model's implementation at every
    call, so switching it reaches them (eager's attention probabilities come back from every layer)."""
    torch.manual_seed(0)
    model = VKOODForQuestionAnswering(deterministic_config(num_labels=5)).eval()
    model.vkood.fusion_layers[0] = copy.deepcopy(model.vkood.fusion_layers[0])
    batch = inputs(padded_batch())
    with torch.no_grad():
        sdpa = model(**batch).logits
        model.set_attn_implementation("eager")
        eager = model(**batch, output_attentions=True)
    assert all(isinstance(weights, torch.Tensor) for name in FUSION_ATTENTIONS for weights in getattr(eager, name))
    torch.testing.assert_close(eager.logits, sdpa, rtol=1e-4, atol=1e-5)
