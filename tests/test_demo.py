"""The Gradio Space demo (spaces/vkood-demo): its functions against the models' own outputs for the VQA, NLVR2 and
retrieval checkpoints, its messages for bad input, its command line, and the page itself in headless Chromium.

The reference is always the model called directly (`model(**processor(...))`, `rank_gallery`) on the same inputs;
the demo itself goes through the checkpoints' shipped code (`trust_remote_code=True`) and the VQA pipeline.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import easy_vqa
import PIL.Image
import pytest
import torch
from transformers import AutoTokenizer, CLIPImageProcessorPil

from modeling_vkood import (
    VKOODForImagesAndTextClassification,
    VKOODForImageTextRetrieval,
    VKOODForQuestionAnswering,
    VKOODProcessor,
    pipeline_vkood,
)
from modeling_vkood.knowledge import KnowledgeBase
from tests.utils.paths import REPO_ROOT
from tests.utils.processes import free_port
from tests.utils.tiny import tiny_vkood_config

try:  # the browser test's driver (the `demo` extra); without it that test skips or, in CI, fails
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

SPACE = REPO_ROOT / "spaces" / "vkood-demo"
sys.path.insert(0, str(SPACE))
import vkood_demo  # noqa: E402
from vkood_demo import NO_KNOWLEDGE, RETRIEVED_AND_TYPED, TYPED_ONLY, DemoInputError  # noqa: E402

REQUIRE_BROWSER = bool(os.environ.get("VKOOD_REQUIRE_BROWSER"))
QUESTION = "what color is the circle?"
TYPED = "a dog is an animal\na circle is round"
ANSWERS = easy_vqa.get_answers()
TEST_IMAGES = easy_vqa.get_test_image_paths()


def load_app():
    """app.py as a module (it needs gradio: the `demo` extra); CI (VKOOD_REQUIRE_BROWSER=1) forbids the skip."""
    if importlib.util.find_spec("gradio") is None and not REQUIRE_BROWSER:
        pytest.skip("gradio is not installed (pip install -e '.[demo]'); VKOOD_REQUIRE_BROWSER=1 forbids the skip")
    if "vkood_demo_app" not in sys.modules:
        spec = importlib.util.spec_from_file_location("vkood_demo_app", SPACE / "app.py")
        module = sys.modules["vkood_demo_app"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["vkood_demo_app"]


# ------------------------------------------------------------------------------------------- tiny checkpoints
def save_checkpoint(task: str, folder: Path, minilm_path: str, answers=ANSWERS):
    """A tiny checkpoint of `task` saved as train.py saves one (remote code, processor with the starter graph, the
    VQA pipeline: `answers`); the VQA model's tau sits amid its item scores so that the gate keeps some items and
    drops others."""
    model_class, id2label = {
        "vqa": (VKOODForQuestionAnswering, dict(enumerate(answers))),
        "nlvr2": (VKOODForImagesAndTextClassification, {0: "False", 1: "True"}),
        "retrieval": (VKOODForImageTextRetrieval, None),
    }[task]
    labels = {} if id2label is None else {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    torch.manual_seed(0)
    model = model_class(tiny_vkood_config(**labels, ood_config=dict(max_iter=3))).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = VKOODProcessor.from_model_config(
        image_processor, AutoTokenizer.from_pretrained(minilm_path), model.config
    )
    processor.set_knowledge_source("starter", KnowledgeBase.starter().path)
    if task == "vqa":
        model.config.custom_pipelines = pipeline_vkood.VQA_PIPELINE
        shutil.copy(pipeline_vkood.__file__, folder / "pipeline_vkood.py")
        with torch.no_grad():
            scores = model(
                **processor(images=[easy_image(0)], text=[QUESTION], knowledge=[TYPED.splitlines()])
            ).ood_scores
            model.vkood.ood.threshold.fill_(scores.median().item())
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, minilm_path):
    """Per task: (folder, the model and processor built here, the checkpoint the demo loaded from the folder)."""
    built = {}
    for task in ("vqa", "nlvr2", "retrieval"):
        folder = tmp_path_factory.mktemp(task)
        model, processor = save_checkpoint(task, folder, minilm_path)
        built[task] = (folder, model, processor, vkood_demo.load_checkpoint(str(folder)))
    return built


def easy_image_path(index: int) -> str:
    return TEST_IMAGES[sorted(TEST_IMAGES)[index]]


def easy_image(index: int) -> PIL.Image.Image:
    return PIL.Image.open(easy_image_path(index))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """A file that is not an image, a truncated PNG, and images over the demo's and over Pillow's pixel limits."""
    folder = tmp_path_factory.mktemp("bad")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(512))
    png = Path(easy_image_path(1)).read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    PIL.Image.new("1", (9000, 9000)).save(folder / "large.png")  # 81 MP: over MAX_PIXELS, under Pillow's bomb limit
    PIL.Image.new("1", (20000, 20000)).save(folder / "huge.png")  # 400 MP: Pillow refuses it at open
    return folder


def reference_vqa(model, processor, image, question, knowledge):
    """The model's own outputs for these inputs (knowledge None: the processor retrieves, as in training)."""
    with torch.no_grad():
        outputs = model(
            **processor(images=[image], text=[question], knowledge=None if knowledge is None else [knowledge])
        )
    return outputs.logits[0].sigmoid(), outputs.ood_scores[0], outputs.ood_gate[0]


