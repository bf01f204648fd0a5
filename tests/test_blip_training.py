"""VK-OOD-BLIP through train.py (`task: blip_vqa`): the training objectives of the recommended OOD layer reach the BLIP
model (relevance labels, gate forcing, the alignment loss read from the OOD layer's call), BLIP's VQA targets (every
human answer, weighted by its share of the annotators), BLIP's resolution change, a start that is BLIP's function,
and whole runs on knowledge-VQA (full fine-tuning with rank inference and a server file; LoRA with generated
answers) that save a folder the VQA pipeline answers from. The shipped BLIP configs hold BLIP's fine-tuning settings."""

import json
import re

import pytest
import torch
from PIL import Image
from transformers import pipeline

from modeling_vkood import VKOODBlipForQuestionAnswering, VKOODBlipProcessor
from modeling_vkood.training import parse_arguments
from modeling_vkood.training.collators import BlipVQACollator, PixelCache, answer_weights
from modeling_vkood.training.model_factory import apply_finetuning, build_blip_model, new_parameter_names
from modeling_vkood.training.ood_objectives import OODAlignmentLoss, capture_ood_outputs
from tests.utils.tiny_blip import IMAGE_SIZE, blip_image_processor, blip_tokenizer, save_tiny_blip
from tests.utils.train_script import read_results, train

QUESTIONS = ["what does the shape stand for?", "what does the colour stand for?"]
FACTS = [["circle means castle", "red means forest", "square means harbour"], ["blue means island", "a cup is red"]]
ANSWERS = [["castle"] * 9 + ["harbour"], ["island"] * 10]


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory, minilm_path):
    return save_tiny_blip(tmp_path_factory.mktemp("tiny_blip"), minilm_path)


@pytest.fixture(scope="module")
def model(blip_folder):
    return VKOODBlipForQuestionAnswering.from_pretrained(blip_folder)


@pytest.fixture(scope="module")
def processor(minilm_path, model):
    return VKOODBlipProcessor.from_model_config(blip_image_processor(), blip_tokenizer(minilm_path), model.config)


def rows():
    images = [Image.new("RGB", (44, 40), colour) for colour in ("red", "blue")]  # decoded images pass as they are
    return [
        {"question": q, "knowledge": [{"text": fact} for fact in facts], "answers": answers, "image": image}
        for q, facts, answers, image in zip(QUESTIONS, FACTS, ANSWERS, images)
    ]


def collated(processor, **options):
    return BlipVQACollator(processor, PixelCache(processor), **options)(rows())


