"""The README's inference snippet: its facts are ones the default task (knowledge-VQA) states, and it runs as written
against a saved checkpoint of that task's shape, in a Python process without the vkood package."""

import ast
import re
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer, CLIPImageProcessorPil

from data_scripts.easy_vqa import SHAPES
from data_scripts.knowledge_vqa import ANSWERS, COLOURS
from modeling_vkood import VKOODForQuestionAnswering, VKOODProcessor, pipeline_vkood
from tests.utils.tiny import tiny_vkood_config
from tests.utils.without_package import run_without_package

README = Path(__file__).resolve().parents[1] / "README.md"


def inference_snippet() -> str:
    section = README.read_text(encoding="utf-8").split("\n## Inference\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_snippet_s_facts_are_facts_of_the_default_task():
    """knowledge-VQA's facts map its 3 shapes and 8 colours to place words; a fact about anything else (a square)
    is one the default model never saw. The snippet draws a blue triangle and asks for the shape's fact."""
    snippet = inference_snippet()
    facts = ast.literal_eval(re.search(r"^facts = (\[.*\])$", snippet, flags=re.M).group(1))
    for fact in facts:
        concept, verb, place = fact.split()
        assert concept in SHAPES + COLOURS and verb == "means" and place in ANSWERS, fact
    assert {"triangle", "blue"} <= {fact.split()[0] for fact in facts}
    assert 'fill="blue"' in snippet and "polygon" in snippet


@pytest.mark.slow
def test_the_snippet_runs_without_the_package(tmp_path, minilm_path):
    folder = tmp_path / "outputs" / "knowledge_vqa"  # the snippet's folder, relative to where it runs
    folder.mkdir(parents=True)
    id2label = dict(enumerate(ANSWERS))
    model = VKOODForQuestionAnswering(
        tiny_vkood_config(id2label=id2label, label2id={v: k for k, v in id2label.items()}, ood_config={"max_iter": 3})
    )
    model.config.custom_pipelines = pipeline_vkood.VQA_PIPELINE  # as train.py ships a VQA checkpoint
    shutil.copy(pipeline_vkood.__file__, folder / "pipeline_vkood.py")
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = VKOODProcessor.from_model_config(
        image_processor, AutoTokenizer.from_pretrained(minilm_path), model.config
    )
    processor.save_pretrained(folder)  # no knowledge source: knowledge-VQA's facts come with each question

    code = inference_snippet() + (
        "\nassert outputs.ood_gate.shape[-1] == len(facts)\n"
        "found = vqa(image=image, question=question, knowledge=facts, return_knowledge=True)\n"
        "assert [item['text'] for item in found['knowledge']] == facts\n"
        "assert all(answer['answer'] in model.config.id2label.values() for answer in found['answers'])\n"
        "print('snippet ran')\n"
    )
    result = run_without_package(code, tmp_path)
    assert "snippet ran" in result.stdout and (tmp_path / "blue_triangle.png").is_file()
