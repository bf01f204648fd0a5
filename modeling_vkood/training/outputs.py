"""The Hub-ready output folder: merged model + remote code, processor, metrics, plots and the model card."""

import shutil
from pathlib import Path

from hub_cards.model_card import ModelDescription, model_card
from modeling_vkood import pipeline_vkood

from .model_factory import merged_model
from .plots import ood_histogram, training_curves

PLOTS_DIR = "plots"


def save_output_folder(trainer, task: str, description: ModelDescription, ood: dict | None, metric: str | None):
    """Replace the trained model by its merged form and write everything `from_pretrained` and the Hub need.

    The Trainer's model becomes the merged one, so that a later `trainer.push_to_hub()` uploads exactly this folder.
    """
    trainer.model = merged_model(trainer.model)
    trainer.model_wrapped = trainer.model
    if task == "vqa":
        trainer.model.config.custom_pipelines = pipeline_vkood.VQA_PIPELINE
    trainer.save_model()  # config, safetensors, remote-code files, processor (the Trainer's processing_class)
    if not trainer.is_world_process_zero():
        return None
    output_dir = Path(trainer.args.output_dir)
    if task == "vqa":
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