def retrieved_texts(processor, text):
    return [item.text for item in processor.retrieve_knowledge([text])[0]]


# ------------------------------------------------------------------------------------------- VQA
def test_vqa_answers_knowledge_and_ablations_are_the_models_own(checkpoints):
    folder, model, processor, checkpoint = checkpoints["vqa"]
    assert checkpoint.task == "vqa"
    result = vkood_demo.answer_question(checkpoint, easy_image_path(0), f"  {QUESTION} ", TYPED, RETRIEVED_AND_TYPED)

    candidates = TYPED.splitlines() + retrieved_texts(processor, QUESTION)
    items, left_out = candidates[:4], candidates[4:]
    assert [k["text"] for k in result.knowledge] == items and result.left_out == left_out
    assert [k["source"] for k in result.knowledge] == ["typed", "typed", "retrieved", "retrieved"]
    probabilities, scores, gates = reference_vqa(model, processor, easy_image(0), QUESTION, items)
    top = probabilities.topk(vkood_demo.TOP_ANSWERS)
    assert [a["answer"] for a in result.answers] == [ANSWERS[i] for i in top.indices]
    assert [a["score"] for a in result.answers] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert [k["score"] for k in result.knowledge] == pytest.approx(scores.tolist(), abs=1e-4)
    assert [k["gate"] for k in result.knowledge] == pytest.approx(gates.tolist(), abs=1e-5)
    assert [k["kept"] for k in result.knowledge] == (gates > 0.5).tolist()
    assert {k["kept"] for k in result.knowledge} == {True, False}  # tau amid the scores: both kinds are shown
    assert result.threshold == pytest.approx(model.vkood.ood.threshold.item())

    # Ablation: the three items of highest gate, each removed in turn, answered by the model itself.
    ranked = sorted(range(4), key=lambda m: (-gates[m].item(), -scores[m].item()))[: vkood_demo.ABLATED_ITEMS]
    assert [a["removed"] for a in result.ablations] == [items[m] for m in ranked]
    for m, ablation in zip(ranked, result.ablations):
        without, _, _ = reference_vqa(model, processor, easy_image(0), QUESTION, items[:m] + items[m + 1 :])
        assert ablation["answer"] == ANSWERS[int(without.argmax())]
        assert ablation["score"] == pytest.approx(without.max().item(), abs=1e-5)
        assert ablation["top_answer_score"] == pytest.approx(without[top.indices[0]].item(), abs=1e-5)


