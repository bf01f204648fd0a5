"""Run by test_ddp_unused_parameters.py under torchrun with 2 gloo processes: each head in torch DDP with
find_unused_parameters=False, trained for 2 steps (an unused parameter makes the second step raise "Expected to have
finished reduction in the prior iteration"). Each process saves, per scenario, the world size it saw and whether its
parameters equal rank 0's after the steps."""

import sys
from pathlib import Path

if not __package__:  # run as a script: import the helpers as tests.utils.*, from the repository root, not this folder
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parents[1]), *(p for p in sys.path if Path(p or ".").resolve() != _here)]

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from modeling_vkood import (
    VKOODForConditionalGeneration,
    VKOODForImagesAndTextClassification,
    VKOODForImageTextRetrieval,
    VKOODForQuestionAnswering,
)
from tests.utils.tiny import tiny_batch, tiny_decoder_config, tiny_vkood_config

WITHOUT_KNOWLEDGE = ("knowledge_input_ids", "knowledge_attention_mask", "knowledge_mask")


def vqa_batch(rank, step, knowledge=True):
    batch = tiny_batch(seed=10 * rank + step)
    batch["labels"] = torch.rand(3, 3, generator=torch.Generator().manual_seed(step))
    return batch if knowledge else {key: value for key, value in batch.items() if key not in WITHOUT_KNOWLEDGE}


def nlvr2_batch(rank, step):
    return {**tiny_batch(seed=10 * rank + step, pairs=True), "labels": torch.tensor([0, 1, rank])}


def retrieval_batch(rank, step):
    return {**tiny_batch(seed=10 * rank + step), "image_ids": torch.tensor([0, 1, 2]), "return_loss": True}


def generative_batch(rank, step):
    labels = torch.full((3, 5), -100)
    labels[:, 1:4] = torch.randint(1000, 2000, (3, 3), generator=torch.Generator().manual_seed(10 * rank + step))
    return {**tiny_batch(seed=10 * rank + step), "labels": labels}


SCENARIOS = {  # name: (model class, config fields, batch of (rank, step))
    "vqa_with_knowledge": (VKOODForQuestionAnswering, {"num_labels": 3}, vqa_batch),
    "vqa_without_knowledge": (
        VKOODForQuestionAnswering,
        {"num_labels": 3},
        lambda rank, step: vqa_batch(rank, step, knowledge=False),
    ),
    # the processes disagree on whether their batch has knowledge, and each changes from one step to the next
    "vqa_knowledge_in_some_batches": (
        VKOODForQuestionAnswering,
        {"num_labels": 3},
        lambda rank, step: vqa_batch(rank, step, knowledge=(rank + step) % 2 == 0),
    ),
    "vqa_use_gate_false": (VKOODForQuestionAnswering, {"num_labels": 3, "ood_config": {"use_gate": False}}, vqa_batch),
    "generative": (VKOODForConditionalGeneration, {"decoder_config": tiny_decoder_config()}, generative_batch),
    "nlvr2": (VKOODForImagesAndTextClassification, {"num_labels": 2}, nlvr2_batch),
    "retrieval": (VKOODForImageTextRetrieval, {}, retrieval_batch),
}


def train_two_steps(model_class, fields, batch):
    torch.manual_seed(0)  # the same initial weights in every process (DDP also broadcasts rank 0's)
    model = DistributedDataParallel(model_class(tiny_vkood_config(**fields)).train(), find_unused_parameters=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        model(**batch(dist.get_rank(), step)).loss.backward()
        optimizer.step()
    flat = torch.cat([parameter.detach().flatten() for parameter in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    return torch.equal(flat, reference)


def main(out: Path):
    dist.init_process_group("gloo")
    results = {}
    for name, (model_class, fields, batch) in SCENARIOS.items():
        results[name] = {
            "world_size": dist.get_world_size(),
            "parameters_equal_rank_0": train_two_steps(model_class, fields, batch),
        }
    torch.save(results, out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
