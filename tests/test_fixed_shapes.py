"""The fixed-shape path of VKOODModel (what accelerators and torch.compile run): no host synchronisation in a
forward, the same outputs as the CPU path that encodes each distinct text once, and non-finite pixels still caught."""

import pytest
import torch

from benchmarks.dispatch_counts import HostSyncCounter
from modeling_vkood import VKOODForImagesAndTextClassification, VKOODForQuestionAnswering, VKOODModel
from modeling_vkood.training.ood_objectives import calibrate_threshold
from tests.utils.tiny import tiny_batch, tiny_vkood_config


def test_the_counter_sees_reads_and_data_dependent_shapes_but_not_fixed_shape_work():
    values, mask = torch.randn(6), torch.tensor([True, False] * 3)
    with HostSyncCounter() as syncs:
        values.sum().item()
        bool(values[0] > 0)
        values[mask]
        values.nonzero()
        torch.unique(values)
        torch.tensor([1.0, 2.0])
        values.repeat_interleave(torch.tensor([1, 2, 0, 1, 1, 1]))
    names = [name for name, _ in syncs.events]
    assert names.count("_local_scalar_dense") == 2 and "index" in names and "nonzero" in names
    assert any(name.startswith("_unique") for name in names) and "lift_fresh" in names and "repeat_interleave" in names
    assert all("test_fixed_shapes.py" in where for _, where in syncs.events)  # the line that asked, not torch's
    with HostSyncCounter() as syncs:
        values.masked_fill(mask, 0.0)
        torch.where(mask, values, 0.0).softmax(0)
        values.repeat_interleave(2)
        torch.zeros(3)
        torch._assert_async(torch.isfinite(values).all(), "finite")  # a device-side check on CUDA, no read
    assert syncs.events == []


def _model(model_class=VKOODModel, **overrides):
    torch.manual_seed(0)
    config = tiny_vkood_config(
        ood_config=dict(convergence_check_every=overrides.pop("convergence_check_every", 0)), **overrides
    )
    return model_class(config).eval()


def _knowledge_batch(pairs=False):
    batch = tiny_batch(pairs=pairs)  # items [0, 0] and [1, 0] equal, the last example without any item
    batch["knowledge_attention_mask"][0, -1] = 0  # a padded slot as the processor writes it: no real token
    batch["attention_mask"][1, -2:] = 0  # a padded question
    return batch


@pytest.mark.parametrize("model_class", [VKOODModel, VKOODForQuestionAnswering, VKOODForImagesAndTextClassification])
def test_forward_with_knowledge_makes_no_host_synchronisation_on_the_fixed_shape_path(model_class):
    extra = {"num_labels": 2} if model_class is not VKOODModel else {}
    model = _model(model_class, **extra)
    base = getattr(model, "vkood", model)
    batch = _knowledge_batch(pairs=model_class is VKOODForImagesAndTextClassification)
    with torch.no_grad(), HostSyncCounter() as syncs:
        model(**batch)
    assert syncs.events != []  # the CPU default: distinct texts by torch.unique, the pixel check, ...
    base.force_fixed_shapes = True
    with torch.no_grad(), HostSyncCounter() as syncs:
        model(**batch)
    assert syncs.events == []


def test_fixed_shape_path_gives_the_outputs_of_the_distinct_text_path():
    model = _model(convergence_check_every=5)
    batch = _knowledge_batch()
    outputs = {}
    for forced in (False, True):
        model.force_fixed_shapes = forced
        with torch.no_grad():
            outputs[forced] = (
                model(**batch),
                model.encode_text(batch["input_ids"], batch["attention_mask"]),
                model.encode_knowledge(
                    batch["knowledge_input_ids"], batch["knowledge_attention_mask"], batch["knowledge_mask"]
                ),
            )
    (distinct, text, knowledge), (dense, dense_text, dense_knowledge) = outputs[False], outputs[True]
    torch.testing.assert_close(dense_text, text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense_knowledge, knowledge, rtol=1e-5, atol=1e-6)
    for name in (
        "last_hidden_state",
        "image_last_hidden_state",
        "pooler_output",
        "ood_scores",
        "ood_gate",
        "ood_residual",
    ):
        torch.testing.assert_close(getattr(dense, name), getattr(distinct, name), rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(dense.ood_iterations, distinct.ood_iterations) and dense.ood_iterations.shape == (3,)


def test_fixed_shape_training_step_gives_the_gradients_of_the_distinct_text_path():
    batch = _knowledge_batch()
    batch["labels"] = torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    gradients = []
    for forced in (False, True):
        model = _model(VKOODForQuestionAnswering, num_labels=5)  # eval mode: no dropout, gradients all the same
        model.vkood.force_fixed_shapes = forced
        model(**batch).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_non_finite_pixels_raise_on_the_fixed_shape_path_too():
    model = _model()
    model.force_fixed_shapes = True
    batch = _knowledge_batch()
    batch["pixel_values"][1, 0, 3, 4] = float("nan")
    with pytest.raises(RuntimeError, match="pixel_values contains NaN or Inf"):  # torch._assert_async on the CPU
        model(**batch)


def test_calibration_flag_is_read_once_and_stays_right_through_from_pretrained(tmp_path):
    model = VKOODModel(tiny_vkood_config())
    assert model.ood.needs_calibration
    model.save_pretrained(tmp_path / "fresh")
    calibrate_threshold(model.ood, torch.randn(10), 0.5)
    assert not model.ood.needs_calibration
    model.save_pretrained(tmp_path / "calibrated")
    fresh = VKOODModel.from_pretrained(tmp_path / "fresh")
    assert fresh.ood.needs_calibration
    reloaded = VKOODModel.from_pretrained(tmp_path / "calibrated")
    assert not reloaded.ood.needs_calibration
    with HostSyncCounter() as syncs:
        assert not reloaded.ood.needs_calibration
    assert syncs.events == []
    reloaded.load_state_dict(fresh.state_dict())
    assert reloaded.ood.needs_calibration
