"""Evaluation outside the Trainer's own loop runs under the run's autocast: in a `--bf16` run the OOD threshold
calibration, the generative evaluation (`generate_answers`) and `collect_ood_scores` call the model with CPU bf16
autocast on, as the Trainer's evaluation does; in an fp32 run with it off."""

import pytest
import torch
from transformers import TrainingArguments

from modeling_vkood import VKOODForConditionalGeneration, VKOODForQuestionAnswering
from modeling_vkood.training import VKOODTrainer, collect_ood_scores
from tests.utils.tiny import TinyVQARows, stack, tiny_batch, tiny_decoder_config, tiny_vkood_config


class Rows(TinyVQARows):
    """`TinyVQARows` with the `select` of a datasets.Dataset (what `collect_ood_scores` takes)."""

    def select(self, indices):
        subset = Rows.__new__(Rows)
        subset.rows = [self.rows[i] for i in indices]
        return subset


class QuestionsOnly:
    """Rows of `tiny_batch` without labels, for generation; its collator stacks them and decodes dummy answers."""

    def __init__(self, size):
        batch = tiny_batch(batch_size=size)
        self.rows = [{key: value[i] for key, value in batch.items()} for i in range(size)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


class GenerationCollator:
    class processor:  # noqa: N801 - the attribute `generate_texts` reads
        @staticmethod
        def decode_answers(sequences):
            return ["answer"] * len(sequences)

    def __call__(self, rows):
        return stack(rows)


def record_autocast(*modules):
    """Forward pre-hooks noting whether CPU autocast is on (and at which dtype) each time a module runs."""
    seen = []

    def hook(module, args):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    for module in modules:
        module.register_forward_pre_hook(hook)
    return seen


def arguments(tmp_path, bf16):
    return TrainingArguments(
        output_dir=str(tmp_path),
        bf16=bf16,
        use_cpu=True,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=2,
        report_to=[],
        seed=0,
    )


@pytest.mark.parametrize("bf16", [True, False])
def test_calibration_and_collected_ood_scores_run_under_the_runs_autocast(tmp_path, bf16):
    torch.manual_seed(0)
    model = VKOODForQuestionAnswering(tiny_vkood_config(num_labels=5))
    seen = record_autocast(model.vkood, model.vkood.ood)
    trainer = VKOODTrainer(model=model, args=arguments(tmp_path, bf16), train_dataset=Rows(4), data_collator=stack)
    assert trainer.calibrate_ood_threshold() is not None
    assert seen and {enabled for enabled, _ in seen} == {bf16}
    assert {dtype for _, dtype in seen} == {torch.bfloat16}

    seen.clear()
    ood = collect_ood_scores(
        model, Rows(5), stack, batch_size=2, max_examples=4, device="cpu", accelerator=trainer.accelerator
    )
    assert len(ood["scores"]) and ood["scores"].dtype == torch.float32  # handed back in fp32 for the plots
    assert seen and {enabled for enabled, _ in seen} == {bf16}
    seen.clear()
    collect_ood_scores(model, Rows(5), stack, batch_size=2, max_examples=4, device="cpu")  # no accelerator: as called
    assert seen and not any(enabled for enabled, _ in seen)


@pytest.mark.parametrize("bf16", [True, False])
def test_generated_answers_are_evaluated_under_the_runs_autocast(tmp_path, bf16):
    torch.manual_seed(0)
    model = VKOODForConditionalGeneration(tiny_vkood_config(decoder_config=tiny_decoder_config()))
    seen = record_autocast(model.vkood, model.text_decoder)
    trainer = VKOODTrainer(
        model=model,
        args=arguments(tmp_path, bf16),
        generation={"collator": GenerationCollator(), "max_new_tokens": 3, "num_beams": 1},
    )
    assert trainer.generate_answers(QuestionsOnly(3)) == ["answer"] * 3
    assert seen and {enabled for enabled, _ in seen} == {bf16}
    assert not torch.is_autocast_enabled("cpu")  # left as it was
