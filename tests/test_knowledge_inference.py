"""Knowledge at inference: the processor and the pipeline retrieve what the training data held, with or without vkood.

The reference is the training path itself: dataset rows annotated by the builders' `KnowledgeAnnotator`, batched by
`VQACollator`. The processor's own retrieval must give the same tensors; a saved checkpoint must carry its index and
retrieve the same items in a process without this package; the pipeline's `return_knowledge` must report the
model's own OOD scores and gates.
"""

import ast
import json
import os
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import datasets
import PIL.Image
import PIL.ImageDraw
import pytest
import torch
from transformers import AutoTokenizer, CLIPImageProcessorPil

from data_scripts.common import KnowledgeAnnotator
from modeling_vkood import VKOODForQuestionAnswering, VKOODProcessor, knowledge_source_vkood
from modeling_vkood.knowledge import KnowledgeBase, retrieval_cut
from modeling_vkood.pipeline_vkood import VQA_PIPELINE, VKOODVisualQuestionAnsweringPipeline
from modeling_vkood.training.collators import PixelCache, VQACollator
from tests.utils.paths import REFDATA, REPO_ROOT
from tests.utils.tiny import tiny_vkood_config
from tests.utils.without_package import run_without_package

CONCEPTNET_CSV = REFDATA / "conceptnet" / "assertions.csv" if REFDATA is not None else Path("refdata-absent")
needs_conceptnet = pytest.mark.skipif(
    not CONCEPTNET_CSV.is_file() and not os.environ.get("VKOOD_REQUIRE_REFDATA"),
    reason="needs ../shared/refdata/conceptnet (in CI and on dev machines; VKOOD_REQUIRE_REFDATA=1 forbids the skip)",
)

RETRIEVED, ENCODED = 6, 4  # items the builders store per question, items the model reads (the collator's cut)
STARTER_QUESTIONS = [
    "What color is the circle?",
    "Is there a red triangle in the image?",
    "Is the dog next to the cup on the dining table?",
    "How many people are on the bus?",
    "What is the toothbrush used for?",
    "nothing here names a concept",
]
CONCEPTNET_QUESTIONS = ["Where do you grow wheat?", "Is the balalaika used to make music?", "Is it a hard test?", "no"]
KNOWLEDGE_KEYS = ("knowledge_input_ids", "knowledge_attention_mask", "knowledge_mask")
ANSWERS = ["yes", "no", "circle", "triangle", "red", "blue"]


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


def image_processor():
    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def starter(tmp_path_factory):
    with KnowledgeBase.starter(cache_dir=tmp_path_factory.mktemp("starter")) as kb:
        yield kb


@pytest.fixture(scope="module")
def conceptnet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conceptnet")
    KnowledgeBase.build(CONCEPTNET_CSV, folder / "conceptnet.sqlite")
    with KnowledgeBase.open(folder / "conceptnet.sqlite") as kb:
        yield kb


def draw(shape: str, colour: tuple[int, int, int]) -> PIL.Image.Image:
    image = PIL.Image.new("RGB", (32, 32), (255, 255, 255))
    pen = PIL.ImageDraw.Draw(image)
    (pen.ellipse if shape == "circle" else pen.rectangle)((6, 6, 26, 26), fill=colour)
    return image


def images(count: int) -> list[PIL.Image.Image]:
    colours = ((200, 30, 30), (30, 30, 200), (30, 160, 30))
    return [draw(("circle", "square")[i % 2], colours[i % 3]) for i in range(count)]


def collated(processor: VKOODProcessor, kb: KnowledgeBase, questions: list[str]) -> dict:
    """What training fed the model: rows annotated like the dataset builders do, batched by the VQA collator."""
    rows = datasets.Dataset.from_dict({"question": questions}).map(
        KnowledgeAnnotator(kb, "question", RETRIEVED, several_texts=False), batched=True
    )
    batch_rows = [
        {"question": q, "knowledge": k, "image": image, "label_ids": [0], "label_scores": [1.0]}
        for q, k, image in zip(rows["question"], rows["knowledge"], images(len(questions)))
    ]
    return VQACollator(processor, len(ANSWERS), PixelCache(processor))(batch_rows)


