"""Fine-tune and evaluate VK-OOD with the Hugging Face Trainer (PEFT LoRA, accelerate for multi-GPU / multi-node).

    python train.py                                             # embedded default: configuration/knowledge_vqa.yaml
    python train.py configuration/vqav2.yaml --learning_rate 1e-4
    accelerate launch --config_file configuration/accelerate/ddp.yaml train.py configuration/nlvr2.yaml

The reusable pieces live in `modeling_vkood.training`; this file only wires them together.
"""

import logging
import os
import shlex
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the collator tokenises inside dataloader workers

import torch  # noqa: E402
from transformers import set_seed  # noqa: E402

from data_scripts.common import answer_vocabulary, open_knowledge  # noqa: E402
from hub_cards.model_card import ModelDescription  # noqa: E402
from modeling_vkood.training import (  # noqa: E402
    PACKAGE_SCHEME,
    BlipVQACollator,
    GenerativeVQACollator,
    NLVR2Collator,
    NLVR2Metrics,
    PixelCache,
    RetrievalCollator,
    VKOODTrainer,
    VQACollator,
    VQAMetrics,
    apply_finetuning,
    build_model,
    collect_ood_scores,
    load_splits,
    new_parameter_names,
    parse_arguments,
    predicted_class,
    push_output_folder,
    save_output_folder,
)
from modeling_vkood.training.arguments import TEXT_ANSWER_TASKS, VQA_TASKS  # noqa: E402
from modeling_vkood.training.data import FIXED_VOCABULARY, knowledge_is_retrieved  # noqa: E402
from modeling_vkood.training.distillation import MultimodalAdaptiveDistillation, UnimodalTeacher  # noqa: E402
from modeling_vkood.training.frozen_text_cache import FrozenTextPrefixCache  # noqa: E402
from modeling_vkood.training.gate_forcing import GateForcingSchedule  # noqa: E402
from modeling_vkood.training.metrics import knowledge_fit_labels, ood_fit_metrics  # noqa: E402
from modeling_vkood.training.model_factory import (  # noqa: E402
    build_blip_model,
    checkpoint_answers,
    max_knowledge_items,
)
from modeling_vkood.training.ood_objectives import RELEVANCE_ALIGNMENTS, OODAlignmentLoss  # noqa: E402
from modeling_vkood.training.predictions import export_predictions  # noqa: E402
from modeling_vkood.training.self_distillation import ModalityAugmentedSelfDistillation  # noqa: E402
from modeling_vkood.training.wise_ft import pretrained_state, wise_ft  # noqa: E402

logger = logging.getLogger("train")
MAIN_METRIC = {
    "vqa": "eval_vqa_accuracy",
    "nlvr2": "eval_nlvr2_accuracy",
    "retrieval": "eval_r_mean",
    "generative_vqa": "eval_vqa_accuracy",
    "blip_vqa": "eval_vqa_accuracy",
}
# The tasks whose datasets label each question's answers over an answer vocabulary (the classifier's labels, or the
# candidates of VK-OOD-BLIP's rank inference) and whose items the OOD diagnostics can score.
ANSWER_VOCABULARY_TASKS = ("vqa", "blip_vqa")


def describe_backbone(name_or_path, config) -> str:
    if name_or_path:
        return f"`{name_or_path}` (pretrained)"
    return f"`{config['model_type']}` built from a config and trained from scratch ({config})"


def card_example(rows) -> dict:
    """The VQA snippets' question and knowledge: the first example of the run's data that has both."""
    for row in rows:
        texts = [item["text"] if isinstance(item, dict) else str(item) for item in row.get("knowledge") or []][:4]
        if row.get("question") and texts:
            return {"example_question": row["question"], "example_knowledge": texts}
    return {}


