"""VK-OOD-BLIP through the VQA pipeline and as Hub remote code: answers by `generate` (greedy, beam top_k) and by
BLIP's rank inference over an answer list (shipped in the config or given), with `top_k` scores and
`return_knowledge=True`; batches of mixed image sizes, question lengths and item counts answer row for row as single
calls; a saved folder loads without the package (`trust_remote_code=True`: AutoModelForVisualQuestionAnswering,
AutoProcessor, pipeline) and gives the same outputs, and in that process (transformers' BLIP untouched by this
package) it still equals `BlipForQuestionAnswering` without knowledge and with hard-0 gates."""

import json
import math

import PIL.Image
import pytest
import torch

from modeling_vkood import VKOODBlipForQuestionAnswering, VKOODBlipProcessor
from modeling_vkood.pipeline_vkood import VKOODVisualQuestionAnsweringPipeline
from tests.utils.tiny_blip import blip_image_processor, blip_tokenizer, save_tiny_blip
from tests.utils.without_package import run_without_package

ANSWER_LIST = ["red", "dark red", "blue", "two", "yes", "no", "a ball", "four legs"]
# (image size, colour, question, knowledge): 0 to 3 items, questions of 2 to 14 words.
EXAMPLES = [
    ((32, 32), "red", "what colour?", ["red is a colour"]),
    ((50, 80), "blue", "is there a big blue square next to the small red circle on the left of the table?", []),
    ((64, 40), "green", "how many?", ["a", "two is a number", "green grass grows in the wide fields"]),
    ((120, 90), "white", "what is it?", ["snow is white"]),
]
REMOTE_FILES = {
    "configuration_blip_vkood.py",
    "modeling_blip_vkood.py",
    "processing_blip_vkood.py",
    "pipeline_vkood.py",
    "ood_vkood.py",
}


def rows():
    return [
        {"image": PIL.Image.new("RGB", size, colour), "question": question, "knowledge": items}
        for size, colour, question, items in EXAMPLES
    ]


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory, minilm_path):
    return save_tiny_blip(tmp_path_factory.mktemp("tiny_blip"), minilm_path)


@pytest.fixture(scope="module")
def model(blip_folder):
    model = VKOODBlipForQuestionAnswering.from_pretrained(blip_folder).eval()
    model.config.answer_list = list(ANSWER_LIST)
    return model


@pytest.fixture(scope="module")
def processor(minilm_path, model):
    return VKOODBlipProcessor.from_model_config(blip_image_processor(), blip_tokenizer(minilm_path), model.config)


@pytest.fixture(scope="module")
def vqa(model, processor):
    return VKOODVisualQuestionAnsweringPipeline(model=model, processor=processor)


def single_inputs(processor, example):
    return dict(processor(images=example["image"], text=example["question"], knowledge=[example["knowledge"]]))


def test_generated_answers_are_the_models_generate(vqa, model, processor):
    example = rows()[2]
    inputs = single_inputs(processor, example)
    # short answers: a random tiny decoder's long answers have probabilities that round to 0
    (answer,) = vqa(**example, top_k=1, max_new_tokens=3)
    expected = processor.decode_answers(model.generate(**inputs, max_new_tokens=3))[0]
    assert answer["answer"] == expected and 0 < answer["score"] <= 1
    answers = vqa(**example, top_k=3, max_new_tokens=3)
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=3, length_penalty=0.0)
    assert [a["answer"] for a in answers] == processor.decode_answers(beams)
    scores = [a["score"] for a in answers]
    assert scores == sorted(scores, reverse=True) and all(0 < score <= 1 for score in scores)