@pytest.mark.parametrize("graph", ["starter", pytest.param("conceptnet", marks=needs_conceptnet)])
def test_self_retrieval_gives_the_training_collators_tensors(graph, request, tokenizer):
    kb = request.getfixturevalue(graph)
    questions = STARTER_QUESTIONS if graph == "starter" else CONCEPTNET_QUESTIONS
    explicit = VKOODProcessor(image_processor(), tokenizer, max_knowledge_items=ENCODED, knowledge_max_length=12)
    retrieving = VKOODProcessor(
        image_processor(),
        tokenizer,
        max_knowledge_items=ENCODED,
        knowledge_max_length=12,
        knowledge_source=graph,
        knowledge_index=str(kb.path),
    )
    training = collated(explicit, kb, questions)
    inference = retrieving(images=images(len(questions)), text=questions)

    assert sorted(inference) == sorted(set(training) - {"labels"})
    for key in inference:
        assert torch.equal(inference[key], training[key]), key
    counts = [len(items) for items in kb.retrieve_batch(questions, max_items=RETRIEVED)]
    assert min(counts) == 0 and max(counts) > 0
    assert inference["knowledge_mask"].sum(1).tolist() == [min(c, ENCODED) for c in counts]
    if graph == "starter":
        assert max(counts) > ENCODED  # the collator's cut to ENCODED items is exercised
        # Retrieving only ENCODED items deals other items (round-robin) than the first ENCODED of RETRIEVED items:
        # the processor cuts the builders' items as retrieval does, so it retrieves ENCODED items itself.
        fewer = [[i.text for i in items] for items in kb.retrieve_batch(questions, max_items=ENCODED)]
        assert fewer != [[i.text for i in items][:ENCODED] for items in kb.retrieve_batch(questions, RETRIEVED)]
        stored = [[i.to_dict() for i in items] for items in kb.retrieve_batch(questions, RETRIEVED)]
        assert explicit.knowledge_sentences(stored) == fewer == retrieving.knowledge_sentences(stored)
        assert [[i["text"] for i in retrieval_cut(items, ENCODED)] for items in stored] == fewer


def test_explicit_and_empty_knowledge_override_retrieval(tokenizer, starter):
    processor = VKOODProcessor(image_processor(), tokenizer, knowledge_source="starter", knowledge_index=starter.path)
    given = processor(text=["what color is the circle?", "a dog?"], knowledge=[["red is a color"], []])
    assert given["knowledge_mask"].tolist() == [[1], [0]]
    none = processor(text=["what color is the circle?", "a dog?"], knowledge=[])
    assert none["knowledge_input_ids"].shape == (2, 0, 1) and none["knowledge_mask"].shape == (2, 0)
    assert not any(key.startswith("knowledge") for key in processor(images=images(2)))  # nothing to retrieve from
    plain = VKOODProcessor(image_processor(), tokenizer)
    assert not any(key.startswith("knowledge") for key in plain(text="what color is the circle?"))
    with pytest.raises(ValueError, match="no knowledge_source"):
        plain.retrieve_knowledge(["a dog"])
    with pytest.raises(ValueError, match="has no knowledge_index"):
        VKOODProcessor(image_processor(), tokenizer, knowledge_source="starter")(text="a dog")
    with pytest.raises(ValueError, match="needs a knowledge_source"):
        plain.set_knowledge_source(None, starter.path)
    plain.set_knowledge_source("starter", starter.path)
    assert len(plain.retrieve_knowledge(["a red circle and a blue square and a dog"])[0]) == plain.max_knowledge_items


def test_edges_dataset_folder_retrieves_like_its_index_and_ships_when_local(tokenizer, starter, tmp_path, monkeypatch):
    monkeypatch.setenv("VKOOD_CACHE", str(tmp_path / "cache"))
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    starter.export_edges(dataset)
    processor = VKOODProcessor(image_processor(), tokenizer, knowledge_source=str(dataset))
    assert processor.retrieve_knowledge(STARTER_QUESTIONS) == starter.retrieve_batch(STARTER_QUESTIONS, 16)
    processor.save_pretrained(tmp_path / "saved")
    reloaded = VKOODProcessor.from_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "processor_config.json").read_text())["knowledge_index"] == (
        "knowledge_index.sqlite"
    )
    assert reloaded.retrieve_knowledge(STARTER_QUESTIONS) == starter.retrieve_batch(STARTER_QUESTIONS, 16)


