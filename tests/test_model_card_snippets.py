"""The model card's usage snippets run as written, for every task, against a saved checkpoint, in a Python process
that does not have the vkood package (the Hub user's situation)."""

import re
import shutil
import textwrap

import PIL.Image
import pytest
from transformers import AutoTokenizer, CLIPImageProcessorPil

from hub_cards.model_card import TASKS, ModelDescription, model_card
from modeling_vkood import (
    VKOODBlipConfig,
    VKOODBlipForQuestionAnswering,
    VKOODBlipProcessor,
    VKOODForConditionalGeneration,
    VKOODForImagesAndTextClassification,
    VKOODForImageTextRetrieval,
    VKOODForQuestionAnswering,
    VKOODProcessor,
    pipeline_vkood,
)
from modeling_vkood.knowledge import KnowledgeBase
from tests.utils.tiny import tiny_decoder_config, tiny_vkood_config
from tests.utils.tiny_blip import blip_image_processor, blip_tokenizer, tiny_blip_config
from tests.utils.without_package import run_without_package

CHECKPOINTS = {
    "vqa": (VKOODForQuestionAnswering, {0: "yes", 1: "no", 2: "circle"}),
    "nlvr2": (VKOODForImagesAndTextClassification, {0: "False", 1: "True"}),
    "retrieval": (VKOODForImageTextRetrieval, None),
    "generative_vqa": (VKOODForConditionalGeneration, None),
    "blip_vqa": (VKOODBlipForQuestionAnswering, None),
}
# What each task's snippet must leave behind (checked after the snippets ran).
RESULTS = {
    "vqa": "assert answer in model.config.id2label.values(), answer\n"
    "assert found['answers'] and found['knowledge'], found\n"
    "assert all(set(item) == {'text', 'score', 'gate', 'kept'} for item in found['knowledge'])",
    "nlvr2": 'assert prediction in ("False", "True"), prediction',
    "retrieval": "assert best_caption in captions and tuple(match_probability.shape) == (2,)",
    "generative_vqa": "assert isinstance(answer, str), answer\n"
    "assert found['answers'] and found['knowledge'], found\n"
    "assert all(0.0 <= a['score'] <= 1.0 and isinstance(a['answer'], str) for a in found['answers'])",
    "blip_vqa": "assert isinstance(answer, str) and ranked_answer in model.config.answer_list, ranked_answer\n"
    "assert tuple(outputs.ood_gate.shape) == (1, 1) and found['answers'] and found['knowledge'], found\n"
    "assert all(isinstance(a['answer'], str) for a in found['answers']), found",  # generated (config.inference)
}
PIPELINES = {
    "vqa": pipeline_vkood.VQA_PIPELINE,
    "generative_vqa": pipeline_vkood.GENERATIVE_VQA_PIPELINE,
    "blip_vqa": pipeline_vkood.VQA_PIPELINE,
}


def save_checkpoint(task, folder, minilm_path, retrieves=True):
    model_class, id2label = CHECKPOINTS[task]
    if task == "blip_vqa":  # a tiny VK-OOD-BLIP with BLIP's tokenizer and an answer list for rank inference
        blip = tiny_blip_config()
        model = model_class(
            VKOODBlipConfig(
                vision_config=blip.vision_config.to_dict(),
                text_config=blip.text_config.to_dict(),
                answer_list=["yes", "no", "red"],
                ood_config=dict(max_iter=3),
            )
        )
        processor = VKOODBlipProcessor.from_model_config(
            blip_image_processor(), blip_tokenizer(minilm_path), model.config
        )
    else:
        labels = {} if id2label is None else {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
        decoder = {"decoder_config": tiny_decoder_config()} if task == "generative_vqa" else {}
        model = model_class(tiny_vkood_config(**labels, **decoder, ood_config=dict(max_iter=3)))
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = VKOODProcessor.from_model_config(
            image_processor, AutoTokenizer.from_pretrained(minilm_path), model.config
        )
    if task in PIPELINES:  # as save_output_folder ships a VQA checkpoint: with its pipeline
        model.config.custom_pipelines = PIPELINES[task]
        shutil.copy(pipeline_vkood.__file__, folder / "pipeline_vkood.py")
    model.save_pretrained(folder)
    if retrieves:  # as train.py does where the data was retrieved: the card's pipeline retrieves
        processor.set_knowledge_source("starter", KnowledgeBase.starter().path)
    processor.save_pretrained(folder)


def describe(task, model_id, **fields):
    return ModelDescription(
        model_name="tiny",
        task=task,
        dataset_name="tiny",
        eval_split="test",
        vision_backbone="v",
        text_backbone="t",
        knowledge_source="k",
        finetuning="full",
        weights_form="w",
        command="python train.py",
        results={"eval_score": 1.0},
        repo_id=model_id,
        **fields,
    )


def test_every_task_has_a_checkpoint_here():
    assert set(CHECKPOINTS) == set(TASKS) == set(RESULTS)


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_card_usage_snippets_run_without_the_package(task, tmp_path, minilm_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    save_checkpoint(task, folder, minilm_path)
    for name, colour in (("photo", "red"), ("other", "blue"), ("left", "green"), ("right", "white")):
        PIL.Image.new("RGB", (40, 36), colour).save(tmp_path / f"{name}.jpg")

    card = model_card(describe(task, str(folder))).text
    snippets = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert snippets and all(str(folder) in snippet for snippet in snippets)
    assert len(snippets) == (2 if task in PIPELINES else 1)  # the VQA cards also show the pipeline
    code = "\n".join(snippets) + "\n" + RESULTS[task] + "\nprint('snippets ran')\n"
    result = run_without_package(textwrap.dedent(code), tmp_path)
    assert "snippets ran" in result.stdout


@pytest.mark.slow
def test_a_card_of_per_example_facts_passes_the_run_s_own_example_and_its_snippets_run(tmp_path, minilm_path):
    """knowledge-VQA's facts come with each question: the card shows one of the run's questions with its facts,
    says that nothing is retrieved, names the score the model computes, and its snippets run as written."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    save_checkpoint("vqa", folder, minilm_path, retrieves=False)
    PIL.Image.new("RGB", (40, 36), "red").save(tmp_path / "photo.jpg")
    question, facts = "what does the colour of the shape stand for?", ["red means harbour", "circle's means castle"]
    card = model_card(
        describe(
            "vqa",
            str(folder),
            example_question=question,
            example_knowledge=facts,
            retrieves_knowledge=False,
            ood_score="log_likelihood",
        )
    ).text
    assert "retrieves none itself" in card and "knowledge_index.sqlite" not in card
    assert "relative to the image's own tokens" in card and "GEM" not in card
    snippets = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(snippets) == 2 and all(question in snippet for snippet in snippets)
    code = "\n".join(snippets) + "\n" + RESULTS["vqa"] + "\nassert [item['text'] for item in found['knowledge']] == "
    code += repr(facts) + "\nprint('snippets ran')\n"
    result = run_without_package(textwrap.dedent(code), tmp_path)
    assert "snippets ran" in result.stdout
