"""The VQA pipeline batched (`batch_size` > 1) gives every example the answers, scores and knowledge report of a call
on its own: images of different sizes, questions of different lengths and 0..M knowledge items per example, padded
in one batch, must not change any example's result (the padding is masked everywhere)."""

import PIL.Image
import pytest
import torch
from transformers import AutoTokenizer, CLIPImageProcessorPil

from modeling_vkood import VKOODForConditionalGeneration, VKOODForQuestionAnswering, VKOODProcessor
from modeling_vkood.pipeline_vkood import VKOODVisualQuestionAnsweringPipeline
from tests.utils.tiny import tiny_decoder_config, tiny_vkood_config

ANSWERS = ["yes", "no", "red", "blue", "circle", "square", "two"]
# (image size, colour, question, knowledge): 0 to 4 items (the model reads at most 4), items of 1 to 9 words.
EXAMPLES = [
    ((32, 32), "red", "what colour?", ["red is a colour"]),
    ((50, 80), "blue", "is there a big blue square next to the small red circle on the left of the table?", []),
    ((64, 40), "green", "how many?", ["a", "two is a number", "green grass grows", "sky is blue and wide today"]),
    ((120, 90), "white", "what is it?", ["snow is white and cold in the winter mountains", "it"]),
    ((33, 47), "black", "is the shape on the left a circle or a square?", ["night is black", "a", "b", "c", "d"]),
]


def rows(knowledge=True):
    return [
        {
            "image": PIL.Image.new("RGB", size, colour),
            "question": question,
            **({"knowledge": items} if knowledge else {}),
        }
        for size, colour, question, items in EXAMPLES
    ]


def processor(minilm_path, config):
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return VKOODProcessor.from_model_config(image_processor, AutoTokenizer.from_pretrained(minilm_path), config)


def classifier(minilm_path):
    torch.manual_seed(0)
    id2label = dict(enumerate(ANSWERS))
    config = tiny_vkood_config(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    # tau amid the items' GEM scores (about -15 to -22 here), so that the gates are not all ~0
    config.ood_config.threshold = -17.0
    model = VKOODForQuestionAnswering(config).eval()
    return VKOODVisualQuestionAnsweringPipeline(model=model, processor=processor(minilm_path, config))


def generator(minilm_path):
    torch.manual_seed(0)
    config = tiny_vkood_config(decoder_config=tiny_decoder_config(), ood_config=dict(threshold=-17.0))
    model = VKOODForConditionalGeneration(config).eval()
    return VKOODVisualQuestionAnsweringPipeline(model=model, processor=processor(minilm_path, config))


def assert_same(batched, alone):
    """Same answers in the same order and the same knowledge report, scores to float tolerance."""
    assert len(batched) == len(alone)
    for got, expected in zip(batched, alone):
        assert [a["answer"] for a in got["answers"]] == [a["answer"] for a in expected["answers"]]
        assert [a["score"] for a in got["answers"]] == pytest.approx([a["score"] for a in expected["answers"]], 1e-4)
        assert [(k["text"], k["kept"]) for k in got["knowledge"]] == [
            (k["text"], k["kept"]) for k in expected["knowledge"]
        ]
        for key in ("score", "gate"):
            assert [k[key] for k in got["knowledge"]] == pytest.approx(
                [k[key] for k in expected["knowledge"]], rel=1e-4, abs=1e-6
            )


@pytest.mark.parametrize("batch_size", [2, 5])
def test_batched_classifier_answers_as_one_at_a_time(minilm_path, batch_size):
    vqa = classifier(minilm_path)
    alone = [vqa(row, top_k=3, return_knowledge=True) for row in rows()]
    assert [len(output["knowledge"]) for output in alone] == [1, 0, 4, 2, 4]  # 0..M items, the fifth cut to M = 4
    assert {k["kept"] for output in alone for k in output["knowledge"]} == {True, False}
    assert_same(vqa(rows(), top_k=3, return_knowledge=True, batch_size=batch_size), alone)
    plain = vqa(rows(), top_k=2, batch_size=batch_size)
    assert [[a["answer"] for a in answers] for answers in plain] == [
        [a["answer"] for a in output["answers"][:2]] for output in alone
    ]


def test_batch_mixing_examples_without_knowledge_keys(minilm_path):
    """No knowledge source and no `knowledge` for some examples: they get no item slots in the batch."""
    vqa = classifier(minilm_path)
    mixed = [row if i % 2 else {"image": row["image"], "question": row["question"]} for i, row in enumerate(rows())]
    alone = [vqa(row, top_k=3, return_knowledge=True) for row in mixed]
    assert_same(vqa(mixed, top_k=3, return_knowledge=True, batch_size=5), alone)


@pytest.mark.parametrize("top_k", [1, 3])
def test_batched_generation_answers_as_one_at_a_time(minilm_path, top_k):
    vqa = generator(minilm_path)
    alone = [vqa(row, top_k=top_k, max_new_tokens=4, return_knowledge=True) for row in rows()]
    assert all(len(output["answers"]) == top_k for output in alone)
    assert_same(vqa(rows(), top_k=top_k, max_new_tokens=4, return_knowledge=True, batch_size=3), alone)