def test_a_config_saved_with_knowledge_retrieval_items_still_loads(tokenizer, starter, tmp_path, caplog):
    processor = VKOODProcessor(
        image_processor(),
        tokenizer,
        max_knowledge_items=ENCODED,
        knowledge_source="starter",
        knowledge_index=starter.path,
    )
    processor.save_pretrained(tmp_path / "saved")
    config_file = tmp_path / "saved" / "processor_config.json"
    config = json.loads(config_file.read_text())
    for retrieval_items, warned in ((ENCODED, False), (RETRIEVED, True)):  # as a processor of before one cap saved it
        config_file.write_text(json.dumps({**config, "knowledge_retrieval_items": retrieval_items}))
        caplog.clear()
        with caplog.at_level("WARNING"):
            reloaded = VKOODProcessor.from_pretrained(tmp_path / "saved")
        assert not hasattr(reloaded, "knowledge_retrieval_items")
        assert ("knowledge_retrieval_items=6, which is no longer read" in caplog.text) == warned
        assert reloaded.retrieve_knowledge(STARTER_QUESTIONS) == starter.retrieve_batch(STARTER_QUESTIONS, ENCODED)


def test_hub_dataset_source_is_fetched_as_a_dataset_and_not_copied(tokenizer, starter, tmp_path, monkeypatch):
    monkeypatch.setenv("VKOOD_CACHE", str(tmp_path / "cache"))
    edges = starter.export_edges(tmp_path / "edges.jsonl")
    fetched = []

    def cached_file(repo_id, filename, **kwargs):  # huggingface_hub's download, offline: the file is "in the cache"
        fetched.append((repo_id, filename, kwargs))
        return str(edges)

    monkeypatch.setattr(knowledge_source_vkood, "cached_file", cached_file)
    processor = VKOODProcessor(image_processor(), tokenizer, knowledge_source="hf://datasets/someone/kg@v1")
    assert processor.retrieve_knowledge(["a red circle"]) == starter.retrieve_batch(["a red circle"], 16)
    assert fetched == [("someone/kg", "edges.jsonl", {"repo_type": "dataset", "revision": "v1"})]
    processor.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "processor_config.json").read_text())
    assert saved["knowledge_source"] == "hf://datasets/someone/kg@v1" and saved["knowledge_index"] is None
    assert not (tmp_path / "saved" / "knowledge_index.sqlite").exists()


def test_push_to_hub_uploads_the_index_with_the_processor(tokenizer, starter, tmp_path, monkeypatch):
    import transformers.utils.hub as hub

    uploads = []

    def upload(self, working_dir, repo_id, files_timestamps, **kwargs):  # the Hub upload, offline
        folder = Path(working_dir)
        saved = json.loads((folder / "processor_config.json").read_text())
        uploads.append((repo_id, {p.name for p in folder.iterdir()}, saved["knowledge_index"]))

    api = SimpleNamespace(create_repo=lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
    card = SimpleNamespace(save=lambda path: Path(path).write_text("card"))
    monkeypatch.setattr(hub, "hf_api", lambda: api)
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *args, **kwargs: card)
    monkeypatch.setattr(VKOODProcessor, "_upload_modified_files", upload)
    processor = VKOODProcessor(image_processor(), tokenizer, knowledge_source="starter", knowledge_index=starter.path)
    processor.save_pretrained(tmp_path / "model", push_to_hub=True, repo_id="someone/model")
    ((repo_id, files, index),) = uploads
    assert repo_id == "someone/model" and index == "knowledge_index.sqlite"
    assert {"knowledge_index.sqlite", "knowledge_vkood.py", "processing_vkood.py", "processor_config.json"} <= files
    assert (tmp_path / "model" / "knowledge_index.sqlite").is_file()  # the local save has it too


def tiny_checkpoint(folder: Path, tokenizer, kb: KnowledgeBase) -> tuple[VKOODForQuestionAnswering, VKOODProcessor]:
    """A VQA model and its processor saved the way `save_output_folder` writes a trained run."""
    id2label = dict(enumerate(ANSWERS))
    torch.manual_seed(0)
    config = tiny_vkood_config(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = VKOODForQuestionAnswering(config).eval()
    model.config.custom_pipelines = VQA_PIPELINE
    processor = VKOODProcessor.from_model_config(image_processor(), tokenizer, config)
    processor.set_knowledge_source("starter", kb.path)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "pipeline_vkood.py").write_text((REPO_ROOT / "modeling_vkood" / "pipeline_vkood.py").read_text())
    return model, processor


