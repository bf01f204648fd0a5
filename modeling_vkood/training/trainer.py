"""The Trainer used by train.py: two learning rates, OOD threshold calibration before training, retrieval evaluated
over the whole gallery, OOD diagnostics.

Newly initialised modules (fusion, OOD layer, heads, a backbone trained from scratch) learn at
`new_modules_learning_rate`, the LoRA adapters (or pretrained backbone weights) at `learning_rate`: adapters of a
pretrained encoder want a small step, random weights a large one.
"""

import contextlib

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset, WeightedRandomSampler
from transformers import Trainer
from transformers.utils import logging

from ..ood_vkood import ImplicitOODLayer
from .generation_eval import generate_texts, generated_vqa_metrics
from .ood_objectives import calibrate_threshold, capture_ood_outputs
from .retrieval_eval import evaluate_retrieval

logger = logging.get_logger(__name__)


class VKOODTrainer(Trainer):
    """Trainer with per-group learning rates; for retrieval, `evaluate` runs the two-stage gallery protocol."""

    def __init__(
        self,
        *args,
        new_parameters=frozenset(),
        new_modules_learning_rate=None,
        retrieval=None,
        balance_by=None,
        ood_threshold_learning_rate=None,
        extra_losses=(),
        generation=None,
        gate_forcing=None,
        ood_calibration_quantile=0.1,
        **kwargs,
    ):
        """`ood_threshold_learning_rate`: the OOD threshold's own learning rate (no weight decay); None: as the
        other new modules. `retrieval`: dict of `evaluate_retrieval` arguments (pixels, processor, knowledge_base,
        max_knowledge_items, k_test) for a retrieval run; None for VQA and NLVR2. `balance_by`: a training column
        whose values are drawn equally often. `extra_losses`: training-only loss terms added to the head's loss
        (`MultimodalAdaptiveDistillation`, `ModalityAugmentedSelfDistillation`, `OODAlignmentLoss`): callables (model,
        outputs, batch, unwrapped=) -> a batch-averaged scalar; one with `needs_hidden_states` gets the forward's
        hidden states, one with `needs_ood_outputs` also `ood_outputs=`, the OOD layer calls of the forward
        (`capture_ood_outputs`). `gate_forcing`: a `GateForcingSchedule`: while its share of the step is above 0,
        training batches that hold `knowledge_relevance` are forwarded with `gate_forcing=share`.
        `ood_calibration_quantile`: the quantile of the first step's scores that an uncalibrated OOD layer's tau
        starts at (`calibrate_threshold`); None: no calibration. `generation`: for the
        generative head answering questions, dict of `generate_texts` arguments (collator without targets,
        max_new_tokens, num_beams): `evaluate` adds the official VQA accuracy of the generated answers to the
        evaluation loss."""
        super().__init__(*args, **kwargs)
        self.extra_losses = tuple(extra_losses)
        self.new_parameters = set(new_parameters)
        self.new_modules_learning_rate = new_modules_learning_rate or self.args.learning_rate
        self.ood_threshold_learning_rate = ood_threshold_learning_rate
        self.retrieval = retrieval
        self.balance_by = balance_by
        self.generation = generation
        self.gate_forcing = gate_forcing
        self.ood_calibration_quantile = ood_calibration_quantile

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        """Calibrate the OOD threshold, then train. A resumed run takes tau from its checkpoint."""
        if not resume_from_checkpoint:
            self.calibrate_ood_threshold()
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)

    def calibrate_ood_threshold(self) -> float | None:
        """Set tau of an uncalibrated OOD layer from the model's scores on the examples of one optimizer step.

        Runs before the optimizer and the DDP/FSDP/DeepSpeed wrappers exist, so the optimizer (and a mixed-precision
        master copy) starts from the calibrated value instead of overwriting it. The examples are
        `per_device_train_batch_size x gradient_accumulation_steps x world_size` rows drawn with the run's seed
        (the global RNG is not touched), split over the ranks; every rank joins the collective, also one that got
        no row or no real item. The same global batch thus gives the same tau whatever the number of processes or
        the accumulation. The model is run in eval mode (no dropout) under the run's autocast. Returns tau (None when
        nothing was calibrated).
        """
        layers = [m for m in self.model.modules() if isinstance(m, ImplicitOODLayer) and m.needs_calibration]
        if not layers or self.train_dataset is None or self.ood_calibration_quantile is None:
            return None
        if not hasattr(self.train_dataset, "__len__"):
            logger.warning("OOD threshold not calibrated: the training set has no length (an iterable dataset)")
            return None
        args = self.args
        count = min(
            len(self.train_dataset),
            args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        )
        drawn = torch.randperm(len(self.train_dataset), generator=torch.Generator().manual_seed(args.seed))[:count]
        rows = Subset(self.train_dataset, drawn[args.process_index :: args.world_size].tolist())
        batches = DataLoader(rows, batch_size=args.per_device_train_batch_size, collate_fn=self.data_collator)
        with self.accelerator.autocast():
            scores = ood_scores(self.model, batches, next(self.model.parameters()).device)["scores"]
        # One OOD layer per model; PEFT's modules_to_save holds a trained copy next to the original: both get tau.
        scores = scores.to(args.device)
        thresholds = {calibrate_threshold(layer, scores, self.ood_calibration_quantile) for layer in layers}
        return thresholds.pop()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The head's loss plus, in training, each of `extra_losses`; in training under a gate-forcing schedule, the
        batch is forwarded with the step's `gate_forcing` share. Every term is a mean over this batch, like the
        head's loss, so the sum keeps the loss contract: the Trainer divides it by the accumulation steps only."""
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        share = self.gate_forcing(self.state.global_step) if self.gate_forcing is not None else 0.0
        if share > 0 and "knowledge_relevance" in inputs:
            # a tensor, not a float: a compiled model does not specialise on each value of the schedule
            inputs = {**inputs, "gate_forcing": torch.tensor(share)}
        if not self.extra_losses:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        hidden = any(getattr(term, "needs_hidden_states", False) for term in self.extra_losses)
        unwrapped = self.accelerator.unwrap_model(model)
        with capture_ood_outputs(unwrapped) as ood_outputs:  # the forward's calls only, not the terms' own passes
            loss, outputs = super().compute_loss(
                model,
                {**inputs, "output_hidden_states": True} if hidden else inputs,
                return_outputs=True,
                num_items_in_batch=num_items_in_batch,
            )
        for term in self.extra_losses:
            # The student passes go through `model` (DDP-wrapped: its gradients are synchronised); a teacher uses
            # the unwrapped module under no_grad.
            extra = {"ood_outputs": ood_outputs} if getattr(term, "needs_ood_outputs", False) else {}
            loss = loss + term(model, outputs, inputs, unwrapped=unwrapped, **extra)
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        if self.balance_by is None:
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.balance_by not in dataset.column_names:
            raise ValueError(f"balance_by: the training set has no column {self.balance_by!r}")
        _, groups, counts = np.unique(np.asarray(dataset[self.balance_by]), return_inverse=True, return_counts=True)
        weights = torch.from_numpy(1.0 / counts[groups])
        generator = torch.Generator().manual_seed(self.args.seed)
        return WeightedRandomSampler(weights, num_samples=len(dataset), replacement=True, generator=generator)

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        # tau of every OOD layer (under PEFT, the trained modules_to_save copy and the frozen original)
        thresholds = {id(m.threshold) for m in model.modules() if isinstance(m, ImplicitOODLayer)}
        groups = {}
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            new = name in self.new_parameters
            threshold = self.ood_threshold_learning_rate is not None and id(parameter) in thresholds
            key = ("threshold",) if threshold else (new, name in decay)
            if key not in groups:
                groups[key] = {
                    "params": [],
                    "lr": self.ood_threshold_learning_rate
                    if threshold
                    else self.new_modules_learning_rate
                    if new
                    else self.args.learning_rate,
                    "weight_decay": self.args.weight_decay if name in decay and not threshold else 0.0,
                }
            groups[key]["params"].append(parameter)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(list(groups.values()), **optimizer_kwargs)
        return self.optimizer

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss as the Trainer computes it, but only (B,) integers go on to be gathered across processes: the
        predicted class (`predicted_class`, the `preprocess_logits_for_metrics`) and, for VQA's dense (B, vocabulary)
        soft scores, the best-scored answer instead of the scores. The metrics read the references from the
        evaluation dataset; gathering the dense scores would cost N x vocabulary floats per rank (2.7 GB on VQAv2
        val)."""
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        if labels is not None and labels.dim() > 1:
            labels = labels.argmax(-1)
        return loss, logits, labels

    def create_model_card(self, *args, **kwargs):
        """Keep the vkood card that `save_output_folder` wrote: `push_to_hub` would replace it by a generic one."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if self.generation is not None:
            return self._evaluate_generation(eval_dataset, ignore_keys, metric_key_prefix)
        if self.retrieval is None:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        model = self.accelerator.unwrap_model(self.model)
        metrics = evaluate_retrieval(
            model,
            dataset,
            accelerator=self.accelerator,
            batch_size=self.args.per_device_eval_batch_size,
            **self.retrieval,
        )
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _evaluate_generation(self, eval_dataset, ignore_keys, metric_key_prefix):
        """The Trainer's evaluation loss (teacher-forced), then the official VQA accuracy of generated answers."""
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        predictions = self.generate_answers(dataset)
        generated = {
            f"{metric_key_prefix}_{key}": value for key, value in generated_vqa_metrics(predictions, dataset).items()
        }
        self.log(generated)
        metrics.update(generated)
        return metrics

    def generate_answers(self, dataset, description: str = "generating") -> list[str]:
        """The generative head's text for every row of `dataset`, in order (all processes take part)."""
        model = self.accelerator.unwrap_model(self.model)
        return generate_texts(
            model,
            dataset,
            batch_size=self.args.per_device_eval_batch_size,
            device=self.args.device,
            accelerator=self.accelerator,
            description=description,
            **self.generation,
        )


