"""torch.export and ONNX: the VQA and NLVR2 heads export on the fixed-shape path with a dynamic batch size (a fixed
EM budget, `convergence_check_every=0`, or the default check, which is skipped while tracing), and the exported
program, and onnxruntime running the ONNX export, give eager PyTorch's outputs at other batch sizes."""

import pytest
import torch
from torch.export import Dim

from modeling_vkood import VKOODForImagesAndTextClassification, VKOODForQuestionAnswering
from tests.utils.tiny import tiny_batch, tiny_vkood_config

HEADS = {
    # a fixed EM budget; and the default convergence check (every 5 steps), reached within max_iter
    "vqa": (VKOODForQuestionAnswering, {"num_labels": 3, "ood_config": {"convergence_check_every": 0, "max_iter": 3}}),
    "nlvr2": (VKOODForImagesAndTextClassification, {"num_labels": 2, "ood_config": {"max_iter": 6}}),
}


def exportable(head):
    """The model in eval mode on the fixed-shape path, a batch of 3 to trace with and its dynamic shapes."""
    model_class, fields = HEADS[head]
    torch.manual_seed(0)
    model = model_class(tiny_vkood_config(**fields)).eval()
    model.vkood.force_fixed_shapes = True
    batch = tiny_batch(batch_size=3, pairs=head == "nlvr2")
    batch_size = Dim("batch", min=1, max=64)
    return model, batch, {name: {0: batch_size} for name in batch}


def other_batches(head):
    return [tiny_batch(batch_size=size, seed=size, pairs=head == "nlvr2") for size in (2, 5)]


@pytest.mark.slow
@pytest.mark.parametrize("head", sorted(HEADS))
def test_exported_program_with_a_dynamic_batch_gives_eager_outputs(head):
    model, batch, dynamic_shapes = exportable(head)
    with torch.no_grad():  # the inference graph (with gradients on, the OOD layer adds its differentiable EM step)
        program = torch.export.export(model, (), batch, dynamic_shapes=dynamic_shapes)
        for inputs in other_batches(head):
            expected, exported = model(**inputs), program.module()(**inputs)
            assert list(exported.keys()) == list(expected.keys())
            for name, value in expected.items():
                torch.testing.assert_close(exported[name], value, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("head", sorted(HEADS))
def test_onnx_export_runs_in_onnxruntime_with_pytorch_outputs(head, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, batch, dynamic_shapes = exportable(head)
    with torch.no_grad():
        onnx_program = torch.onnx.export(model, (), kwargs=batch, dynamic_shapes=dynamic_shapes, dynamo=True)
    onnx_program.save(tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(tmp_path / "model.onnx")
    assert [node.name for node in session.get_inputs()] == list(batch)
    for inputs in other_batches(head):
        with torch.no_grad():
            expected = model(**inputs).to_tuple()  # logits, pooler_output and the OOD fields, as the graph's outputs
        outputs = session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})
        assert len(outputs) == len(expected)
        for value, output in zip(expected, outputs):
            torch.testing.assert_close(torch.from_numpy(output), value, rtol=1e-4, atol=1e-4)  # ONNX kernels