# Run here and in the package-free process: retrieved items, batch logits, and the pipeline with return_knowledge.
CHECKPOINT_CALLS = """
import json, PIL.Image, torch
from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor, pipeline
processor = AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True)
model = AutoModelForVisualQuestionAnswering.from_pretrained(FOLDER, trust_remote_code=True).eval()
spec = json.load(open(INPUTS))
pictures = [PIL.Image.open(path) for path in spec["images"]]
items = [[item.text for item in row] for row in processor.retrieve_knowledge(spec["questions"])]
with torch.no_grad():
    logits = model(**processor(images=pictures, text=spec["questions"])).logits
vqa = pipeline("visual-question-answering", model=FOLDER, trust_remote_code=True)
answers = [vqa(image=path, question=q, top_k=3, return_knowledge=True)
           for path, q in zip(spec["images"], spec["questions"])]
torch.save({"items": items, "logits": logits, "answers": answers, "module": type(processor).__module__}, OUTPUT)
"""


@pytest.mark.slow
def test_saved_checkpoint_retrieves_and_answers_the_same_without_the_package(tokenizer, starter, tmp_path):
    folder = tmp_path / "checkpoint"
    model, processor = tiny_checkpoint(folder, tokenizer, starter)
    assert {"knowledge_vkood.py", "processing_vkood.py", "knowledge_index.sqlite"} <= {p.name for p in folder.iterdir()}
    assert set(REMOTE_PROCESSOR_FILES) <= {p.name for p in folder.iterdir()}  # the siblings the processor imports
    saved = json.loads((folder / "processor_config.json").read_text())
    assert (saved["knowledge_source"], saved["knowledge_index"], saved["max_knowledge_items"]) == (
        "starter",
        "knowledge_index.sqlite",
        model.config.max_knowledge_items,
    )
    assert "knowledge_retrieval_items" not in saved  # one cap: the processor retrieves the model's M items

    paths = []
    for index, picture in enumerate(images(len(STARTER_QUESTIONS))):
        paths.append(str(tmp_path / f"image_{index}.png"))
        picture.save(paths[-1])
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"images": paths, "questions": STARTER_QUESTIONS}))
    header = f"FOLDER, INPUTS, OUTPUT = {str(folder)!r}, {str(inputs)!r}, {str(tmp_path / 'remote.pt')!r}\n"
    run_without_package(header + CHECKPOINT_CALLS, tmp_path)
    remote = torch.load(tmp_path / "remote.pt")
    assert remote["module"].startswith("transformers_modules")

    retrieved = starter.retrieve_batch(STARTER_QUESTIONS, model.config.max_knowledge_items)
    expected_items = [[item.text for item in row] for row in retrieved]
    assert remote["items"] == expected_items
    with torch.no_grad():
        local = model(**processor(images=[PIL.Image.open(p) for p in paths], text=STARTER_QUESTIONS)).logits
    torch.testing.assert_close(remote["logits"], local)
    for path, question, answer in zip(paths, STARTER_QUESTIONS, remote["answers"]):
        assert_pipeline_output(answer, model, processor, PIL.Image.open(path), question, top_k=3)


def assert_pipeline_output(output, model, processor, image, question, top_k):
    """`return_knowledge` output: the retrieved sentences the model read, its OOD scores and gates, its answers."""
    with torch.no_grad():
        reference = model(**processor(images=image, text=question))
    (retrieved,) = processor.retrieve_knowledge([question])
    sentences = [item.text for item in retrieved][: processor.max_knowledge_items]
    assert sorted(output) == ["answers", "knowledge"]
    assert [entry["text"] for entry in output["knowledge"]] == sentences
    for m, entry in enumerate(output["knowledge"]):
        assert sorted(entry) == ["gate", "kept", "score", "text"]
        assert entry["score"] == pytest.approx(reference.ood_scores[0, m].item(), abs=1e-5)
        assert entry["gate"] == pytest.approx(reference.ood_gate[0, m].item(), abs=1e-5)
        assert entry["kept"] == (reference.ood_gate[0, m].item() > 0.5)
    probabilities = reference.logits[0].sigmoid()
    assert [a["answer"] for a in output["answers"]] == [ANSWERS[i] for i in probabilities.topk(top_k).indices]
    assert [a["score"] for a in output["answers"]] == pytest.approx(probabilities.topk(top_k).values.tolist(), 1e-5)


