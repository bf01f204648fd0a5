"""VK-OOD demo (a Gradio Space): ask a question about an image and see which knowledge the OOD layer kept and why.

    python spaces/vkood-demo/app.py [--model PATH_OR_HUB_ID] [--port N] [--host NAME]

The model defaults to $VKOOD_DEMO_MODEL, else (on a Space) the first `models:` entry of this folder's README, else
`outputs/knowledge_vqa` (what `python train.py` writes). The port: --port, else $GRADIO_SERVER_PORT, else 7860. Runs
offline on a local checkpoint. The page adapts to the checkpoint's task: VQA (answers, knowledge table, score plot
against tau, per-item ablation), NLVR2 (two images and a sentence: true or false) or retrieval (captions ranked for
an image). Handlers below only format what `vkood_demo` computes; every error reaches the page as a sentence.
"""

import argparse
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage reports or version checks

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from vkood_demo import (  # noqa: E402
    KNOWLEDGE_MODES,
    RETRIEVED_AND_TYPED,
    TASK_TITLES,
    Checkpoint,
    DemoInputError,
    answer_question,
    first_line,
    judge_pair,
    load_checkpoint,
    rank_captions,
    score_plot,
)

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "outputs/knowledge_vqa"
DEFAULT_PORT = 7860
EXAMPLE_COUNT = 4

ANSWER_HEADERS = ["answer", "score"]
KNOWLEDGE_HEADERS = ["knowledge item", "source", "OOD score", "gate", "kept"]
ABLATION_HEADERS = ["item removed", "answer without it", "its score", "first answer's score without it"]
LABEL_HEADERS = ["label", "probability"]
PAIR_KNOWLEDGE_HEADERS = [
    "knowledge item",
    "source",
    "score (left)",
    "gate (left)",
    "kept (left)",
    "score (right)",
    "gate (right)",
    "kept (right)",
]
RANKING_HEADERS = ["rank", "caption", "score (ITM margin + ITC)", "ITC similarity"]


def number(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def kept(flag: bool) -> str:
    return "kept" if flag else "gated"


def table(rows, headers) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=headers)


def guarded(handler, empty):
    """`handler`, whose first output is the status text, with every error turned into that text (the other outputs
    become `empty()`): the page shows a sentence, never a stack trace (that goes to the server log)."""

    def run(*args):
        try:
            return handler(*args)
        except DemoInputError as error:
            return (f"⚠️ {error}", *empty())
        except Exception as error:  # noqa: BLE001 - an unexpected failure still gets a sentence on the page
            traceback.print_exc()
            return (f"⚠️ The model could not process this input: {first_line(error)}", *empty())

    return run


# ------------------------------------------------------------------------------------------- VQA handler
def vqa_page(checkpoint: Checkpoint, image_path, question, typed, mode):
    """Outputs of the VQA page: status, preview, answers, knowledge table, score plot, ablation table."""
    result = answer_question(checkpoint, image_path, question, typed, mode)
    best = result.answers[0]
    kept_count = sum(item["kept"] for item in result.knowledge)
    status = (
        f"Answer: **{best['answer']}** ({best['score']:.4f}). The model read {len(result.knowledge)} knowledge "
        f"item(s); the gate kept {kept_count} (tau = {result.threshold:.4f})."
    )
    if result.left_out:
        status += (
            f" {len(result.left_out)} more item(s) did not fit the model's {checkpoint.max_items} slots "
            f"(the processor cuts as training did): {'; '.join(result.left_out)}."
        )
    answers = table([[a["answer"], number(a["score"])] for a in result.answers], ANSWER_HEADERS)
    knowledge = table(
        [[k["text"], k["source"], number(k["score"]), number(k["gate"]), kept(k["kept"])] for k in result.knowledge],
        KNOWLEDGE_HEADERS,
    )
    ablation = table(
        [[a["removed"], a["answer"], number(a["score"]), number(a["top_answer_score"])] for a in result.ablations],
        ABLATION_HEADERS,
    )
    return status, result.image, answers, knowledge, score_plot(result.knowledge, result.threshold), ablation


def empty_vqa():
    return None, table([], ANSWER_HEADERS), table([], KNOWLEDGE_HEADERS), None, table([], ABLATION_HEADERS)


# ------------------------------------------------------------------------------------------- NLVR2 handler
def nlvr2_page(checkpoint: Checkpoint, left_path, right_path, sentence, typed, mode):
    """Outputs of the NLVR2 page: status, the two previews, label probabilities, knowledge under each image."""
    result = judge_pair(checkpoint, left_path, right_path, sentence, typed, mode)
    best = result.labels[0]
    status = (
        f"Prediction: **{best['label']}** ({best['probability']:.4f}). The model read "
        f"{len(result.knowledge)} knowledge item(s) (tau = {result.threshold:.4f})."
    )
    if result.left_out:
        status += f" {len(result.left_out)} more item(s) did not fit the model's {checkpoint.max_items} slots."
    labels = table([[entry["label"], number(entry["probability"])] for entry in result.labels], LABEL_HEADERS)
    knowledge = table(
        [
            [k["text"], k["source"]]
            + [
                value
                for side in (0, 1)
                for value in (number(k["score"][side]), number(k["gate"][side]), kept(k["kept"][side]))
            ]
            for k in result.knowledge
        ],
        PAIR_KNOWLEDGE_HEADERS,
    )
    return status, *result.images, labels, knowledge


