"""VKOODProcessor: shapes, padding, truncation, knowledge kinds, NLVR2 pairs, odd images, errors, Hub round trip."""

import io
import json
import textwrap
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, CLIPImageProcessorPil

from modeling_vkood.configuration_vkood import VKOODConfig
from modeling_vkood.processing_vkood import VKOODProcessor, usable_text_length
from tests.utils.without_package import run_without_package

SIZE = 32
KEYS = [
    "pixel_values",
    "input_ids",
    "attention_mask",
    "knowledge_input_ids",
    "knowledge_attention_mask",
    "knowledge_mask",
]


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


def make_processor(tokenizer, **limits) -> VKOODProcessor:
    # The PIL backend is the one used without torchvision; building it directly keeps the test off torchvision.
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    return VKOODProcessor(image_processor, tokenizer, **limits)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return make_processor(tokenizer)


def solid(colour, size=(40, 30), mode="RGB") -> PIL.Image.Image:
    return PIL.Image.new(mode, size, colour)


def item_ids(tokenizer, sentence, max_length=32) -> list[int]:
    return tokenizer(sentence, truncation=True, max_length=max_length)["input_ids"]


def test_knowledge_is_padded_per_batch_and_matches_item_by_item_tokenisation(processor, tokenizer):
    knowledge = [
        ["a cup is used for drinking", "a dog is a kind of animal"],
        [],
        ["a wheel is part of a car", "x", "a circle is a shape"],
    ]
    out = processor(text=["what is it?", "is the dog big?", "how many wheels?"], knowledge=knowledge)

    longest = max(len(item_ids(tokenizer, s)) for items in knowledge for s in items)
    assert out["knowledge_input_ids"].shape == (3, 3, longest)
    assert out["knowledge_attention_mask"].shape == (3, 3, longest)
    assert out["knowledge_mask"].tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1]]
    assert out["knowledge_input_ids"].dtype == torch.long
    for b, items in enumerate(knowledge):
        for m in range(3):
            ids = item_ids(tokenizer, items[m]) if m < len(items) else []
            padded = ids + [tokenizer.pad_token_id] * (longest - len(ids))
            assert out["knowledge_input_ids"][b, m].tolist() == padded
            assert out["knowledge_attention_mask"][b, m].tolist() == [1] * len(ids) + [0] * (longest - len(ids))

    expected_text = tokenizer(["what is it?", "is the dog big?", "how many wheels?"], padding=True)
    assert out["input_ids"].tolist() == expected_text["input_ids"]
    assert out["attention_mask"].tolist() == expected_text["attention_mask"]
    assert "token_type_ids" not in out


def test_items_and_tokens_are_truncated_in_order(tokenizer):
    processor = make_processor(tokenizer, max_knowledge_items=2, knowledge_max_length=5)
    long_item = "a kitchen is a place where people cook food every day"
    out = processor(text="q", knowledge=[long_item, "a cup", "dropped one", "dropped two"])

    assert out["knowledge_input_ids"].shape == (1, 2, 5)
    assert out["knowledge_input_ids"][0, 0].tolist() == item_ids(tokenizer, long_item, max_length=5)
    assert out["knowledge_input_ids"][0, 0, -1].item() == tokenizer.sep_token_id
    assert out["knowledge_input_ids"][0, 1].tolist() == item_ids(tokenizer, "a cup") + [tokenizer.pad_token_id]
    assert out["knowledge_mask"].tolist() == [[1, 1]]

    text = processor(text=["one two three four five six seven", "one"], max_length=6)
    assert text["input_ids"].shape == (2, 6)
    assert text["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]


def test_default_text_truncation_is_the_tokenizer_limit(processor, tokenizer):
    out = processor(text="word " * 1000)
    assert out["input_ids"].shape == (1, tokenizer.model_max_length)


def test_batch_without_items_has_zero_slots(processor):
    out = processor(text=["a", "b"], knowledge=[[], None])
    assert out["knowledge_input_ids"].shape == (2, 0, 1)
    assert out["knowledge_attention_mask"].shape == (2, 0, 1)
    assert out["knowledge_mask"].shape == (2, 0)

    assert not any(key.startswith("knowledge") for key in processor(text=["a", "b"]))


def test_strings_dicts_and_objects_give_the_same_tensors(processor):
    sentences = [["a cup is used for drinking", "a dog is a kind of animal"], ["a red circle"]]
    as_dicts = [[{"head": "x", "relation": "IsA", "text": s, "weight": 1.0} for s in items] for items in sentences]
    as_objects = [[SimpleNamespace(head="x", text=s) for s in items] for items in sentences]
    reference = processor(knowledge=sentences)
    for other in (as_dicts, as_objects):
        out = processor(knowledge=other)
        for key in ("knowledge_input_ids", "knowledge_attention_mask", "knowledge_mask"):
            assert torch.equal(out[key], reference[key])


def test_nlvr2_pairs_stack_per_example(processor):
    red, blue, green = solid((255, 0, 0)), solid((0, 0, 255)), solid((0, 255, 0))
    out = processor(images=[(red, blue), [green, red]], text=["left red", "right red"])
    assert out["pixel_values"].shape == (2, 2, 3, SIZE, SIZE)
    singles = processor(images=[red, blue, green, red])["pixel_values"]
    assert torch.equal(out["pixel_values"].reshape(4, 3, SIZE, SIZE), singles)

    with pytest.raises(ValueError, match="same, non-zero number of images"):
        processor(images=[(red, blue), (green,)])
    with pytest.raises(ValueError, match="mixes single images"):
        processor(images=[(red, blue), green])


def sixteen_bit_png(value: int) -> PIL.Image.Image:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.full((6, 5), value, dtype=np.uint16)).save(buffer, format="PNG")
    buffer.seek(0)
    image = PIL.Image.open(buffer)
    image.load()
    return image


