"""Evaluation of the generative head: answers generated for every question, scored with the official VQA accuracy
(`modeling_vkood.evaluation.vqa_accuracy`: the answers normalised as the official toolkit does)."""

import contextlib

import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from modeling_vkood.evaluation import vqa_accuracy

from .fsdp import is_sharded, register_forward_methods


@torch.no_grad()
def generate_texts(
    model,
    dataset,
    collator,
    batch_size: int,
    device,
    max_new_tokens: int = 16,
    num_beams: int = 1,
    accelerator=None,
    description: str = "generating",
    answer_list: list[str] | None = None,
) -> list[str]:
    """The text the model generates for every row of `dataset` (in order), `collator` giving the inputs (a
    `GenerativeVQACollator(..., with_targets=False)`, or a `BlipVQACollator` without targets). With `answer_list`,
    the model ranks that list instead (`rank_answers`, VK-OOD-BLIP's rank inference at its `k_test`) and each row's
    text is its best candidate. Under `accelerator` with several processes each process
    generates for every world_size-th row and all of them receive the whole list. The model runs under the
    accelerator's autocast (that of a `--bf16`/`--fp16` run, as the Trainer's own evaluation): generating in fp32
    would evaluate another model than the one trained and served, and slower.

    Every process decodes as many batches (a shorter share repeats its last row, whose text is dropped), and an
    FSDP2-sharded model decodes in lockstep (`synced_gpus`) with `generate` registered as a forward method: each of
    its steps gathers the sharded weights collectively, so no process may stop before the others."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    mine = list(range(rank, len(dataset), world))
    share = -(-len(dataset) // world)
    padded = mine + [mine[-1] if mine else 0] * (share - len(mine))
    sharded = is_sharded(model)
    register_forward_methods(model, ("rank_answers",) if answer_list is not None else ("generate",))
    if answer_list is not None:
        candidates = {key: value.to(device) for key, value in collator.processor.answer_candidates(answer_list).items()}
    was_training = model.training
    model.eval()
    texts = []
    batches = DataLoader(Subset(dataset, padded), batch_size=batch_size, collate_fn=collator)
    for batch in tqdm(batches, desc=description, disable=rank != 0):
        batch = {key: value.to(device) for key, value in batch.items()}
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            if answer_list is not None:
                best = model.rank_answers(**candidates, **batch)[0][:, 0]
                texts.extend(answer_list[index] for index in best.tolist())
                continue
            sequences = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                **({"synced_gpus": True} if sharded else {}),
            )
        texts.extend(collator.processor.decode_answers(sequences))
    model.train(was_training)
    texts = texts[: len(mine)]
    if world == 1:
        return texts
    gathered = gather_object([(index, text) for index, text in zip(mine, texts)])
    return [text for _, text in sorted(gathered)]


def generated_vqa_metrics(predictions: list[str], dataset) -> dict[str, float]:
    """Official VQA accuracy (percent) of generated answers, overall and per answer type, named as the classifier's
    `VQAMetrics` names them (`vqa_accuracy`, `vqa_accuracy_<type>`)."""
    scores = vqa_accuracy(predictions, list(dataset["answers"]), list(dataset["answer_type"]))
    per_type = {f"vqa_accuracy_{t.replace('/', '_')}": v for t, v in scores["per_answer_type"].items()}
    return {"vqa_accuracy": scores["overall"], **per_type}


__all__ = ["generate_texts", "generated_vqa_metrics"]