def empty_nlvr2():
    return None, None, table([], LABEL_HEADERS), table([], PAIR_KNOWLEDGE_HEADERS)


# ------------------------------------------------------------------------------------------- retrieval handler
def retrieval_page(checkpoint: Checkpoint, image_path, captions):
    """Outputs of the retrieval page: status, preview, the captions ranked for the image."""
    result = rank_captions(checkpoint, image_path, captions)
    status = (
        f"Best caption: **{result.ranking[0]['caption']}**. The fused ITM head re-scored the top "
        f"{result.k_test} caption(s) by ITC similarity; the others keep their ITC rank."
    )
    rows = [
        [rank, row["caption"], number(row["score"]), number(row["similarity"])]
        for rank, row in enumerate(result.ranking, start=1)
    ]
    return status, result.image, table(rows, RANKING_HEADERS)


def empty_retrieval():
    return None, table([], RANKING_HEADERS)


# ------------------------------------------------------------------------------------------- layout
def knowledge_vqa_examples(id2label: dict, count: int = EXAMPLE_COUNT) -> list[list[str]]:
    """For a model whose answers are knowledge-VQA's places (the default `python train.py` model: it answers from the
    facts it is given), the first `count` knowledge-VQA test rows: image, question and the row's 11 facts typed in.
    [] for any other model, and where the vkood package, whose builder draws the facts, is not installed (a Space)."""
    try:
        from datasets import Image

        from data_scripts import knowledge_vqa
    except ImportError:
        return []
    if not set(id2label.values()) <= set(knowledge_vqa.ANSWERS):
        return []
    test = knowledge_vqa.build(splits=["test"], check_images="none").dataset["test"].select(range(count))
    test = test.cast_column("image", Image(decode=False))  # the file's path, which the page's File input takes
    return [
        [row["image"]["path"], row["question"], "\n".join(item["text"] for item in row["knowledge"])] for row in test
    ]


def easy_vqa_examples(count: int = EXAMPLE_COUNT) -> list[list[str]]:
    """The first `count` test images of the easy-VQA package with their first question and no typed item ([]
    without the package)."""
    try:
        import easy_vqa
    except ImportError:
        return []
    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    first = {}
    for question, image_id in zip(questions, image_ids):
        first.setdefault(image_id, question)
    return [[paths[image_id], question, ""] for image_id, question in list(first.items())[:count]]


def vqa_examples(checkpoint: Checkpoint) -> tuple[str, list[list[str]]]:
    """The VQA page's examples (image, question, typed items) and their label."""
    examples = knowledge_vqa_examples(checkpoint.model.config.id2label)
    if examples:
        return "knowledge-VQA test rows (their facts typed in)", examples
    return "easy-VQA test images", easy_vqa_examples()


def knowledge_inputs():
    typed = gr.Textbox(
        label="Knowledge items (optional, one per line; read before the retrieved ones)", lines=3, elem_id="typed"
    )
    mode = gr.Radio(list(KNOWLEDGE_MODES), value=RETRIEVED_AND_TYPED, label="Knowledge the model reads", elem_id="mode")
    return typed, mode


def vqa_layout(checkpoint: Checkpoint):
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.File(label="Image", elem_id="image")
            question = gr.Textbox(label="Question", placeholder="what shape is in the image?", elem_id="question")
            typed, mode = knowledge_inputs()
            button = gr.Button("Answer", variant="primary", elem_id="run")
            label, examples = vqa_examples(checkpoint)
            if examples:
                gr.Examples(examples, inputs=[image, question, typed], label=label, cache_examples=False)
            preview = gr.Image(label="Image read", interactive=False, format="png", height=220, elem_id="preview")
        with gr.Column(scale=2):
            status = gr.Markdown(elem_id="status")
            answers = gr.Dataframe(headers=ANSWER_HEADERS, label="Top answers", interactive=False, elem_id="answers")
            knowledge = gr.Dataframe(
                headers=KNOWLEDGE_HEADERS,
                label="Knowledge items: OOD score under the image's mixture and the gate",
                interactive=False,
                elem_id="knowledge",
            )
            plot = gr.Plot(label="Item scores against the threshold tau", elem_id="plot")
            ablation = gr.Dataframe(
                headers=ABLATION_HEADERS,
                label="Answer without each of the top-gated items",
                interactive=False,
                elem_id="ablation",
            )
    handler = guarded(lambda *args: vqa_page(checkpoint, *args), empty_vqa)
    for trigger in (button.click, question.submit):
        trigger(handler, [image, question, typed, mode], [status, preview, answers, knowledge, plot, ablation])


