"""The robustness / low-data training options: MAD (distillation.py), MASD (self_distillation.py), WiSE-FT
(wise_ft.py): each changes the loss or the weights as specified, with LoRA and with full fine-tuning, through
train.py, under 2-process DDP, and across save / load / resume."""

import copy
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from modeling_vkood import VKOODForImagesAndTextClassification, VKOODForQuestionAnswering
from modeling_vkood.training import VKOODTrainer, merged_model
from modeling_vkood.training.distillation import (
    MultimodalAdaptiveDistillation,
    UnimodalTeacher,
    token_distillation_loss,
)
from modeling_vkood.training.self_distillation import (
    ModalityAugmentedSelfDistillation,
    augment_modalities,
    self_distillation_loss,
)
from modeling_vkood.training.wise_ft import pretrained_state, wise_ft
from tests.utils.generated_data import write_easy_vqa
from tests.utils.paths import REPO_ROOT
from tests.utils.tiny import TinyVQARows, stack, tiny_batch, tiny_vkood_config
from tests.utils.train_script import read_results, tiny_config, train

BOTH = ["vision_model", "text_model"]


def tiny_model(finetuning="lora", pretrained=BOTH, seed=0, deterministic=False):
    """`deterministic`: no dropout anywhere and a fixed EM step count, so the forward does not depend on how the
    examples are grouped into batches (as tests/test_loss_contract.py's config)."""
    settings = (
        dict(
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            classifier_dropout=0.0,
            ood_config=dict(tol=1e-30, max_iter=8),
        )
        if deterministic
        else {}
    )
    config = tiny_vkood_config(num_labels=5, pretrained_backbones=list(pretrained), **settings)
    if deterministic:
        config.text_config.hidden_dropout_prob = config.text_config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(seed)
    model = VKOODForQuestionAnswering(config)
    if finetuning == "full":
        return model
    lora = LoraConfig(r=2, target_modules=model.lora_target_modules(), modules_to_save=model.modules_to_save())
    return get_peft_model(model, lora)