def test_blips_targets_are_every_human_answer_weighted_by_its_share_of_the_annotators(processor):
    assert answer_weights(["Castle", "castle", "a harbour", "castle."]) == (["castle", "harbour"], [0.75, 0.25])
    batch = collated(processor, knowledge_relevance=True)
    assert batch["decoder_input_ids"].shape[:2] == batch["answer_weights"].shape == (2, 2)
    torch.testing.assert_close(batch["answer_weights"], torch.tensor([[0.9, 0.1], [1.0, 0.0]]))
    assert (batch["labels"][1, 1] == -100).all()  # the second question has one answer: its padded slot takes no loss
    starts = batch["decoder_input_ids"][:, :, 0][batch["answer_weights"] > 0]
    assert (starts == processor.decoder_start_token_id).all()
    # the items that state one of the question's answers
    torch.testing.assert_close(batch["knowledge_relevance"], torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    inputs = collated(processor, with_targets=False)
    assert not {"labels", "decoder_input_ids", "answer_weights", "knowledge_relevance"} & set(inputs)


def test_gate_forcing_gives_the_relevance_labels_as_the_gate_and_the_alignment_loss_reads_them(model, processor):
    batch = collated(processor, knowledge_relevance=True)
    batch["pixel_values"] = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    real = batch["knowledge_mask"].bool()
    model.train()
    try:
        forced = model(**batch, gate_forcing=torch.tensor(1.0))
        torch.testing.assert_close(forced.ood_gate[real], batch["knowledge_relevance"][real])
        halfway = model(**batch, gate_forcing=0.5)
        learnt = model(**batch)
        expected = 0.5 * learnt.ood_gate + 0.5 * batch["knowledge_relevance"]
        torch.testing.assert_close(halfway.ood_gate[real], expected[real])
        with capture_ood_outputs(model) as calls:
            outputs = model(**batch)
        loss = OODAlignmentLoss("gate", 1.0, 1.0, cross_image_weight=1.0)(model, outputs, batch, ood_outputs=calls)
        assert len(calls) == 1 and calls[0][1]["knowledge_relevance"] is batch["knowledge_relevance"]
        model.zero_grad()
        (outputs.loss + loss).backward()
        assert loss > 0 and model.ood.projection.weight.grad.abs().sum() > 0 and model.ood.threshold.grad != 0
    finally:
        model.zero_grad()
        model.eval()
    unforced = model(**batch, gate_forcing=1.0)  # inference always uses the learnt gate
    torch.testing.assert_close(unforced.ood_gate, model(**batch).ood_gate)


def test_a_blip_checkpoint_starts_with_the_gate_closed_as_blips_function(blip_folder, minilm_path):
    """The shipped BLIP configs set tau 30: every item's gate is ~e^-30, so the question states are BLIP's own."""
    args = parse_arguments(
        ["configuration/vqav2_blip.yaml", "--init_from", str(blip_folder), "--image_size", "none", "--bf16", "false"]
    )[0]
    built = build_blip_model(args, ["castle", "island"])
    model, processor = built.model.eval(), built.processor
    assert model.config.answer_list == ["castle", "island"] and model.config.inference == "rank"
    assert float(model.ood.threshold) == 30.0 and model.config.k_test == 128
    inputs = dict(processor(text=QUESTIONS, knowledge=FACTS))
    inputs["pixel_values"] = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with_items = model.encode(**inputs)
        without = model.encode(**{k: v for k, v in inputs.items() if not k.startswith("knowledge")})
    assert with_items.ood_gate.max() < 1e-6
    torch.testing.assert_close(with_items.question_embeds, without.question_embeds, atol=1e-5, rtol=1e-5)
    assert type(processor).__name__ == "VKOODBlipProcessor" and processor.decoder_start_token_id == 30522


def test_resizing_the_image_size_interpolates_the_position_table_as_the_model_would_at_run_time(blip_folder):
    resized = VKOODBlipForQuestionAnswering.from_pretrained(blip_folder).eval()
    original = VKOODBlipForQuestionAnswering.from_pretrained(blip_folder).eval()
    resized.resize_image_size(48)
    pixels = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = original.vision_model(pixels, interpolate_pos_encoding=True).last_hidden_state
        actual = resized.vision_model(pixels).last_hidden_state
    torch.testing.assert_close(actual, expected)
    assert resized.config.vision_config.image_size == 48
    assert resized.vision_model.embeddings.position_embedding.shape[1] == (48 // 8) ** 2 + 1


def test_a_blip_built_from_configs_has_no_pretrained_backbone_and_refuses_lora(minilm_path):
    args = parse_arguments(
        [
            "--task",
            "blip_vqa",
            "--tokenizer_name",
            minilm_path,
            "--finetuning",
            "lora",
            "--vision_config",
            json.dumps(
                {
                    "model_type": "blip_vision_model",
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "image_size": 32,
                    "patch_size": 8,
                }
            ),
            "--text_config",
            json.dumps(
                {
                    "model_type": "blip_text_model",
                    "vocab_size": 30522,
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "encoder_hidden_size": 16,
                    "bos_token_id": 101,
                }
            ),
        ]  # fmt: skip
    )[0]
    built = build_blip_model(args, ["castle"])
    assert built.pretrained_backbones == () and built.processor.decoder_start_token_id == 101
    assert new_parameter_names(built.model, built.pretrained_backbones) == {
        name for name, _ in built.model.named_parameters()
    }
    with pytest.raises(ValueError, match="fine-tune it in full"):
        apply_finetuning(built, args)


def test_full_fine_tuning_trains_only_the_vkood_modules_at_their_own_rate(blip_folder):
    args = parse_arguments(["--task", "blip_vqa", "--init_from", str(blip_folder), "--finetuning", "full"])[0]
    built = build_blip_model(args)
    new = new_parameter_names(apply_finetuning(built, args), built.pretrained_backbones)
    assert {name.split(".")[0] for name in new} == {"knowledge_projection", "ood"}


@pytest.mark.parametrize("name", ["vqav2_blip", "okvqa_blip"])
def test_the_shipped_blip_configs_hold_blips_vqa_fine_tuning_settings(name):
    model, data, _, training = parse_arguments([f"configuration/{name}.yaml", "--bf16", "false"])
    assert data.task == "blip_vqa" and model.init_from == "Salesforce/blip-vqa-base" and model.finetuning == "full"
    assert model.image_size == 480 and training.learning_rate == 2e-5 and training.weight_decay == 0.05
    assert training.per_device_train_batch_size == 16 and training.lr_scheduler_type.value == "cosine"
    assert model.vkood_config["k_test"] == 128 and model.vkood_config["ood_config"]["threshold"] == 30.0
    assert training.ood_alignment == "gate" and training.ood_cross_image_weight > 0 and training.ood_gate_forcing_steps
    if name == "vqav2_blip":
        assert model.vkood_config["inference"] == "rank" and training.num_train_epochs == 10
    else:  # OK-VQA: retrieved ConceptNet items, as okvqa.yaml
        assert data.knowledge == "data/conceptnet.sqlite" and data.dataset == "okvqa"


# ------------------------------------------------------------------------------------------- whole train.py runs


def run(tmp_path, blip_folder, name, inference, *extra):
    """train.py on knowledge-VQA: the embedded default (configuration/knowledge_vqa.yaml) with the tiny BLIP at its own
    32 px, a few steps and rows."""
    output = tmp_path / name
    argv = [
        "--task", "blip_vqa", "--dataset", "knowledge_vqa", "--train_split", "train", "--eval_split", "test",
        "--init_from", str(blip_folder), "--image_size", "none", "--output_dir", str(output),
        "--dataset_cache_dir", str(tmp_path.parent / "blip_built_datasets"), "--check_images", "none",
        "--vkood_config", json.dumps({"max_knowledge_items": 11, "knowledge_max_length": 12, "k_test": 4,
                                      "inference": inference, "ood_config": {"projection_dim": 8, "max_iter": 5}}),
        "--ood_alignment", "gate", "--ood_alignment_weight", "1", "--ood_cross_image_weight", "1",
        "--ood_gate_forcing_steps", "1", "--ood_gate_handover_steps", "1", "--learning_rate", "1e-3",
        "--max_steps", "3", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--max_train_samples", "32", "--max_eval_samples", "8", "--ood_plot_examples", "8", "--eval_strategy", "no",
        "--save_strategy", "no", "--logging_steps", "1", "--dataloader_num_workers", "0",
        "--pixel_cache_size", "64", "--disable_tqdm", "true", "--seed", "3", *extra,
    ]  # fmt: skip
    return output, train.main(argv)


@pytest.fixture(scope="module")
def ranked_run(tmp_path_factory, blip_folder):
    tmp = tmp_path_factory.mktemp("blip_runs")
    return run(tmp, blip_folder, "ranked", "rank", "--finetuning", "full", "--predict_split", "test")


def test_a_full_fine_tuning_run_ranks_over_the_datasets_answers_and_writes_the_server_file(ranked_run):
    output, metrics = ranked_run
    results = read_results(output)
    assert 0.0 <= results["eval_vqa_accuracy"] <= 100.0 and results["train_loss"] > 0 and results["world_size"] == 1
    assert {"ood_auroc_fitting", "ood_kept_fraction_fitting", "ood_kept_fraction_not_fitting"} <= set(results)
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "vkood_blip" and config["inference"] == "rank"
    answers = config["answer_list"]
    assert len(answers) == 16 and "custom_pipelines" in config  # knowledge-VQA's 16 place words
    predictions = json.loads((output / "predictions_test.json").read_text())
    # the predicted split is the evaluated one here, capped at --max_eval_samples
    assert len(predictions) == 8 and {entry["answer"] for entry in predictions} <= set(answers)
    card = (output / "README.md").read_text()
    assert "model.rank_answers(" in card and "eval_vqa_accuracy" in card
    assert (output / "pipeline_vkood.py").is_file() and (output / "modeling_blip_vkood.py").is_file()


def test_the_saved_folder_answers_through_the_vqa_pipeline_by_rank_inference(ranked_run):
    output, _ = ranked_run
    vqa = pipeline("visual-question-answering", model=str(output), trust_remote_code=True)
    answers = vqa(image=rows()[0]["image"], question=QUESTIONS[0], knowledge=FACTS[0], top_k=3)
    assert len(answers) == 3 and {a["answer"] for a in answers} <= set(vqa.model.config.answer_list)


def test_a_lora_run_adapts_blips_attention_generates_answers_and_saves_merged_weights(tmp_path, blip_folder):
    output, metrics = run(
        tmp_path, blip_folder, "lora", "generate", "--finetuning", "lora", "--lora_r", "2", "--lora_alpha", "4"
    )
    assert 0.0 <= metrics["eval_vqa_accuracy"] <= 100.0
    assert not (output / "adapter_config.json").exists()
    saved = VKOODBlipForQuestionAnswering.from_pretrained(output)
    start = VKOODBlipForQuestionAnswering.from_pretrained(blip_folder)
    assert saved.config.inference == "generate"
    changed = {
        name
        for name, tensor in saved.state_dict().items()
        if name in start.state_dict() and not torch.equal(tensor, start.state_dict()[name])
    }
    blip = {name for name in changed if not name.startswith(("knowledge_projection.", "ood."))}
    # LoRA folded into BLIP's attention projections; nothing else of BLIP moved; the VK-OOD modules trained
    assert blip and all(re.search(r"\.(qkv|query|key|value)\.weight$", name) for name in blip)
    assert {"knowledge_projection.weight", "ood.projection.weight"} <= changed
    card = (output / "README.md").read_text()
    assert "LoRA (r=2, alpha=4)" in card and "vision_model, text_encoder, text_decoder" in card