def test_odd_image_modes_become_the_expected_rgb(processor):
    def pixels(image):
        return processor(images=image)["pixel_values"][0]

    white, black, grey = pixels(solid((255, 255, 255))), pixels(solid((0, 0, 0))), pixels(solid((128, 128, 128)))
    png16 = sixteen_bit_png(65535)
    assert png16.mode.startswith("I")
    assert torch.allclose(pixels(png16), white)
    assert torch.allclose(pixels(sixteen_bit_png(0)), black)
    assert torch.allclose(pixels(sixteen_bit_png(128 * 257)), grey)
    assert torch.allclose(pixels(solid(128, mode="L")), grey)
    assert torch.allclose(pixels(solid((10, 20, 30, 0), mode="RGBA")), white)  # transparency composited on white
    cmyk = solid((0, 255, 255, 0), mode="CMYK")
    assert torch.allclose(pixels(cmyk), pixels(cmyk.convert("RGB")))
    assert torch.allclose(pixels(solid((255, 0, 0), size=(1, 1))), pixels(solid((255, 0, 0))))
    assert torch.allclose(pixels(np.full((7, 9), 128, dtype=np.uint8)), grey)
    assert torch.allclose(pixels(torch.full((3, 7, 9), 255, dtype=torch.uint8)), white)  # channels first
    assert torch.allclose(pixels(np.full((7, 9), 65535, dtype=np.uint16)), white)
    assert processor(images=np.zeros((4, 10, 12, 3), dtype=np.uint8))["pixel_values"].shape == (4, 3, SIZE, SIZE)

    with pytest.raises(ValueError, match="mode 'F'"):
        pixels(solid(0.5, mode="F"))
    with pytest.raises(ValueError, match=r"images\[0\]: integer image values must lie in \[0, 255\]"):
        pixels(np.full((4, 4, 3), 300, dtype=np.int32))
    with pytest.raises(TypeError, match=r"images\[1\]\[0\]: expected a PIL image"):
        processor(images=[(solid(0), solid(0)), ("photo.jpg", solid(0))])
    with pytest.raises(ValueError, match="channel axis"):
        pixels(np.zeros((7, 9, 5), dtype=np.uint8))


def test_batch_size_mismatch_names_all_three_sizes(processor):
    images = [solid((0, 0, 0)), solid((255, 255, 255))]
    with pytest.raises(ValueError, match="images=2, text=3, knowledge=2"):
        processor(images=images, text=["a", "b", "c"], knowledge=[["x"], []])
    with pytest.raises(ValueError, match="images=not given, text=2, knowledge=1"):
        processor(text=["a", "b"], knowledge=[["x"]])