def test_vqa_knowledge_modes(checkpoints):
    _, model, processor, checkpoint = checkpoints["vqa"]
    # Nothing typed: exactly what the processor (and so the pipeline and the training collator) feeds by itself.
    retrieved = vkood_demo.answer_question(checkpoint, easy_image_path(0), QUESTION)
    probabilities, scores, _ = reference_vqa(model, processor, easy_image(0), QUESTION, None)
    assert [k["text"] for k in retrieved.knowledge] == retrieved_texts(processor, QUESTION)[:4]
    assert [k["score"] for k in retrieved.knowledge] == pytest.approx(scores.tolist(), abs=1e-4)
    assert retrieved.answers[0]["score"] == pytest.approx(probabilities.max().item(), abs=1e-5)

    typed = vkood_demo.answer_question(checkpoint, easy_image_path(0), QUESTION, TYPED + "\n\n", TYPED_ONLY)
    assert [k["text"] for k in typed.knowledge] == TYPED.splitlines() and typed.left_out == []
    none = vkood_demo.answer_question(checkpoint, easy_image_path(0), QUESTION, TYPED, NO_KNOWLEDGE)
    probabilities, _, _ = reference_vqa(model, processor, easy_image(0), QUESTION, [])
    assert none.knowledge == [] and none.ablations == []
    assert none.answers[0]["score"] == pytest.approx(probabilities.max().item(), abs=1e-5)


def test_score_plot_draws_each_item_against_tau():
    knowledge = [
        {"text": "kept item", "score": -1.0, "gate": 0.9, "kept": True},
        {"text": "dropped item", "score": -5.0, "gate": 0.1, "kept": False},
    ]
    axes = vkood_demo.score_plot(knowledge, -3.0).axes[0]
    assert [line.get_xdata()[0] for line in axes.lines] == [-3.0]  # the tau line
    points = {
        collection.get_label(): collection.get_offsets().tolist()
        for collection in axes.collections
        if collection.get_label() in ("kept", "gated out")
    }
    assert points == {"kept": [[-1.0, 0.0]], "gated out": [[-5.0, 1.0]]}
    assert [tick.get_text() for tick in axes.get_yticklabels()] == ["kept item", "dropped item"]
    assert "no knowledge items" in [text.get_text() for text in vkood_demo.score_plot([], -3.0).axes[0].texts]


def test_vqa_page_formats_the_results(checkpoints):
    app = load_app()
    _, _, _, checkpoint = checkpoints["vqa"]
    result = vkood_demo.answer_question(checkpoint, easy_image_path(0), QUESTION, TYPED, RETRIEVED_AND_TYPED)
    status, preview, answers, knowledge, plot, ablation = app.vqa_page(
        checkpoint, easy_image_path(0), QUESTION, TYPED, RETRIEVED_AND_TYPED
    )
    assert status.startswith(f"Answer: **{result.answers[0]['answer']}**") and "did not fit" in status
    assert preview.size == easy_image(0).size
    assert answers.values.tolist() == [[a["answer"], f"{a['score']:.4f}"] for a in result.answers]
    assert knowledge.values.tolist() == [
        [k["text"], k["source"], f"{k['score']:.4f}", f"{k['gate']:.4f}", "kept" if k["kept"] else "gated"]
        for k in result.knowledge
    ]
    assert ablation["item removed"].tolist() == [a["removed"] for a in result.ablations]
    assert plot.axes[0].lines[0].get_xdata()[0] == pytest.approx(result.threshold)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_give_a_readable_message(checkpoints, bad_files):
    _, _, _, checkpoint = checkpoints["vqa"]
    cases = {
        None: "Upload the image first.",
        str(bad_files / "corrupt.png"): "(corrupt.png) is not an image file that can be read",
        str(bad_files / "truncated.png"): "(truncated.png) is damaged",
        str(bad_files / "large.png"): "is 9000 x 9000 pixels (81 megapixels); this demo takes images up to 64",
        str(bad_files / "huge.png"): "(huge.png) is too large",
    }
    for path, message in cases.items():
        with pytest.raises(DemoInputError) as caught:
            vkood_demo.answer_question(checkpoint, path, QUESTION)
        assert message in str(caught.value), (path, str(caught.value))
        assert str(bad_files) not in str(caught.value)  # the server's temporary paths stay off the page
    for question in ("", "   ", None):
        with pytest.raises(DemoInputError, match="Type a question first"):
            vkood_demo.answer_question(checkpoint, easy_image_path(0), question)
    with pytest.raises(DemoInputError, match="Choose the knowledge"):
        vkood_demo.answer_question(checkpoint, easy_image_path(0), QUESTION, "", "everything")