def nlvr2_layout(checkpoint: Checkpoint):
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Row():
                left = gr.File(label="Left image", elem_id="left")
                right = gr.File(label="Right image", elem_id="right")
            sentence = gr.Textbox(label="Sentence", placeholder="the left image holds two dogs", elem_id="sentence")
            typed, mode = knowledge_inputs()
            button = gr.Button("Judge", variant="primary", elem_id="run")
            with gr.Row():
                left_preview = gr.Image(label="Left image read", interactive=False, format="png", height=180)
                right_preview = gr.Image(label="Right image read", interactive=False, format="png", height=180)
        with gr.Column(scale=2):
            status = gr.Markdown(elem_id="status")
            labels = gr.Dataframe(
                headers=LABEL_HEADERS, label="Is the sentence true of the pair?", interactive=False, elem_id="labels"
            )
            knowledge = gr.Dataframe(
                headers=PAIR_KNOWLEDGE_HEADERS,
                label="Knowledge items under each image's mixture",
                interactive=False,
                elem_id="knowledge",
            )
    handler = guarded(lambda *args: nlvr2_page(checkpoint, *args), empty_nlvr2)
    for trigger in (button.click, sentence.submit):
        trigger(handler, [left, right, sentence, typed, mode], [status, left_preview, right_preview, labels, knowledge])


def retrieval_layout(checkpoint: Checkpoint):
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.File(label="Image", elem_id="image")
            captions = gr.Textbox(
                label="Captions (one per line); each gets the knowledge retrieved for it", lines=6, elem_id="captions"
            )
            button = gr.Button("Rank", variant="primary", elem_id="run")
            preview = gr.Image(label="Image read", interactive=False, format="png", height=220)
        with gr.Column(scale=2):
            status = gr.Markdown(elem_id="status")
            ranking = gr.Dataframe(
                headers=RANKING_HEADERS, label="Captions ranked for the image", interactive=False, elem_id="ranking"
            )
    handler = guarded(lambda *args: retrieval_page(checkpoint, *args), empty_retrieval)
    button.click(handler, [image, captions], [status, preview, ranking])


LAYOUTS = {"vqa": vqa_layout, "nlvr2": nlvr2_layout, "retrieval": retrieval_layout}


def build_demo(checkpoint: Checkpoint) -> gr.Blocks:
    """The page for the checkpoint's task (one interface per task: the others need another checkpoint)."""
    with gr.Blocks(title="VK-OOD demo") as demo:
        gr.Markdown(
            f"# VK-OOD: knowledge kept or gated by the image\n"
            f"Checkpoint `{checkpoint.name}`: **{TASK_TITLES[checkpoint.task]}**. Each knowledge item gets an OOD "
            f"score under a Gaussian mixture fitted to the image's tokens; the gate keeps the items scoring above "
            f"the threshold tau (= {checkpoint.threshold:.4f}). The model reads at most {checkpoint.max_items} items. "
            f"VQA, NLVR2 and retrieval checkpoints each get their own page: start the app with `--model` naming one."
        )
        LAYOUTS[checkpoint.task](checkpoint)
    return demo


# ------------------------------------------------------------------------------------------- command line
def space_model(readme: Path = HERE / "README.md") -> str | None:
    """The first `models:` entry of the Space README's YAML header (the model a Space serves), if any."""
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if not text.startswith("---\n"):
        return None
    header = yaml.safe_load(text.split("---\n", 2)[1]) or {}
    return next(iter(header.get("models") or []), None)


def default_model(environ=os.environ) -> str:
    """$VKOOD_DEMO_MODEL, else on a Space ($SPACE_ID set) the README's model, else `outputs/knowledge_vqa`."""
    if environ.get("VKOOD_DEMO_MODEL"):
        return environ["VKOOD_DEMO_MODEL"]
    if environ.get("SPACE_ID") and space_model():
        return space_model()
    return DEFAULT_MODEL


def server_port(port: int | None, environ=os.environ) -> int:
    """--port, else $GRADIO_SERVER_PORT, else 7860."""
    if port is not None:
        return port
    return int(environ.get("GRADIO_SERVER_PORT") or DEFAULT_PORT)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help=f"checkpoint folder or Hub id (default: {default_model()})")
    parser.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    parser.add_argument(
        "--host",
        default=None,
        help="interface to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1; 0.0.0.0 for every interface)",
    )
    return parser.parse_args(argv)


def start(argv=None) -> gr.Blocks:
    """Load the checkpoint, build the page and start serving it without blocking (DemoInputError: cannot load)."""
    args = parse_args(argv)
    model = args.model or default_model()
    try:
        checkpoint = load_checkpoint(model)
    except DemoInputError as error:
        if model != DEFAULT_MODEL:
            raise
        raise DemoInputError(f"{error}; run `python train.py` first to write it, or pass --model") from error
    demo = build_demo(checkpoint)
    host = args.host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    demo.launch(server_name=host, server_port=server_port(args.port), prevent_thread_lock=True, quiet=True)
    print(f"VK-OOD demo of {checkpoint.name} ({checkpoint.task}) on {demo.local_url}", flush=True)
    return demo


def main(argv=None) -> int:
    try:
        demo = start(argv)
    except DemoInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