def describe(model_args, data_args, card_args, training_args, built, metrics, argv, example) -> ModelDescription:
    """The model card's description of this run; `example` (`card_example`) replaces the snippets' generic one."""
    lora = model_args.finetuning == "lora"
    finetuning = (
        f"LoRA (r={model_args.lora_r}, alpha={model_args.lora_alpha}) on the attention projections of the "
        f"pretrained {', '.join(built.pretrained_backbones)}; every other module trained in full"
        if lora
        else "full fine-tuning of every weight"
    )
    retrieved = built.processor.has_knowledge_source  # set in main where the index is at hand
    if not knowledge_is_retrieved(data_args):
        knowledge = "the facts that come with each question of the dataset (drawn per example; none are retrieved)"
    elif data_args.knowledge == "starter":
        knowledge = "the vkood starter graph"
    else:
        knowledge = f"`{data_args.knowledge}`"
    hyperparameters = {
        "learning_rate": training_args.learning_rate,
        "new_modules_learning_rate": training_args.new_modules_learning_rate or training_args.learning_rate,
        "ood_threshold_learning_rate": training_args.ood_threshold_learning_rate
        or training_args.new_modules_learning_rate
        or training_args.learning_rate,
        "ood_gate_forcing_steps": training_args.ood_gate_forcing_steps,
        "ood_gate_handover_steps": training_args.ood_gate_handover_steps,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "world_size": training_args.world_size,
        "total_train_batch_size": training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size,
        "num_train_epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps,
        "warmup_steps": training_args.warmup_steps,
        "weight_decay": training_args.weight_decay,
        "seed": training_args.seed,
        "balance_by": data_args.balance_by,
        "vkood_config": model_args.vkood_config,
    }
    for name in ("ood_alignment_weight", "ood_cross_image_weight", "mad_weight", "masd_weight"):
        if getattr(training_args, name):
            hyperparameters[name] = getattr(training_args, name)
    if training_args.ood_alignment_weight:
        hyperparameters["ood_alignment"] = training_args.ood_alignment
    if training_args.wise_ft_alpha is not None:
        hyperparameters["wise_ft_alpha"] = training_args.wise_ft_alpha
    if data_args.train_fraction is not None:
        hyperparameters["train_fraction"] = data_args.train_fraction
    hyperparameters.update({k: round(v, 2) for k, v in metrics.items() if k in ("train_runtime", "eval_runtime")})
    return ModelDescription(
        model_name=card_args.model_name or os.path.basename(os.path.normpath(training_args.output_dir)),
        task=data_args.task,
        dataset_name=data_args.dataset,
        eval_split=data_args.eval_split,
        vision_backbone=describe_backbone(model_args.given_backbones["vision"], model_args.vision_config)
        if not model_args.init_from
        else f"from `{model_args.init_from}`",
        text_backbone=describe_backbone(model_args.given_backbones["text"], model_args.text_config)
        if not model_args.init_from
        else f"from `{model_args.init_from}`",
        knowledge_source=knowledge,
        finetuning=finetuning,
        weights_form="merged: the LoRA adapters are folded into the backbone weights, so this is a plain checkpoint"
        " (PEFT is not needed to load it)"
        if lora
        else "the fully fine-tuned weights",
        command=shlex.join(["python", "train.py", *argv]),
        results=metrics,
        hyperparameters=hyperparameters,
        dataset_id=card_args.dataset_id,
        base_models=[
            m
            for m in (*model_args.given_backbones.values(), model_args.init_from)
            if m and not os.path.isdir(m) and not m.startswith(PACKAGE_SCHEME)
        ],
        license=card_args.license,
        repo_id=training_args.hub_model_id,
        retrieves_knowledge=retrieved,
        ood_score=built.model.config.ood_config.score,
        **example,
    )