def test_return_knowledge_reports_the_hard_gate_when_configured(tokenizer, starter, tmp_path):
    model, processor = tiny_checkpoint(tmp_path / "checkpoint", tokenizer, starter)
    model.vkood.ood.hard_gate = True
    with torch.no_grad():  # put the threshold amid the items' scores so that some are kept and some dropped
        scores = model(**processor(images=images(1), text=STARTER_QUESTIONS[2])).ood_scores
        model.vkood.ood.threshold.fill_(scores.median().item())
    vqa = VKOODVisualQuestionAnsweringPipeline(model=model, processor=processor)
    output = vqa(image=images(1)[0], question=STARTER_QUESTIONS[2], top_k=2, return_knowledge=True)
    assert_pipeline_output(output, model, processor, images(1)[0], STARTER_QUESTIONS[2], top_k=2)
    gates = {entry["gate"] for entry in output["knowledge"]}
    assert gates == {0.0, 1.0}
    assert [entry["kept"] for entry in output["knowledge"]] == [entry["gate"] == 1.0 for entry in output["knowledge"]]

    given = vqa(image=images(1)[0], question="a dog?", knowledge=["a dog is an animal"], return_knowledge=True)
    assert [entry["text"] for entry in given["knowledge"]] == ["a dog is an animal"]
    assert vqa(image=images(1)[0], question="a dog?", knowledge=[], return_knowledge=True)["knowledge"] == []
    assert len(vqa(image=images(1)[0], question="a dog?", top_k=2)) == 2  # plain answers without return_knowledge


# ------------------------------------------------------------------------------------------- remote-code rule
KNOWLEDGE_FILE = REPO_ROOT / "modeling_vkood" / "knowledge_vkood.py"
# Retrieval and what it imports: flat siblings, each imported in the `from .x import` form transformers copies.
RETRIEVAL_FILES = ("knowledge_vkood.py", "concepts_vkood.py", "verbalize_vkood.py")
REMOTE_PROCESSOR_FILES = (
    "processing_vkood.py",
    "image_loading_vkood.py",
    "knowledge_source_vkood.py",
    "decoder_targets_vkood.py",
    *RETRIEVAL_FILES,
)


def test_knowledge_file_imports_only_the_standard_library():
    for name in RETRIEVAL_FILES:
        tree = ast.parse((REPO_ROOT / "modeling_vkood" / name).read_text(encoding="utf-8"))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and f"{node.module}.py" in RETRIEVAL_FILES, f"{name} imports {node.module}"
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module.split(".")[0])
        assert imported and imported <= set(sys.stdlib_module_names), (name, imported - set(sys.stdlib_module_names))
    processing = (REPO_ROOT / "modeling_vkood" / "processing_vkood.py").read_text(encoding="utf-8")
    assert "\nfrom .knowledge_vkood import " in processing  # the form transformers copies and loads as remote code


def test_knowledge_file_runs_with_every_third_party_package_blocked(tmp_path, starter):
    edges = starter.export_edges(tmp_path / "edges.jsonl")
    code = f"""
        import importlib, importlib.abc, json, sys, types
        class _StdlibOnly(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] not in (*sys.stdlib_module_names, "flat"):
                    raise ImportError(f"{{name}} is not in the standard library")
        sys.meta_path.insert(0, _StdlibOnly())
        # The flat folder of remote-code files, as a package whose __init__ never runs (as transformers_modules).
        sys.modules["flat"] = types.ModuleType("flat")
        sys.modules["flat"].__path__ = [{str(KNOWLEDGE_FILE.parent)!r}]
        module = importlib.import_module("flat.knowledge_vkood")
        index = module.KnowledgeIndex(module.index_from_edge_lines({str(edges)!r}, {str(tmp_path / "cache")!r}))
        rows = [[item.to_dict() for item in index.retrieve(q, max_items=6)] for q in {STARTER_QUESTIONS!r}]
        json.dump(rows, open("retrieved.json", "w"))
        assert not any(name.split(".")[0] in ("torch", "transformers", "numpy") for name in sys.modules)
    """
    run_without_package(textwrap.dedent(code), tmp_path)
    retrieved = json.loads((tmp_path / "retrieved.json").read_text())
    assert retrieved == [[item.to_dict() for item in starter.retrieve(q, max_items=6)] for q in STARTER_QUESTIONS]