def test_knowledge_layout_errors_are_explicit(processor):
    with pytest.raises(ValueError, match="flat list of 2 items but text/images are a batch"):
        processor(text=["a", "b"], knowledge=["x", "y"])
    with pytest.raises(ValueError, match="mixes per-example lists and single items"):
        processor(knowledge=[["x"], "y"])
    with pytest.raises(TypeError, match=r"knowledge\[1\]\[0\]"):
        processor(knowledge=[["x"], [{"tail": "no text key"}]])
    with pytest.raises(TypeError, match="knowledge must be a list"):
        processor(knowledge="x")
    with pytest.raises(ValueError, match="at least one of"):
        processor()
    with pytest.raises(TypeError, match=r"options \['do_resize'\] were given without images"):
        processor(text="a", do_resize=False)

    single = processor(text="what is it?", knowledge=["a cup is used for drinking", {"text": "x"}])
    assert single["knowledge_mask"].tolist() == [[1, 1]]


def test_limits_come_from_the_model_config_and_are_validated(tokenizer):
    config = VKOODConfig(max_knowledge_items=3, knowledge_max_length=7)
    processor = VKOODProcessor.from_model_config(make_processor(tokenizer).image_processor, tokenizer, config)
    assert (processor.max_knowledge_items, processor.knowledge_max_length) == (3, 7)
    with pytest.raises(ValueError, match="leaves no room"):
        make_processor(tokenizer, knowledge_max_length=2)
    with pytest.raises(ValueError, match="max_knowledge_items must be a positive integer"):
        make_processor(tokenizer, max_knowledge_items=0)


@pytest.mark.parametrize(
    "text_config, usable",
    [
        (dict(model_type="roberta", max_position_embeddings=514, pad_token_id=1), 512),  # FacebookAI/roberta-base
        (dict(model_type="xlm-roberta", max_position_embeddings=514, pad_token_id=1), 512),
        (dict(model_type="camembert", max_position_embeddings=514, pad_token_id=1), 512),
        (dict(model_type="mpnet", max_position_embeddings=514), 512),  # padding_idx is always 1
        (dict(model_type="bert", max_position_embeddings=512), 512),  # positions start at 0
    ],
)
def test_usable_text_length_of_known_text_encoders(text_config, usable):
    assert usable_text_length(VKOODConfig(text_config=text_config).text_config) == usable


@pytest.mark.parametrize("model_type", ["roberta", "bert"])
def test_max_text_length_is_exactly_what_the_text_encoder_embeds(tokenizer, model_type):
    """Checked against the real encoder: max_text_length tokens run, one more fails inside the embeddings."""
    text_config = dict(
        model_type=model_type,
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=20,
    )
    config = VKOODConfig(text_config=text_config, knowledge_max_length=8)
    processor = VKOODProcessor.from_model_config(make_processor(tokenizer).image_processor, tokenizer, config)
    assert processor.max_text_length == (18 if model_type == "roberta" else 20)
    encoder = AutoModel.from_config(config.text_config).eval()
    long_text = "word " * 100
    encoded = processor(text=[long_text, "short"])
    assert encoded["input_ids"].shape == (2, processor.max_text_length)
    with torch.no_grad():
        encoder(input_ids=encoded["input_ids"][:1])
        one_more = tokenizer(long_text, truncation=True, max_length=processor.max_text_length + 1, return_tensors="pt")
        with pytest.raises((IndexError, RuntimeError)):
            encoder(input_ids=one_more["input_ids"])

    assert processor(text=long_text, max_length=10)["input_ids"].shape == (1, 10)
    limit = processor.max_text_length
    with pytest.raises(ValueError, match=f"max_length=21 exceeds the text encoder's max_text_length={limit}"):
        processor(text=long_text, max_length=21)
    with pytest.raises(ValueError, match="text of .* tokens is longer than .*; call with truncation=True"):
        processor(text=long_text, truncation=False)
    assert processor(text="short", truncation=False)["input_ids"].shape == (1, 3)


def test_max_text_length_is_validated(tokenizer):
    assert make_processor(tokenizer).max_text_length is None  # the tokenizer's limit
    with pytest.raises(ValueError, match="max_text_length must be a positive integer"):
        make_processor(tokenizer, max_text_length=0)
    with pytest.raises(ValueError, match="knowledge_max_length=32 exceeds max_text_length=16"):
        make_processor(tokenizer, max_text_length=16)