@torch.no_grad()
def pretend_training(model, seed=1):
    """Move every trainable weight (LoRA B matrices included: they start at 0) as training would."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


# ---------------------------------------------------------------------------------------------- MAD


def test_token_distillation_is_zero_for_the_teacher_itself_positive_otherwise_and_differentiates_the_student_only():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 6, 8, generator=generator)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 3:] = 0  # padded tokens
    assert token_distillation_loss(teacher.clone(), teacher, mask, 0.5, 0.05).abs() < 1e-6
    teacher.requires_grad_(True)
    student = (teacher.detach() + torch.randn(4, 6, 8, generator=generator)).requires_grad_(True)
    loss = token_distillation_loss(student, teacher, mask, 0.5, 0.05)
    assert loss > 0.01
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    # padded tokens never count
    assert student.grad[1, 3:].abs().sum() == 0


def test_token_distillation_takes_the_most_salient_tokens_weighted_by_the_teachers_confidence():
    """Example 0: tokens a, a, b (close to a) and an outlier; with token_fraction 1/2 the two a's, the closest to the
    mean, are the ones distilled. Example 1: all tokens alike: confidence 0, nothing distilled."""
    a, b, outlier = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.3, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    teacher = torch.stack([torch.stack([a, a, b, outlier]), a.expand(4, 3)])
    mask = torch.ones(2, 4)

    def loss_with(example, token):
        student = teacher.clone()
        student[example, token] = -student[example, token]
        return token_distillation_loss(student, teacher, mask, 0.5, 0.05)

    assert loss_with(0, 0) > 0.05 and loss_with(0, 1) > 0.05
    assert loss_with(0, 2).abs() < 1e-6 and loss_with(0, 3).abs() < 1e-6  # not selected
    assert loss_with(1, 0).abs() < 1e-6  # confidence 0


@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_mad_teacher_is_the_initial_encoders_whatever_training_does(finetuning):
    model = tiny_model(finetuning)
    batch = tiny_batch()
    teacher = UnimodalTeacher(model)
    assert teacher.sides == ("text_model", "vision_model")
    base = (model.get_base_model() if finetuning == "lora" else model).vkood
    model.eval()
    with torch.no_grad():
        initial = {
            "text_model": base.encode_text(batch["input_ids"], batch["attention_mask"]),
            "vision_model": base.encode_image(batch["pixel_values"]),
        }
    pretend_training(model)
    model.train()
    tokens = teacher.tokens(model, batch)
    assert model.training and base.training  # the teacher ran in eval mode and left the mode as it was
    for side, expected in initial.items():
        torch.testing.assert_close(tokens[side], expected, rtol=0, atol=1e-6, msg=side)
    with torch.no_grad():
        assert not torch.allclose(base.encode_text(batch["input_ids"], batch["attention_mask"]), initial["text_model"])


@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_mad_loss_trains_the_student_and_never_the_teacher(finetuning):
    model = tiny_model(finetuning)
    mad = MultimodalAdaptiveDistillation(UnimodalTeacher(model), weight=1.0)
    batch = tiny_batch()
    outputs = model(**batch, output_hidden_states=True)
    loss = mad(model, outputs, batch, unwrapped=model)
    assert loss > 0
    loss.backward()
    fusion = [p for n, p in model.named_parameters() if "fusion_layers" in n and p.requires_grad]
    assert fusion and all(p.grad is not None for p in fusion)
    frozen = [] if finetuning == "lora" else [p for m in mad.teacher.frozen.values() for p in m.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    if finetuning == "lora":  # the teacher is the frozen base: no gradient reaches a base weight
        assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    else:
        assert len(frozen) > 0


def test_mad_distils_only_pretrained_backbones_and_refuses_a_model_without_any():
    assert UnimodalTeacher(tiny_model("full", pretrained=["text_model"])).sides == ("text_model",)
    with pytest.raises(ValueError, match="pretrained unimodal encoders"):
        UnimodalTeacher(tiny_model("full", pretrained=[]))


# ---------------------------------------------------------------------------------------------- MASD


def test_self_distillation_is_zero_for_equal_predictions_and_trains_only_the_augmented_pass():
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(5, 7, generator=generator).requires_grad_(True)
    assert self_distillation_loss(full.detach() + 3.0, full, temperature=2.0).abs() < 1e-6  # shift: same softmax
    augmented = torch.randn(5, 7, generator=generator).requires_grad_(True)
    loss = self_distillation_loss(augmented, full, temperature=2.0)
    assert loss > 0
    loss.backward()
    assert full.grad is None and augmented.grad.abs().sum() > 0

    fixed = torch.randn(3, 5, generator=generator)
    constant_model = lambda **inputs: SimpleNamespace(logits=fixed)  # noqa: E731 - predicts the same whatever it sees
    term = ModalityAugmentedSelfDistillation(weight=1.0)
    assert term(constant_model, SimpleNamespace(logits=fixed), tiny_batch()) == 0


def test_each_modality_augmentation_removes_what_it_names_and_leaves_the_batch_alone():
    batch = tiny_batch(batch_size=4)
    kept = {key: value.clone() for key, value in batch.items()}
    image = augment_modalities(batch, ["image"])
    assert (image["pixel_values"] == 0).all() and torch.equal(image["attention_mask"], batch["attention_mask"])
    question = augment_modalities(batch, ["question"])
    assert question["attention_mask"][:, 0].all() and not question["attention_mask"][:, 1:].any()
    shortened = augment_modalities(batch, ["shorten"], generator=torch.Generator().manual_seed(0))
    dropped = (shortened["attention_mask"] == 0).sum().item()
    assert shortened["attention_mask"][:, 0].all() and 0 < dropped < batch["attention_mask"][:, 1:].numel()
    knowledge = augment_modalities(batch, ["knowledge"])
    assert not knowledge["knowledge_mask"].any() and not knowledge["knowledge_attention_mask"].any()
    assert torch.equal(knowledge["pixel_values"], batch["pixel_values"])
    mixed = augment_modalities(batch, ["image", "knowledge"], generator=torch.Generator().manual_seed(3))
    blank = (mixed["pixel_values"] == 0).flatten(1).all(-1)
    no_knowledge = ~mixed["knowledge_attention_mask"].flatten(1).any(-1)
    assert torch.equal(blank | no_knowledge, torch.ones(4, dtype=torch.bool))  # each example got one of the two
    assert all(torch.equal(batch[key], kept[key]) for key in kept)
    with pytest.raises(ValueError, match="masd_augmentations"):
        augment_modalities(batch, ["audio"])


@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_masd_term_of_a_real_model_is_positive_and_differentiable(finetuning):
    model = tiny_model(finetuning)
    batch = tiny_batch()
    outputs = model(**batch)
    loss = ModalityAugmentedSelfDistillation(weight=1.0, augmentations=["image"])(model, outputs, batch)
    assert loss > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_masd_runs_on_the_nlvr2_head_and_removes_relevance_labels_with_the_knowledge():
    torch.manual_seed(0)
    model = VKOODForImagesAndTextClassification(tiny_vkood_config(num_labels=2))
    batch = tiny_batch(pairs=True)
    blank = augment_modalities(batch, ["image"])
    assert blank["pixel_values"].shape == batch["pixel_values"].shape and not blank["pixel_values"].any()
    loss = ModalityAugmentedSelfDistillation(weight=1.0, augmentations=["image"])(model, model(**batch), batch)
    assert loss > 0
    relevance = {**tiny_batch(), "knowledge_relevance": torch.ones(3, 4)}
    assert not augment_modalities(relevance, ["knowledge"])["knowledge_relevance"].any()
    assert augment_modalities(relevance, ["image"])["knowledge_relevance"].all()  # kept: gate forcing sees it


def test_train_py_refuses_options_a_task_cannot_take():
    common = dict(ood_alignment_weight=0.0, device="cpu")
    arguments = SimpleNamespace(**common, mad_weight=1.0, masd_weight=0.0, mad_temperature=0.05, mad_token_fraction=0.5)
    with pytest.raises(ValueError, match="MAD distils into the VQA head"):
        train.extra_losses(tiny_model("full"), arguments, "nlvr2")
    arguments = SimpleNamespace(
        **common, mad_weight=0.0, masd_weight=1.0, masd_temperature=1.0, masd_augmentations=["image"]
    )
    with pytest.raises(ValueError, match="MASD distils a classifier"):
        train.extra_losses(tiny_model("full"), arguments, "retrieval")
    assert len(train.extra_losses(tiny_model("full"), arguments, "nlvr2")) == 1
    alignment = SimpleNamespace(**{**vars(arguments), "masd_weight": 0.0, "ood_alignment_weight": 1.0})
    with pytest.raises(ValueError, match="OOD alignment trains the VQA, NLVR2 and generative heads"):
        train.extra_losses(tiny_model("full"), alignment, "retrieval")


# ---------------------------------------------------------------------------------------------- WiSE-FT


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.slow
@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_wise_ft_gives_the_endpoints_exactly_at_alpha_0_and_1(finetuning, tmp_path):
    model = tiny_model(finetuning)
    initial = pretrained_state(model)
    pretend_training(model)
    batch = tiny_batch()
    finetuned = merged_model(copy.deepcopy(model))
    start = copy.deepcopy(finetuned)  # theta_0: the pretrained backbones as they were, the new modules fine-tuned
    assert start.load_state_dict(initial, strict=False).unexpected_keys == []
    assert not torch.allclose(logits(start, batch), logits(finetuned, batch))
    at_one = merged_model(wise_ft(copy.deepcopy(model), 1.0, initial))
    at_zero = merged_model(wise_ft(copy.deepcopy(model), 0.0, initial))
    assert torch.equal(logits(at_one, batch), logits(finetuned, batch))
    assert torch.equal(logits(at_zero, batch), logits(start, batch))
    half = merged_model(wise_ft(copy.deepcopy(model), 0.5, initial))
    name = next(n for n in initial if n.endswith("query.weight"))
    middle = (initial[name] + finetuned.state_dict()[name]) / 2
    torch.testing.assert_close(half.state_dict()[name], middle, rtol=1e-5, atol=1e-6)
    new_modules = [k for k in finetuned.state_dict() if k.startswith(("classifier", "vkood.fusion_layers"))]
    assert new_modules and all(torch.equal(half.state_dict()[k], finetuned.state_dict()[k]) for k in new_modules)
    half.save_pretrained(tmp_path / "wise")
    reloaded = VKOODForQuestionAnswering.from_pretrained(tmp_path / "wise")
    assert torch.equal(logits(reloaded, batch), logits(half, batch))


def test_wise_ft_refuses_an_alpha_outside_0_1_and_a_full_model_without_initial_weights():
    with pytest.raises(ValueError, match="wise_ft_alpha"):
        wise_ft(tiny_model("lora"), 1.5)
    with pytest.raises(ValueError, match="initial weights"):
        wise_ft(tiny_model("full"), 0.5)


# ---------------------------------------------------------------------------------------------- through train.py


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("training_options")


@pytest.fixture(scope="module")
def easy_vqa_root(workdir):
    return write_easy_vqa(workdir / "easy_vqa")


def options_config(workdir, tiny_text_model, easy_vqa_root, **overrides):
    deterministic = {
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout": 0.0,
    }
    config = tiny_config(
        workdir,
        tiny_text_model,
        task="vqa",
        dataset="easy_vqa",
        dataset_root=str(easy_vqa_root),
        eval_split="test",
        backbone_dropout=0.0,
        mad_weight=1.0,
        masd_weight=1.0,
        **overrides,
    )
    values = yaml.safe_load(config.read_text())
    values["vkood_config"].update(deterministic)
    values["vkood_config"]["ood_config"]["tol"] = 1e-30
    config.write_text(yaml.safe_dump(values))
    return config


def first_step(output):
    state = json.loads((output / "trainer_state.json").read_text())
    return next(entry for entry in state["log_history"] if entry.get("step") == 1 and "loss" in entry)


@pytest.mark.slow
@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_a_run_with_mad_masd_and_wise_ft_resumes_to_the_weights_of_an_uninterrupted_run(
    finetuning, workdir, tiny_text_model, easy_vqa_root
):
    """The tiny run's vision encoder is built from a config: MAD distils the (pretrained) text side only. The MAD
    teacher of a resumed full fine-tuning run must still be the initial text encoder, and the MASD draws continue
    from the restored RNG, so the resumed run ends where the uninterrupted one does."""
    config = options_config(
        workdir,
        tiny_text_model,
        easy_vqa_root,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        do_eval=False,
        finetuning=finetuning,
        wise_ft_alpha=0.5,
        train_fraction=0.5,
    )
    straight, resumed = workdir / f"straight_{finetuning}", workdir / f"resumed_{finetuning}"
    baseline = workdir / f"baseline_{finetuning}"
    results = train.main([str(config), "--output_dir", str(straight)])
    assert results["wise_ft_alpha"] == 0.5
    train.main([str(config), "--output_dir", str(resumed), "--resume_from_checkpoint", str(straight / "checkpoint-2")])
    expected, actual = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)
    train.main(
        [
            str(config),
            "--output_dir",
            str(baseline),
            "--mad_weight",
            "0",
            "--masd_weight",
            "0",
            "--max_steps",
            "1",
            "--save_strategy",
            "no",
        ]
    )
    assert first_step(straight)["loss"] > first_step(baseline)["loss"]  # the two terms were added
    state = json.loads((straight / "trainer_state.json").read_text())
    assert state["log_history"][-1]["train_runtime"] > 0
    card = (straight / "README.md").read_text()
    assert "| wise_ft_alpha | 0.5 |" in card and "| train_fraction | 0.5 |" in card


def test_train_fraction_keeps_the_same_rows_whatever_the_seed(workdir, tiny_text_model, easy_vqa_root):
    from modeling_vkood.training import load_splits, parse_arguments

    config = options_config(workdir, tiny_text_model, easy_vqa_root, train_fraction=0.25)
    rows = []
    for seed in (1, 2):
        _, data_args, _, _ = parse_arguments([str(config), "--seed", str(seed)])
        rows.append(load_splits(data_args, ["train"])["train"]["question_id"])
    assert rows[0] == rows[1] and len(rows[0]) == 9  # round(0.25 * 36)


@pytest.mark.slow
@pytest.mark.distributed
def test_mad_and_masd_on_2_ddp_processes_give_the_loss_of_one_process_on_the_same_global_batch(
    workdir, tiny_text_model, easy_vqa_root
):
    """MASD with the image augmentation only (deterministic) and MAD: 2 x 4 examples under
    configuration/accelerate/ddp.yaml give the first-step loss and gradient norm of 1 x 8."""
    config = options_config(
        workdir, tiny_text_model, easy_vqa_root, max_steps=1, do_eval=False, masd_augmentations=["image"]
    )
    single, multi = workdir / "options_single", workdir / "options_ddp"
    train.main([str(config), "--per_device_train_batch_size", "8", "--output_dir", str(single)])
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
        str(REPO_ROOT / "configuration" / "accelerate" / "ddp.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        str(REPO_ROOT / "train.py"),
        str(config),
        "--per_device_train_batch_size",
        "4",
        "--output_dir",
        str(multi),
    ]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (read_results(single)["world_size"], read_results(multi)["world_size"]) == (1, 2)
    assert first_step(multi)["loss"] == pytest.approx(first_step(single)["loss"], rel=1e-4)
    assert first_step(multi)["grad_norm"] == pytest.approx(first_step(single)["grad_norm"], rel=1e-3)


@pytest.mark.slow
def test_options_through_the_trainer_keep_the_loss_contract_under_gradient_accumulation(tmp_path):
    """MAD + MASD (image only: deterministic) with 2 x 4 accumulated give the gradient of one batch of 8."""

    def gradients(per_device_batch, accumulation):
        model = tiny_model("full", deterministic=True)
        terms = [
            MultimodalAdaptiveDistillation(UnimodalTeacher(model), 1.0),
            ModalityAugmentedSelfDistillation(1.0, augmentations=["image"]),
        ]
        recorded = {}

        class Recorder(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                recorded.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

        args = TrainingArguments(
            output_dir=str(tmp_path / f"ga{accumulation}"),
            max_steps=1,
            per_device_train_batch_size=per_device_batch,
            gradient_accumulation_steps=accumulation,
            max_grad_norm=1e9,
            remove_unused_columns=False,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
            seed=0,
        )
        VKOODTrainer(
            model=model,
            args=args,
            train_dataset=TinyVQARows(8, seed=3),
            data_collator=stack,
            callbacks=[Recorder()],
            extra_losses=terms,
        ).train()
        return recorded

    one, accumulated = gradients(8, 1), gradients(4, 2)
    assert one.keys() == accumulated.keys() and len(one) > 50
    for name, gradient in one.items():
        torch.testing.assert_close(accumulated[name], gradient, rtol=1e-3, atol=1e-5, msg=name)