def extra_losses(model, training_args, task: str) -> list:
    """The training-only loss terms asked for: the OOD alignment (VQA, NLVR2, generative VQA), MAD (VQA) and MASD (VQA,
    NLVR2). Build before training starts: the MAD teacher of a fully fine-tuned model is a frozen copy of the initial
    encoders."""
    terms = []
    if training_args.ood_alignment_weight > 0:
        if task == "retrieval":
            raise ValueError("--ood_alignment_weight: the OOD alignment trains the VQA, NLVR2 and generative heads")
        terms.append(
            OODAlignmentLoss(
                training_args.ood_alignment,
                training_args.ood_alignment_weight,
                training_args.ood_alignment_temperature,
                training_args.ood_cross_image_weight,
            )
        )
    if training_args.mad_weight > 0:
        if task != "vqa":
            raise ValueError(f"--mad_weight: MAD distils into the VQA head's fused tokens; task {task!r} has none")
        teacher = UnimodalTeacher(model).to(training_args.device)
        if teacher.sides != ("text_model", "vision_model"):
            logger.warning(
                "MAD distils only %s: the other backbone is trained from scratch (no pretrained teacher)",
                ", ".join(teacher.sides),
            )
        terms.append(
            MultimodalAdaptiveDistillation(
                teacher, training_args.mad_weight, training_args.mad_temperature, training_args.mad_token_fraction
            )
        )
    if training_args.masd_weight > 0:
        if task in ("retrieval", "blip_vqa"):
            raise ValueError("--masd_weight: MASD distils a classifier's answer distribution (VQA, NLVR2)")
        terms.append(
            ModalityAugmentedSelfDistillation(
                training_args.masd_weight, training_args.masd_temperature, training_args.masd_augmentations
            )
        )
    return terms


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, card_args, training_args = parse_arguments(argv)
    training_args.remove_unused_columns = False  # the collators need the raw columns (images, knowledge, answers)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    set_seed(training_args.seed)
    task = data_args.task

    splits = [
        s
        for s, wanted in (
            (data_args.train_split, training_args.do_train),
            (data_args.eval_split, training_args.do_eval),
            (data_args.predict_split, data_args.predict_split is not None),
        )
        if wanted
    ]
    if not splits:
        raise ValueError("nothing to do: set do_train, do_eval and/or predict_split")
    items = max_knowledge_items(model_args)  # the one cap on the knowledge items: the model config's
    # A VQA run from a checkpoint with a VQA head keeps its answers (and so its trained classifier) where the builder
    # takes a given list.
    fixed = task in ANSWER_VOCABULARY_TASKS and data_args.dataset in FIXED_VOCABULARY
    answers = checkpoint_answers(model_args) if fixed else None
    with training_args.main_process_first(desc="dataset"):
        dataset = load_splits(data_args, list(dict.fromkeys(splits)), items, answer_vocabulary=answers)
    id2label = dict(enumerate(answer_vocabulary(dataset))) if task == "vqa" else None
    if task == "nlvr2":
        id2label = dict(enumerate(dataset[splits[0]].features["label"].names))
    if task == "blip_vqa":  # rank inference's candidates: the dataset's answer vocabulary
        built = build_blip_model(model_args, answer_vocabulary(dataset))
    else:
        built = build_model(model_args, task, id2label)
    model = apply_finetuning(built, model_args)
    objectives = extra_losses(model, training_args, task)
    # WiSE-FT's theta_0 for a fully fine-tuned model (under LoRA the frozen base weights are theta_0)
    wise_full = training_args.wise_ft_alpha is not None and model_args.finetuning == "full"
    initial_weights = pretrained_state(model) if wise_full else None
    text_cache = (
        FrozenTextPrefixCache.for_model(built.model.base_model) if training_args.cache_frozen_text_blocks else None
    )

    built.processor.knowledge_padding = training_args.knowledge_padding
    pixels = PixelCache(built.processor, data_args.pixel_cache_size)
    try:
        knowledge_base = open_knowledge(data_args.knowledge)
    except FileNotFoundError:
        if task == "retrieval":  # its collator retrieves for every caption it draws
            raise
        knowledge_base = None  # a ready-built dataset brought its knowledge column; the index is not here
        logger.warning(
            "knowledge index %s not found: the saved processor will not retrieve knowledge itself", data_args.knowledge
        )
    if knowledge_base is not None and knowledge_is_retrieved(data_args):
        # The processor (saved with every checkpoint, its index with it) retrieves at inference as the data did.
        built.processor.set_knowledge_source(data_args.knowledge, knowledge_base.path)
    else:  # this run's knowledge is not retrieved here: nor by a processor that came with an --init_from checkpoint
        built.processor.set_knowledge_source(None)
    eval_dataset = dataset[data_args.eval_split] if training_args.do_eval else None
    forcing = training_args.ood_gate_forcing_steps + training_args.ood_gate_handover_steps > 0
    if forcing and task not in ANSWER_VOCABULARY_TASKS:
        raise ValueError("--ood_gate_forcing_steps / --ood_gate_handover_steps need the VQA task's relevance labels")
    relevance = forcing or (
        training_args.ood_alignment in RELEVANCE_ALIGNMENTS and training_args.ood_alignment_weight > 0
    )
    if task == "vqa":
        collator = VQACollator(built.processor, len(id2label), pixels, knowledge_relevance=relevance)
        compute_metrics = VQAMetrics(eval_dataset, id2label) if eval_dataset is not None else None
    elif task == "nlvr2":
        collator = NLVR2Collator(built.processor, pixels)
        compute_metrics = NLVR2Metrics(eval_dataset) if eval_dataset is not None else None
    elif task == "generative_vqa":
        collator = GenerativeVQACollator(
            built.processor, pixels, data_args.generation_target, data_args.max_answer_length
        )
        compute_metrics = None
        training_args.prediction_loss_only = True  # the loss; the accuracy comes from generated answers
    elif task == "blip_vqa":  # BLIP's VQA objective: every human answer, weighted by its share of the annotators
        collator = BlipVQACollator(built.processor, pixels, data_args.max_answer_length, knowledge_relevance=relevance)
        compute_metrics = None
        training_args.prediction_loss_only = True  # the loss; the accuracy comes from generated or ranked answers
    else:
        collator = RetrievalCollator(built.processor, pixels, knowledge_base, items)
        compute_metrics = None
    generation = None
    if task in TEXT_ANSWER_TASKS and data_args.generation_target == "answer":
        answer_inputs = BlipVQACollator if task == "blip_vqa" else GenerativeVQACollator
        generation = {
            "collator": answer_inputs(built.processor, pixels, with_targets=False),
            "max_new_tokens": training_args.generation_max_new_tokens,
            "num_beams": training_args.generation_num_beams,
        }
        if task == "blip_vqa" and built.model.config.inference == "rank":  # BLIP's rank inference over the list
            generation["answer_list"] = built.model.config.answer_list
    retrieval = None
    if task == "retrieval":
        retrieval = {
            "pixels": pixels,
            "processor": built.processor,
            "knowledge_base": knowledge_base,
            "max_knowledge_items": items,
        }
    else:
        training_args.label_names = ["labels"]

    trainer = VKOODTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset[data_args.train_split] if training_args.do_train else None,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=built.processor,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=predicted_class if task in ("vqa", "nlvr2") else None,
        new_parameters=new_parameter_names(model, built.pretrained_backbones),
        new_modules_learning_rate=training_args.new_modules_learning_rate,
        ood_threshold_learning_rate=training_args.ood_threshold_learning_rate,
        ood_calibration_quantile=training_args.ood_calibration_quantile,
        retrieval=retrieval,
        generation=generation,
        balance_by=data_args.balance_by,
        gate_forcing=GateForcingSchedule(training_args.ood_gate_forcing_steps, training_args.ood_gate_handover_steps)
        if forcing
        else None,
        extra_losses=objectives,
    )
    metrics = {"world_size": training_args.world_size}  # the processes this run had (all_results.json and the card)
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        metrics.update(result.metrics)
    if training_args.wise_ft_alpha is not None:
        wise_ft(trainer.accelerator.unwrap_model(trainer.model), training_args.wise_ft_alpha, initial_weights)
        metrics["wise_ft_alpha"] = training_args.wise_ft_alpha
    ood = None
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
        ood = collect_ood_scores(
            trainer.accelerator.unwrap_model(trainer.model),
            eval_dataset,
            collator,
            training_args.per_device_eval_batch_size,
            training_args.ood_plot_examples,
            training_args.device,
            accelerator=trainer.accelerator,
        )
        if len(ood["gates"]):
            metrics["ood_kept_fraction"] = float((ood["gates"] > 0.5).float().mean())
        plotted = eval_dataset.select(range(min(training_args.ood_plot_examples, len(eval_dataset))))
        labelled = task in ANSWER_VOCABULARY_TASKS
        fits = knowledge_fit_labels(plotted, built.processor.max_knowledge_items) if labelled else None
        if fits is not None:  # a dataset that labels its items (knowledge-VQA): does the layer keep the fitting ones?
            metrics.update(ood_fit_metrics(ood["scores"], ood["gates"], fits))
    if data_args.predict_split is not None:
        export_predictions(trainer, dataset, data_args, id2label, training_args.output_dir)
    if text_cache is not None:
        text_cache.remove()
        metrics["frozen_text_cache_hit_fraction"] = text_cache.hits / max(text_cache.hits + text_cache.misses, 1)
    trainer.save_metrics("all", metrics, combined=False)
    rows = dataset[splits[0]]
    columns = [name for name in ("question", "knowledge") if name in rows.column_names]
    example = card_example(rows.select_columns(columns).select(range(min(len(rows), 64)))) if task in VQA_TASKS else {}
    description = describe(model_args, data_args, card_args, training_args, built, metrics, argv, example)
    save_output_folder(trainer, task, description, ood, MAIN_METRIC[task])
    if training_args.push_to_hub:
        push_output_folder(trainer, commit_message="vkood: trained model, processor, card and plots")
    return metrics


def leave_process_group() -> None:
    """Every process leaves the process group together and closes it: a process whose gloo threads are still alive
    when its interpreter exits can abort ("terminate called without an active exception") after its work is done."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    leave_process_group()
