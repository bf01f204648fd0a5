"""The Hub-ready output folder: merged model + remote code, processor, metrics, plots and the model card."""

import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME
from transformers.utils.hub import hf_api

from hub_cards.model_card import ModelDescription, model_card
from modeling_vkood import pipeline_vkood

from .fsdp import is_sharded, unsharded_copy
from .model_factory import merged_model
from .plots import ood_histogram, training_curves

PLOTS_DIR = "plots"
# What `Trainer._push_from_checkpoint` copies from each LoRA checkpoint into output_dir (and uploads) during a
# `--push_to_hub` run. Next to the merged model, `from_pretrained` would apply that stale adapter a second time, and
# for a Hub id it would load the adapter's base model instead: the published folder must not hold them.
ADAPTER_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)
# The tasks whose checkpoints ship the VQA pipeline, and how it loads their model.
PIPELINES = {
    "vqa": pipeline_vkood.VQA_PIPELINE,
    "generative_vqa": pipeline_vkood.GENERATIVE_VQA_PIPELINE,
    "blip_vqa": pipeline_vkood.VQA_PIPELINE,  # VK-OOD-BLIP loads with AutoModelForVisualQuestionAnswering
}


def save_output_folder(trainer, task: str, description: ModelDescription, ood: dict | None, metric: str | None):
    """Replace the trained model by its merged form and write everything `from_pretrained` and the Hub need.

    Every rank must call it: under FSDP2 the whole weights are gathered collectively, and only rank 0 then holds
    (and writes) the merged model; the other ranks keep the sharded one. Nothing is uploaded here
    (`push_output_folder` does that once the card and plots are written).
    """
    model = unsharded_copy(trainer.model) if is_sharded(trainer.model) else trainer.model
    if model is not None:
        trainer.model = merged_model(model)
        if task in PIPELINES:
            trainer.model.config.custom_pipelines = PIPELINES[task]
    if not trainer.is_world_process_zero():
        return None
    output_dir = Path(trainer.args.output_dir)
    # config, safetensors, remote-code files, processor. The merged model is a plain module that rank 0 holds whole
    # (every rank under DDP and ZeRO-2), so it is saved directly: `Trainer.save_model` would save the DeepSpeed
    # engine's unmerged weights (or an FSDP run's adapter alone), and it would push a folder without its card.
    trainer.model.save_pretrained(output_dir)
    trainer.processing_class.save_pretrained(output_dir)
    for name in ADAPTER_FILES:
        (output_dir / name).unlink(missing_ok=True)
    if task in PIPELINES:
        shutil.copy(pipeline_vkood.__file__, output_dir / "pipeline_vkood.py")
    plots = output_dir / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    written = [training_curves(trainer.state.log_history, plots / "training_curves.png", metric)]
    if ood is not None and len(ood["scores"]):
        written.append(ood_histogram(ood["scores"], ood["gates"], plots / "ood_scores.png"))
    description.plots = [str(path.relative_to(output_dir)) for path in written]
    card_path = output_dir / "README.md"
    model_card(description).save(card_path)
    return output_dir


def push_output_folder(trainer, commit_message: str):
    """Upload the folder `save_output_folder` wrote, as it is, to `hub_model_id` (main process only).

    `Trainer.push_to_hub` would save the model again and replace the vkood card by a generic one, and it cannot
    delete files: this commit also deletes the adapter files that the checkpoint pushes of the run left in the repo.
    Checkpoint folders and `_*` files stay local, as with the Trainer.
    """
    trainer.callback_handler.on_push_begin(trainer.args, trainer.state, trainer.control)
    if trainer.hub_model_id is None:
        trainer.init_hf_repo()
    if not trainer.is_world_process_zero():
        return None
    trainer._finish_current_push()  # the last checkpoint push must land before this commit
    return hf_api().upload_folder(
        repo_id=trainer.hub_model_id,
        folder_path=trainer.args.output_dir,
        commit_message=commit_message,
        token=trainer.args.hub_token,
        revision=trainer.args.hub_revision,
        ignore_patterns=["_*", f"{PREFIX_CHECKPOINT_DIR}-*"],
        delete_patterns=list(ADAPTER_FILES),
    )
