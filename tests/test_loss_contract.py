"""The Trainer/loss contract: the heads return a loss averaged over their batch, so gradient accumulation and the
number of processes never rescale it (DESIGN section 7)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback, TrainingArguments

from modeling_vkood import VKOODForImagesAndTextClassification, VKOODForImageTextRetrieval, VKOODForQuestionAnswering
from modeling_vkood.training import VKOODTrainer
from tests.utils.paths import REPO_ROOT
from tests.utils.tiny import TinyVQARows, stack, tiny_batch, tiny_vkood_config


def deterministic_config(**overrides):
    """A tiny config whose forward does not depend on how examples are grouped into batches: no dropout anywhere,
    and EM always runs `ood_max_iter` steps (each example is frozen once it converges, but a rounding difference
    between a batch of 8 and its halves could otherwise move that step)."""
    settings = dict(
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
        ood_config=dict(tol=1e-30, max_iter=8),
        **overrides,
    )
    config = tiny_vkood_config(**settings)
    config.text_config.hidden_dropout_prob = config.text_config.attention_probs_dropout_prob = 0.0
    return config


class GradientRecorder(TrainerCallback):
    """Keeps the accumulated gradient of every trainable parameter just before the first optimizer step."""

    def __init__(self):
        self.gradients = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.gradients is None:
            self.gradients = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def first_step_gradients(tmp_path, per_device_batch, accumulation):
    torch.manual_seed(0)
    model = VKOODForQuestionAnswering(deterministic_config(num_labels=5))
    recorder = GradientRecorder()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"ga{accumulation}"),
        max_steps=1,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-3,
        max_grad_norm=1e9,
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        seed=0,
    )
    trainer = VKOODTrainer(
        model=model,
        args=args,
        train_dataset=TinyVQARows(8, seed=3),
        data_collator=stack,
        callbacks=[recorder],
        ood_calibration_quantile=None,  # tau as configured: the gradients alone are compared
    )
    trainer.train()
    return recorder.gradients


def test_gradient_accumulation_2x4_gives_the_gradient_of_one_batch_of_8(tmp_path):
    one_batch = first_step_gradients(tmp_path, per_device_batch=8, accumulation=1)
    accumulated = first_step_gradients(tmp_path, per_device_batch=4, accumulation=2)
    assert one_batch.keys() == accumulated.keys() and len(one_batch) > 50
    norm = lambda grads: torch.sqrt(sum(g.double().square().sum() for g in grads.values()))  # noqa: E731
    assert norm(accumulated) / norm(one_batch) == pytest.approx(1.0, abs=1e-5)
    for name, gradient in one_batch.items():
        torch.testing.assert_close(accumulated[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "head", [VKOODForQuestionAnswering, VKOODForImagesAndTextClassification, VKOODForImageTextRetrieval]
)
def test_every_head_declares_its_loss_batch_averaged_also_under_peft_and_rejects_unknown_arguments(head, tmp_path):
    model = head(tiny_vkood_config(num_labels=2, pretrained_backbones=["vision_model", "text_model"]))
    lora = LoraConfig(r=2, target_modules=model.lora_target_modules(), modules_to_save=model.modules_to_save())
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    for wrapped in (model, get_peft_model(model, lora)):
        assert VKOODTrainer(model=wrapped, args=args).model_accepts_loss_kwargs is False
    with pytest.raises(TypeError, match="num_items_in_batch"):
        model(**tiny_batch(pairs=head is VKOODForImagesAndTextClassification), num_items_in_batch=8)


def launch(accelerate_config: str, script: Path, *arguments, processes=2) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configuration/accelerate/<config> --num_processes 2 script ...` on CPU."""
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
        str(processes),
        str(script),
        *map(str, arguments),
    ]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.distributed
def test_tau_is_calibrated_alike_on_every_rank_and_kept_by_the_first_bf16_step(tmp_path):
    """ddp.yaml as shipped (bf16 mixed precision), two gloo ranks of 4 examples each."""
    from tests.utils import distributed_calibration_worker as worker

    proc = launch("ddp.yaml", Path(worker.__file__), tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert {(r["world_size"], r["distributed_type"], r["mixed_precision"]) for r in ranks} == {(2, "MULTI_CPU", "bf16")}
    assert ranks[0]["tau_at_train_begin"] == ranks[1]["tau_at_train_begin"]
    assert ranks[0]["tau_after_first_step"] == ranks[1]["tau_after_first_step"]

    # One process on the same 8 examples calibrates to the same tau.
    args = worker.training_arguments(tmp_path / "single", per_device_batch=8, bf16=True)
    single = VKOODTrainer(
        model=worker.tiny_model(),
        args=args,
        train_dataset=TinyVQARows(8, seed=3),
        data_collator=stack,
        ood_calibration_quantile=worker.CALIBRATION_QUANTILE,
    ).calibrate_ood_threshold()
    tau = ranks[0]["tau_at_train_begin"]
    assert tau == pytest.approx(single, abs=2e-2) and abs(tau - tiny_vkood_config().ood_config.threshold) > 0.1
    # The first AdamW step moves a parameter by at most the learning rate: tau was not reset to its initial value.
    assert 0 < abs(ranks[0]["tau_after_first_step"] - tau) <= worker.LEARNING_RATE * 1.001