def test_the_page_shows_errors_as_a_sentence(checkpoints, bad_files, monkeypatch, capsys):
    app = load_app()
    _, _, _, checkpoint = checkpoints["vqa"]
    status, *others = app.guarded(lambda *args: app.vqa_page(checkpoint, *args), app.empty_vqa)(
        str(bad_files / "corrupt.png"), QUESTION, "", RETRIEVED_AND_TYPED
    )
    assert status.startswith("⚠️ The image (corrupt.png) is not an image file")
    assert (
        others[0] is None and others[3] is None and all(len(table) == 0 for table in (others[1], others[2], others[4]))
    )

    def broken(*args):
        raise RuntimeError("something inside broke\nwith a second line")

    monkeypatch.setattr(app, "answer_question", broken)
    status, *_ = app.guarded(lambda *args: app.vqa_page(checkpoint, *args), app.empty_vqa)(
        easy_image_path(0), QUESTION, "", RETRIEVED_AND_TYPED
    )
    assert status == "⚠️ The model could not process this input: something inside broke"
    assert "Traceback" in capsys.readouterr().err  # the details go to the server log, not the page


# ------------------------------------------------------------------------------------------- NLVR2, retrieval
def test_nlvr2_judgement_is_the_models_own(checkpoints):
    _, model, processor, checkpoint = checkpoints["nlvr2"]
    sentence = "the left image holds a red circle"
    result = vkood_demo.judge_pair(checkpoint, easy_image_path(0), easy_image_path(1), sentence, "red is a color")
    items = list(dict.fromkeys(["red is a color"] + retrieved_texts(processor, sentence)))[:4]  # typed first, no twins
    assert len(items) == 4 and "red is a color" in retrieved_texts(processor, sentence)
    with torch.no_grad():
        reference = model(**processor(images=[[easy_image(0), easy_image(1)]], text=[sentence], knowledge=[items]))
    probabilities = reference.logits[0].softmax(-1)
    assert [entry["label"] for entry in result.labels] == [
        ("False", "True")[i] for i in probabilities.argsort(descending=True)
    ]
    assert sorted(e["probability"] for e in result.labels) == pytest.approx(sorted(probabilities.tolist()), abs=1e-5)
    assert [k["text"] for k in result.knowledge] == items
    for m, entry in enumerate(result.knowledge):
        assert entry["score"] == pytest.approx(reference.ood_scores[0, :, m].tolist(), abs=1e-4)
        assert entry["gate"] == pytest.approx(reference.ood_gate[0, :, m].tolist(), abs=1e-5)
    with pytest.raises(DemoInputError, match="Upload the right image first"):
        vkood_demo.judge_pair(checkpoint, easy_image_path(0), None, sentence)
    with pytest.raises(DemoInputError, match="Type a sentence first"):
        vkood_demo.judge_pair(checkpoint, easy_image_path(0), easy_image_path(1), " ")

    app = load_app()
    status, left, right, labels, knowledge = app.nlvr2_page(
        checkpoint, easy_image_path(0), easy_image_path(1), sentence, "red is a color", RETRIEVED_AND_TYPED
    )
    assert status.startswith(f"Prediction: **{result.labels[0]['label']}**")
    assert labels["label"].tolist() == [entry["label"] for entry in result.labels]
    assert knowledge["score (right)"].tolist() == [f"{k['score'][1]:.4f}" for k in result.knowledge]