def test_decode_numpy_output_and_input_names(processor):
    out = processor(text=["What colour is the circle?", "Is it red?"], return_tensors="np")
    assert isinstance(out["input_ids"], np.ndarray)
    assert processor.batch_decode(out["input_ids"], skip_special_tokens=True) == [
        "what colour is the circle?",
        "is it red?",
    ]
    assert processor.decode(out["input_ids"][1], skip_special_tokens=True) == "is it red?"
    assert processor.model_input_names == KEYS


def round_trip_inputs(folder) -> dict:
    """Inputs written to disk so that a separate process can rebuild exactly the same call."""
    paths = []
    for index, (colour, mode) in enumerate([((255, 0, 0), "RGB"), (90, "L"), ((0, 0, 255, 128), "RGBA")]):
        path = folder / f"image_{index}.png"
        solid(colour, size=(37, 23), mode=mode).save(path)
        paths.append(str(path))
    return {
        "images": paths,
        "text": ["what shape is in the image?", "is the " + "very " * 600 + "big square blue?", "colour?"],
        "knowledge": [
            [{"text": f"item number {i} is a kind of shape with many long sides and sharp corners"} for i in range(20)],
            [],
            ["a circle is a shape", "blue is a colour"],
        ],
    }


# One snippet, run here and in the package-free process, so that both sides make the identical call.
CALL = """
import json, PIL.Image, torch
spec = json.load(open(INPUTS))
images = [PIL.Image.open(path) for path in spec["images"]]
out = processor(images=images, text=spec["text"], knowledge=spec["knowledge"])
torch.save(dict(out), OUTPUT)
"""


@pytest.mark.slow
def test_save_and_reload_including_remote_code_without_the_package(tokenizer, tmp_path):
    processor = make_processor(tokenizer, max_knowledge_items=5, knowledge_max_length=12, max_text_length=64)
    folder = tmp_path / "checkpoint"
    processor.save_pretrained(folder)

    assert (folder / "processing_vkood.py").is_file()
    # Copied with it: the flat siblings it imports, and theirs (knowledge_vkood.py imports concepts and verbalize).
    siblings = ("image_loading", "knowledge_source", "decoder_targets", "knowledge", "concepts", "verbalize")
    for sibling in siblings:
        assert (folder / f"{sibling}_vkood.py").is_file(), sibling
    saved = json.loads((folder / "processor_config.json").read_text())
    assert saved["auto_map"] == {"AutoProcessor": "processing_vkood.VKOODProcessor"}
    assert (saved["max_knowledge_items"], saved["knowledge_max_length"], saved["max_text_length"]) == (5, 12, 64)

    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps(round_trip_inputs(tmp_path)))
    outputs = {name: tmp_path / f"{name}.pt" for name in ("original", "reloaded", "remote")}
    exec(CALL, {"processor": processor, "INPUTS": str(inputs), "OUTPUT": str(outputs["original"])})
    reloaded = VKOODProcessor.from_pretrained(folder)
    exec(CALL, {"processor": reloaded, "INPUTS": str(inputs), "OUTPUT": str(outputs["reloaded"])})
    run_without_package(
        textwrap.dedent(
            f"""
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "VKOODProcessor", type(processor)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        INPUTS, OUTPUT = {str(inputs)!r}, {str(outputs["remote"])!r}
        """
        )
        + CALL,
        tmp_path,
    )

    original = torch.load(outputs["original"])
    assert sorted(original) == sorted(KEYS)
    assert original["knowledge_input_ids"].shape == (3, 5, 12)
    assert original["input_ids"].shape == (3, 64)  # the 600-word text, cut at max_text_length on every side
    for name in ("reloaded", "remote"):
        other = torch.load(outputs[name])
        assert sorted(other) == sorted(KEYS), name
        for key in KEYS:
            assert torch.equal(original[key], other[key]), (name, key)


def test_image_processor_options_pass_through(processor):
    uncropped = processor(images=solid((0, 0, 0), size=(40, 30)), do_center_crop=False)["pixel_values"]
    assert uncropped.shape[:3] == (1, 3, SIZE) and uncropped.shape[3] > SIZE