def test_ranked_answers_are_blips_rank_inference(vqa, model, processor):
    example = rows()[0]
    inputs = single_inputs(processor, example)
    candidates = processor.answer_candidates(ANSWER_LIST)
    indices, log_likelihoods = model.rank_answers(**candidates, **inputs)
    answers = vqa(**example, inference="rank", top_k=4)  # the config's answer list
    assert [a["answer"] for a in answers] == [ANSWER_LIST[i] for i in indices[0, :4].tolist()]
    for answer, log_likelihood in zip(answers, log_likelihoods[0, :4].tolist()):
        assert math.isclose(answer["score"], math.exp(log_likelihood), rel_tol=1e-5)
    # a given list is ranked instead (and passing one means rank inference)
    given = ["blue", "yes", "no"]
    ranked = [a["answer"] for a in vqa(**example, answer_list=given, top_k=3)]
    indices, _ = model.rank_answers(**processor.answer_candidates(given), **inputs)
    assert ranked == [given[i] for i in indices[0].tolist()]


def test_return_knowledge_reports_each_items_score_gate_and_decision(vqa, model, processor):
    example = rows()[2]
    report = vqa(**example, return_knowledge=True, top_k=2, inference="rank")
    with torch.no_grad():
        encoding = model.encode(**single_inputs(processor, example))
    assert [item["text"] for item in report["knowledge"]] == example["knowledge"]
    for index, item in enumerate(report["knowledge"]):
        assert math.isclose(item["score"], float(encoding.ood_scores[0, index]), rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(item["gate"], float(encoding.ood_gate[0, index]), rel_tol=1e-5, abs_tol=1e-6)
        assert item["kept"] == (item["gate"] > 0.5)
    assert len(report["answers"]) == 2


@pytest.mark.parametrize("inference", ["generate", "rank"])
def test_a_batch_of_mixed_sizes_answers_row_for_row_as_single_calls(vqa, inference):
    options = dict(top_k=2, return_knowledge=True, inference=inference, max_new_tokens=3)
    singles = [vqa(row, **options) for row in rows()]
    batched = vqa(rows(), batch_size=3, **options)
    assert len(batched) == len(singles)
    for got, expected in zip(batched, singles):
        assert [a["answer"] for a in got["answers"]] == [a["answer"] for a in expected["answers"]]
        for a, b in zip(got["answers"], expected["answers"]):
            assert math.isclose(a["score"], b["score"], rel_tol=1e-4, abs_tol=1e-7)
        assert [item["text"] for item in got["knowledge"]] == [item["text"] for item in expected["knowledge"]]
        for a, b in zip(got["knowledge"], expected["knowledge"]):
            assert math.isclose(a["gate"], b["gate"], rel_tol=1e-4, abs_tol=1e-6)


def test_save_pretrained_writes_the_remote_code_and_the_pipeline(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert REMOTE_FILES <= {path.name for path in tmp_path.glob("*.py")}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForVisualQuestionAnswering"] == (
        "modeling_blip_vkood.VKOODBlipForQuestionAnswering"
    )
    assert config["custom_pipelines"]["visual-question-answering"]["pt"] == ["AutoModelForVisualQuestionAnswering"]
    assert config["answer_list"] == ANSWER_LIST
    processor_config = json.loads((tmp_path / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_blip_vkood.VKOODBlipProcessor"


@pytest.mark.slow
def test_remote_code_without_the_package_matches_and_equals_transformers_blip(model, processor, blip_folder, tmp_path):
    """One child process without the package: the saved folder through the Auto classes and the pipeline gives this
    process's outputs, and the remote-code model equals transformers' BlipForQuestionAnswering (loaded from the
    original BLIP folder) without knowledge and with hard-0 gates."""
    folder = tmp_path / "vkood_blip"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    example = rows()[2]
    example["image"].save(tmp_path / "image.png")
    inputs = single_inputs(processor, example)
    labels = processor.decoder_targets(["two"])["decoder_input_ids"]
    with torch.no_grad():
        logits = model(**inputs, labels=labels).logits
        generated = model.generate(**inputs, max_new_tokens=6, num_beams=2)
    expected = {
        "logits_sum": float(logits.double().sum()),
        "generated": generated.tolist(),
        "rank": VKOODVisualQuestionAnsweringPipeline(model=model, processor=processor)(
            **example, inference="rank", top_k=3, return_knowledge=True
        ),
    }
    code = f"""
    import json, torch
    from PIL import Image
    from transformers import (AutoModelForVisualQuestionAnswering, AutoProcessor, BlipForQuestionAnswering,
                              pipeline)
    folder, blip_folder = {str(folder)!r}, {str(blip_folder)!r}
    model = AutoModelForVisualQuestionAnswering.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__ == "VKOODBlipForQuestionAnswering", type(model)
    assert type(processor).__name__ == "VKOODBlipProcessor", type(processor)
    image = Image.open("image.png")
    example = dict(question={example["question"]!r}, knowledge={example["knowledge"]!r})
    inputs = dict(processor(images=image, text=example["question"], knowledge=[example["knowledge"]]))
    labels = processor.decoder_targets(["two"])["decoder_input_ids"]
    with torch.no_grad():
        logits = model(**inputs, labels=labels).logits
        generated = model.generate(**inputs, max_new_tokens=6, num_beams=2)
    vqa = pipeline("visual-question-answering", model=folder, trust_remote_code=True)
    rank = vqa(image=image, **example, inference="rank", top_k=3, return_knowledge=True)

    # transformers' own BLIP on the same weights: no knowledge, then items whose gates are hard 0
    blip = BlipForQuestionAnswering.from_pretrained(blip_folder).eval()
    plain = {{k: v for k, v in inputs.items() if not k.startswith("knowledge")}}
    captured = {{}}
    blip.text_decoder.register_forward_hook(lambda module, args, output: captured.update(out=output))
    parity = {{}}
    with torch.no_grad():
        reference_loss = blip(**plain, labels=labels).loss
        reference_logits = captured["out"].logits
        reference_generated = blip.generate(**plain, max_new_tokens=6, num_beams=2)
        for case, model_inputs in (("no_knowledge", plain), ("hard_zero", inputs)):
            if case == "hard_zero":
                model.ood.hard_gate = True
                model.ood.set_threshold(1e9)
            output = model(**model_inputs, labels=labels)
            torch.testing.assert_close(output.logits, reference_logits, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(output.loss, reference_loss, rtol=1e-6, atol=1e-6)
            assert torch.equal(model.generate(**model_inputs, max_new_tokens=6, num_beams=2), reference_generated)
            parity[case] = True
    print(json.dumps(dict(logits_sum=float(logits.double().sum()), generated=generated.tolist(), rank=rank,
                          parity=parity)))
    """
    result = json.loads(run_without_package(code, tmp_path).stdout.strip().splitlines()[-1])
    assert result["parity"] == {"no_knowledge": True, "hard_zero": True}
    assert math.isclose(result["logits_sum"], expected["logits_sum"], rel_tol=1e-6)
    assert result["generated"] == expected["generated"]
    assert [a["answer"] for a in result["rank"]["answers"]] == [a["answer"] for a in expected["rank"]["answers"]]
    for got, want in zip(result["rank"]["knowledge"], expected["rank"]["knowledge"]):
        assert got["text"] == want["text"] and math.isclose(got["gate"], want["gate"], rel_tol=1e-5, abs_tol=1e-6)


def test_the_processor_builds_from_a_blip_checkpoint_folder(blip_folder, model, processor):
    """`from_blip_pretrained` reads BLIP's own image processor and tokenizer from the checkpoint (as it would from
    "Salesforce/blip-vqa-base") and encodes as the processor built from their parts; answers start with [DEC]."""
    built = VKOODBlipProcessor.from_blip_pretrained(blip_folder, model.config)
    example = rows()[2]
    for key, value in single_inputs(processor, example).items():
        assert torch.equal(single_inputs(built, example)[key], value), key
    assert built.decoder_targets(["two"])["decoder_input_ids"][0, 0] == model.config.text_config.bos_token_id