def test_retrieval_ranking_is_the_models_own(checkpoints):
    _, model, processor, checkpoint = checkpoints["retrieval"]
    captions = ["a red circle", "a blue triangle on white", "a green rectangle", "a dog next to a cup"]
    result = vkood_demo.rank_captions(checkpoint, easy_image_path(0), "\n".join(captions) + "\n")
    images = model.encode_gallery_images(processor(images=[easy_image(0)])["pixel_values"])
    texts = model.encode_gallery_texts(**processor(text=captions))
    image_to_text, _ = model.rank_gallery(images, texts)
    similarity = (images["embeds"] @ texts["embeds"].t())[0]
    assert model.config.k_test == result.k_test == 3  # three re-ranked by ITM, one left at its ITC rank (last)
    order = sorted(range(4), key=lambda i: (image_to_text[0, i] == -100, -image_to_text[0, i], -similarity[i]))
    assert [row["caption"] for row in result.ranking] == [captions[i] for i in order]
    assert [row["score"] for row in result.ranking[:3]] == pytest.approx(image_to_text[0, order[:3]].tolist(), abs=1e-4)
    assert result.ranking[3]["score"] is None
    assert [row["similarity"] for row in result.ranking] == pytest.approx(similarity[order].tolist(), abs=1e-5)
    with pytest.raises(DemoInputError, match="at least one caption"):
        vkood_demo.rank_captions(checkpoint, easy_image_path(0), " \n ")

    app = load_app()
    status, _, ranking = app.retrieval_page(checkpoint, easy_image_path(0), "\n".join(captions))
    assert status.startswith(f"Best caption: **{result.ranking[0]['caption']}**")
    assert ranking["caption"].tolist() == [row["caption"] for row in result.ranking]
    assert ranking["score (ITM margin + ITC)"].tolist()[3] == "—"