def collect_ood_scores(
    model, dataset, collator, batch_size: int, max_examples: int, device, accelerator=None
) -> dict[str, torch.Tensor]:
    """OOD scores and gates of the real knowledge items of the first `max_examples` examples (for the plots).

    Under `accelerator`'s autocast (the run's `--bf16`/`--fp16`, as the Trainer evaluates): the plotted scores and
    the kept fraction are those of the evaluated model, not of an fp32 pass."""
    subset = dataset.select(range(min(max_examples, len(dataset))))
    with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
        return ood_scores(model, DataLoader(subset, batch_size=batch_size, collate_fn=collator), device)


@torch.no_grad()
def ood_scores(model, batches, device) -> dict[str, torch.Tensor]:
    """OOD scores and gates of the real knowledge items of collated `batches`, flat, on the CPU, in eval mode.

    NLVR2 gives one score per item and image of the pair; retrieval runs its fused (ITM) pass on matching pairs.
    """
    was_training = model.training
    model.eval()
    scores, gates = [], []
    for batch in batches:
        # without labels or return_loss, every head gives its deterministic pass (retrieval: fused, no loss)
        batch = {
            key: value.to(device) for key, value in batch.items() if key not in ("labels", "image_ids", "return_loss")
        }
        if "knowledge_mask" not in batch:
            break
        outputs = model(**batch)
        mask = batch["knowledge_mask"].bool()
        if outputs.ood_scores.dim() == 3:  # NLVR2: (B, 2, M), one score per image of the pair
            mask = mask.unsqueeze(1).expand_as(outputs.ood_scores)
        scores.append(outputs.ood_scores[mask].float().cpu())
        gates.append(outputs.ood_gate[mask].float().cpu())
    model.train(was_training)
    empty = torch.zeros(0)
    return {"scores": torch.cat(scores) if scores else empty, "gates": torch.cat(gates) if gates else empty}