def test_fixed_knowledge_padding_gives_one_shape_and_the_same_outputs(tokenizer):
    """`knowledge_padding="max_length"`: every batch is (B, max_knowledge_items, knowledge_max_length), whatever its
    items; the model's outputs equal those of the batch padded to its longest."""
    from modeling_vkood import VKOODForQuestionAnswering
    from tests.utils.tiny import tiny_vkood_config

    processor = make_processor(tokenizer, max_knowledge_items=4, knowledge_max_length=8)
    batches = [
        (["what is it?", "is the dog big?"], [["a cup is used for drinking"], []]),
        (["how many wheels?"], [["a wheel is part of a car", "x", "a circle is a shape"]]),
        (["what?"], [[]]),
    ]
    torch.manual_seed(0)
    config = tiny_vkood_config(num_labels=3, max_knowledge_items=4, knowledge_max_length=8)
    model = VKOODForQuestionAnswering(config).eval()
    for texts, knowledge in batches:
        images = [solid((30 * i, 90, 160)) for i in range(len(texts))]
        fixed = processor(images=images, text=texts, knowledge=knowledge, knowledge_padding="max_length")
        longest = processor(images=images, text=texts, knowledge=knowledge)
        assert fixed["knowledge_input_ids"].shape == (len(texts), 4, 8)
        assert fixed["knowledge_mask"].shape == (len(texts), 4)
        torch.testing.assert_close(fixed["knowledge_mask"].sum(), longest["knowledge_mask"].sum())
        with torch.no_grad():
            torch.testing.assert_close(model(**fixed).logits, model(**longest).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="knowledge_padding"):
        processor(text=["a"], knowledge=[["b"]], knowledge_padding="max")


def test_bucketed_knowledge_padding_rounds_item_lengths_up_to_eights_under_the_cap(tokenizer):
    """`knowledge_padding="bucket"`: M is `max_knowledge_items`, Lk the batch's longest item rounded up to a multiple
    of 8, at most `knowledge_max_length`; the model's outputs equal those of the batch padded to its longest, on the
    CPU path and on the fixed-shape path that encodes every padded slot."""
    from modeling_vkood import VKOODForQuestionAnswering
    from modeling_vkood.processing_vkood import KNOWLEDGE_LENGTH_BUCKET
    from tests.utils.tiny import tiny_vkood_config

    processor = make_processor(tokenizer, max_knowledge_items=4, knowledge_max_length=20)
    long_item = "a bicycle is a vehicle with two wheels and pedals that people ride on roads and paths in every town"
    batches = [
        (["what is it?", "is the dog big?"], [["a cup is used for drinking"], []], 8),
        (["how many wheels?"], [["a wheel is part of a car and of a bicycle too", "x"]], 16),
        (["what?", "why?"], [[long_item], ["a dog"]], 20),
        (["what?"], [[]], 8),
    ]
    assert KNOWLEDGE_LENGTH_BUCKET == 8
    torch.manual_seed(0)
    config = tiny_vkood_config(num_labels=3, max_knowledge_items=4, knowledge_max_length=20)
    model = VKOODForQuestionAnswering(config).eval()
    for texts, knowledge, length in batches:
        images = [solid((30 * i, 90, 160)) for i in range(len(texts))]
        bucketed = processor(images=images, text=texts, knowledge=knowledge, knowledge_padding="bucket")
        longest = processor(images=images, text=texts, knowledge=knowledge)
        assert bucketed["knowledge_input_ids"].shape == (len(texts), 4, length)
        assert longest["knowledge_input_ids"].shape[-1] <= length
        assert torch.equal(
            bucketed["knowledge_attention_mask"].sum((1, 2)), longest["knowledge_attention_mask"].sum((1, 2))
        )
        for fixed_shapes in (False, True):
            model.vkood.force_fixed_shapes = fixed_shapes
            with torch.no_grad():
                torch.testing.assert_close(model(**bucketed).logits, model(**longest).logits, rtol=1e-5, atol=1e-5)
    # On the fixed-shape path (accelerators, FSDP) a batch without any item still encodes its padded item slots: every
    # process calls the text encoder as often as the others, which FSDP's collective weight gathers need.
    calls = []
    hook = model.vkood.text_model.embeddings.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(**processor(images=[solid((0, 0, 0))], text=["what?"], knowledge=[[]], knowledge_padding="bucket"))
    hook.remove()
    assert len(calls) == 2  # the question, then the items