def test_each_checkpoint_gets_its_own_page_and_other_tasks_a_message(checkpoints, tmp_path, monkeypatch):
    app = load_app()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # a missing folder is not looked up online
    for task, (_, _, _, checkpoint) in checkpoints.items():
        demo = app.build_demo(checkpoint)
        ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
        assert {"vqa": "answers", "nlvr2": "labels", "retrieval": "ranking"}[task] in ids
        assert (
            not (
                {"answers", "labels", "ranking"}
                - {"vqa": {"answers"}, "nlvr2": {"labels"}, "retrieval": {"ranking"}}[task]
            )
            & ids
        )
    nlvr2 = checkpoints["nlvr2"][3]
    with pytest.raises(DemoInputError, match="is a NLVR2 .* model, not a visual question answering one"):
        vkood_demo.answer_question(nlvr2, easy_image_path(0), QUESTION)
    with pytest.raises(DemoInputError, match="neither a local folder nor a Hub model"):
        vkood_demo.load_checkpoint(str(tmp_path / "missing"))
    checkpoints["vqa"][2].tokenizer.save_pretrained(tmp_path / "tokenizer_only")
    (tmp_path / "tokenizer_only" / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(DemoInputError, match="is not a VK-OOD task checkpoint"):
        vkood_demo.load_checkpoint(str(tmp_path / "tokenizer_only"))


def test_a_knowledge_vqa_model_gets_knowledge_vqa_examples_with_their_facts(checkpoints, tmp_path, minilm_path):
    """The default model (`python train.py`: knowledge-VQA) answers from the facts it is given: its page's examples
    are knowledge-VQA test rows with their facts typed in; any other VQA model gets easy-VQA test images."""
    from data_scripts import knowledge_vqa

    app = load_app()
    save_checkpoint("vqa", tmp_path, minilm_path, answers=knowledge_vqa.ANSWERS)
    checkpoint = vkood_demo.load_checkpoint(str(tmp_path))
    label, examples = app.vqa_examples(checkpoint)
    rows = knowledge_vqa.build(splits=["test"], check_images="none").dataset["test"].select(range(app.EXAMPLE_COUNT))
    assert label.startswith("knowledge-VQA") and len(examples) == app.EXAMPLE_COUNT
    for (image, question, typed), row in zip(examples, rows):
        assert question == row["question"] and PIL.Image.open(image).tobytes() == row["image"].tobytes()
        assert typed.splitlines() == [item["text"] for item in row["knowledge"]] and row["gold"]["text"] in typed
    status, _, _, knowledge, _, _ = app.vqa_page(checkpoint, *examples[0], TYPED_ONLY)
    typed, slots = examples[0][2].splitlines(), checkpoint.max_items  # the tiny model reads 4 of the 11
    assert status.startswith("Answer: **") and knowledge["knowledge item"].tolist() == typed[:slots]
    assert all(text in status for text in typed[slots:])  # named as left out
    label, examples = app.vqa_examples(checkpoints["vqa"][3])
    assert label == "easy-VQA test images" and len(examples) == app.EXAMPLE_COUNT
    assert all(Path(image).is_file() and question.endswith("?") and typed == "" for image, question, typed in examples)


# ------------------------------------------------------------------------------------------- command line, Space
def test_command_line_defaults_and_space_header(monkeypatch, capsys, tmp_path):
    app = load_app()
    assert app.server_port(None, {}) == 7860
    assert app.server_port(None, {"GRADIO_SERVER_PORT": "7999"}) == 7999
    assert app.server_port(8123, {"GRADIO_SERVER_PORT": "7999"}) == 8123
    assert app.default_model({}) == "outputs/knowledge_vqa"
    assert app.default_model({"VKOOD_DEMO_MODEL": "someone/model", "SPACE_ID": "a/b"}) == "someone/model"

    import yaml

    header = yaml.safe_load((SPACE / "README.md").read_text(encoding="utf-8").split("---\n")[1])
    assert header["sdk"] == "gradio" and (SPACE / header["app_file"]).is_file()
    assert header["models"] and header["datasets"]
    assert app.default_model({"SPACE_ID": "someone/space"}) == header["models"][0]
    requirements = [
        line.split(">=")[0]
        for line in (SPACE / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert {"torch", "transformers"} <= set(requirements) and "vkood" not in requirements  # remote code suffices

    monkeypatch.chdir(tmp_path)  # no outputs/knowledge_vqa here, and (offline) none on the Hub
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert app.main([]) == 2
    error = capsys.readouterr().err
    assert "outputs/knowledge_vqa" in error and "python train.py" in error and "Traceback" not in error


# ------------------------------------------------------------------------------------------- the page, in a browser
def browser_or_skip():
    """A headless Chromium under selenium; skipped with the reason when missing, unless VKOOD_REQUIRE_BROWSER=1."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [
        name for name, found in (("chromium", chromium), ("chromedriver", driver), ("selenium", webdriver)) if not found
    ]
    if missing:
        reason = f"needs {', '.join(missing)} (apt-get install chromium chromium-driver; pip install -e '.[demo]')"
        if REQUIRE_BROWSER:
            pytest.fail(f"VKOOD_REQUIRE_BROWSER=1 but the browser test {reason}")
        pytest.skip(f"{reason}; VKOOD_REQUIRE_BROWSER=1 forbids the skip")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1500",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


WAIT_SECONDS = 120  # generous: a loaded 2-core CI machine answers slowly; a healthy page answers in seconds


class Page:
    """The demo page in the browser: fresh loads, uploads, typing, and reading the status and the tables."""

    def __init__(self, driver, url):
        self.driver, self.url, self.by = driver, url, By
        self.wait = WebDriverWait(driver, WAIT_SECONDS)

    def find(self, css):
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def load(self):
        """A fresh page, once Gradio has mounted it (the footer is rendered last)."""
        self.driver.get(self.url)
        self.until(
            lambda: (
                self.driver.find_elements(self.by.CSS_SELECTOR, "#image input[type=file]")
                and "Built with Gradio" in self.find("body").text
            ),
            "the page to load",
        )

    def until(self, condition, what):
        return self.wait.until(lambda driver: condition(), message=f"waited {WAIT_SECONDS} s for {what}")

    def upload(self, path):
        """Choose the file; a mount that replaces the input in between loses it, so choose again until shown."""
        for _ in range(3):
            inputs = self.driver.find_elements(self.by.CSS_SELECTOR, "#image input[type=file]")
            if inputs:
                inputs[0].send_keys(str(path))
            try:
                return WebDriverWait(self.driver, 20).until(lambda driver: self.shows_file(Path(path).name))
            except TimeoutException:
                continue
        raise AssertionError(f"the page never showed the uploaded {Path(path).name}: {self.find('#image').text!r}")

    def shows_file(self, name) -> bool:
        return name in self.find("#image").text.replace("\n", "")  # the page splits the name at its extension

    def type(self, elem_id, text):
        self.find(f"#{elem_id} textarea").send_keys(text)

    def run(self) -> str:
        """Click the button and wait for the new status line. A click
        that lands before Gradio has wired the page up is lost, so an unanswered click is repeated."""
        before = self.find("#status").text.strip()

        def new_status():  # Gradio's status tracker (a timer, "processing") overlays the line until it is done
            tracker = self.find("#status [data-testid=status-tracker]")
            # Pending while the tracker shows its timer: it was once seen with its "hide" class and "0.1s" on top
            # of the previous answer, which then passed for the new status.
            if "hide" not in tracker.get_attribute("class").split() or tracker.text.strip():
                return None
            text = self.find("#status").text.strip()
            return text if text and text != before else None

        for _ in range(3):
            self.find("#run").click()
            try:
                return WebDriverWait(self.driver, WAIT_SECONDS / 3).until(lambda driver: new_status())
            except TimeoutException:
                continue
        raise AssertionError(f"no new status after three clicks; the page shows {self.find('#status').text!r}")

    def table(self, elem_id) -> list[list[str]]:
        cells = self.driver.find_elements(self.by.CSS_SELECTOR, f"#{elem_id} [role=gridcell]")
        rows = {}
        for cell in cells:
            rows.setdefault(int(cell.get_attribute("data-row")), {})[int(cell.get_attribute("data-col"))] = cell.text
        return [[row[col] for col in sorted(row)] for _, row in sorted(rows.items())]


@pytest.mark.slow
@pytest.mark.browser
def test_the_page_in_a_browser(checkpoints, bad_files, tmp_path):
    app = load_app()
    driver = browser_or_skip()
    folder, model, processor, _ = checkpoints["vqa"]
    demo = app.start(["--model", str(folder), "--port", str(free_port()), "--host", "127.0.0.1"])
    try:
        page = Page(driver, demo.local_url)
        page.load()
        page.type("question", QUESTION)
        assert page.run() == "⚠️ Upload the image first."

        page.load()
        page.upload(easy_image_path(0))
        page.type("question", QUESTION)
        page.type("typed", TYPED)
        status = page.run()
        items = (TYPED.splitlines() + retrieved_texts(processor, QUESTION))[:4]
        probabilities, scores, gates = reference_vqa(model, processor, easy_image(0), QUESTION, items)
        top = probabilities.topk(vkood_demo.TOP_ANSWERS)
        assert status.startswith(f"Answer: {ANSWERS[top.indices[0]]} ({top.values[0]:.4f})"), status
        answers = page.table("answers")
        assert [row[0] for row in answers] == [ANSWERS[i] for i in top.indices]
        assert [float(row[1]) for row in answers] == pytest.approx(top.values.tolist(), abs=1.5e-4)
        knowledge = page.table("knowledge")
        assert [row[:2] for row in knowledge] == [[text, "typed" if text in TYPED else "retrieved"] for text in items]
        assert [float(row[2]) for row in knowledge] == pytest.approx(scores.tolist(), abs=1.5e-4)
        assert [float(row[3]) for row in knowledge] == pytest.approx(gates.tolist(), abs=1.5e-4)
        assert [row[4] for row in knowledge] == ["kept" if gate > 0.5 else "gated" for gate in gates.tolist()]
        assert len(page.table("ablation")) == vkood_demo.ABLATED_ITEMS
        assert page.driver.find_elements(page.by.CSS_SELECTOR, "#plot img")  # the matplotlib figure, rendered
        shot = tmp_path / "page.png"
        shot.write_bytes(page.driver.get_screenshot_as_png())
        assert PIL.Image.open(shot).size[0] >= 1000  # the whole page rendered (kept with the test's files)

        page.find("#question textarea").send_keys(Keys.CONTROL, "a", Keys.DELETE)  # as a user empties the box
        assert page.run() == "⚠️ Type a question first."
        assert page.table("answers") == [] and page.table("knowledge") == []  # the old results are cleared
        for name, message in (
            ("corrupt.png", "⚠️ The image (corrupt.png) is not an image file that can be read"),
            ("huge.png", "⚠️ The image (huge.png) is too large"),
        ):
            page.load()
            page.upload(bad_files / name)
            page.type("question", QUESTION)
            assert page.run().startswith(message)
            assert page.table("answers") == [] and "Traceback" not in page.find("body").text
    finally:
        driver.quit()
        demo.close()
