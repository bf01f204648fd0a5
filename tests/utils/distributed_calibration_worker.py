"""One rank of the tau-calibration check, started by `accelerate launch` from tests/test_loss_contract.py.

    accelerate launch --config_file configuration/accelerate/ddp.yaml --num_processes 2 \
        tests/utils/distributed_calibration_worker.py OUTPUT_DIR

Trains a tiny VQA model for one optimizer step with VKOODTrainer under the launcher's mixed precision and writes
rank<k>.json: the world size this rank saw, tau right after calibration (on_train_begin, when the optimizer and the
wrappers exist) and tau after the first optimizer step.
"""

import json
import sys
from pathlib import Path

if not __package__:  # run as a script: import the helpers as tests.utils.*, from the repository root, not this folder
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parents[1]), *(p for p in sys.path if Path(p or ".").resolve() != _here)]

import torch
from transformers import TrainerCallback, TrainingArguments

from modeling_vkood import VKOODForQuestionAnswering
from modeling_vkood.training import VKOODTrainer
from tests.utils.tiny import TinyVQARows, stack, tiny_vkood_config

CALIBRATION_QUANTILE = 0.2
LEARNING_RATE = 1e-3


def tiny_model():
    torch.manual_seed(0)
    return VKOODForQuestionAnswering(tiny_vkood_config(num_labels=5))


def training_arguments(output_dir, per_device_batch, **overrides):
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=1,
        per_device_train_batch_size=per_device_batch,
        learning_rate=LEARNING_RATE,
        weight_decay=0.0,
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        seed=0,
        disable_tqdm=True,
        **overrides,
    )


def threshold(model) -> float:
    """tau of the model's OOD layer, whole (under FSDP2 the parameter is a sharded DTensor: gathered)."""
    parameter = next(p for name, p in model.named_parameters() if name.endswith("ood.threshold"))
    parameter = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
    return float(parameter.detach().float())


class ThresholdRecorder(TrainerCallback):
    def __init__(self):
        self.record = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.record.update(
            world_size=args.world_size,
            parallel_mode=str(args.parallel_mode),
            mixed_precision=args.mixed_precision,
            tau_at_train_begin=threshold(model),
        )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            self.record["tau_after_first_step"] = threshold(model)


def main(output_dir: Path):
    recorder = ThresholdRecorder()
    trainer = VKOODTrainer(
        model=tiny_model(),
        args=training_arguments(output_dir, per_device_batch=4),
        train_dataset=TinyVQARows(8, seed=3),
        data_collator=stack,
        callbacks=[recorder],
        ood_calibration_quantile=CALIBRATION_QUANTILE,
    )
    trainer.train()
    record = {**recorder.record, "distributed_type": trainer.accelerator.distributed_type.value}
    (output_dir / f"rank{trainer.args.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
