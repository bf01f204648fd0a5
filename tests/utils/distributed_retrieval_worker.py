"""Run by test_retrieval_distributed.py under torchrun with 2 processes: the retrieval model's ITC loss and
gradients on this process's half of a batch, and the sharded gallery evaluation; rank 0 saves the results."""

import sys
from pathlib import Path

if not __package__:  # run as a script: import the helpers as tests.utils.*, from the repository root, not this folder
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parents[1]), *(p for p in sys.path if Path(p or ".").resolve() != _here)]

import torch
from accelerate import Accelerator

from modeling_vkood.training import retrieval_eval
from tests.utils.retrieval_fixtures import gallery_inputs, itc_batch, itc_gradients, tiny_retrieval_model


def main(out: Path, tokenizer_path: str):
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2 and torch.distributed.get_world_size() == 2, accelerator.num_processes
    rank = accelerator.process_index

    model = tiny_retrieval_model().train()
    batch = itc_batch()
    half = batch["image_ids"].shape[0] // 2
    local = {key: value[rank * half : (rank + 1) * half] for key, value in batch.items()}
    loss, grads = itc_gradients(model, local)
    loss = loss.detach().clone()
    torch.distributed.all_reduce(loss)
    for grad in grads.values():
        torch.distributed.all_reduce(grad)  # DDP averages the gradients of the processes
    results = {"itc_loss": loss / 2, "grads": {name: grad / 2 for name, grad in grads.items()}}

    scores = []
    retrieval_eval.retrieval_recall = lambda matrix, *args, _original=retrieval_eval.retrieval_recall: (
        scores.append(matrix) or _original(matrix, *args)
    )
    results["metrics"] = retrieval_eval.evaluate_retrieval(
        **gallery_inputs(model, tokenizer_path), accelerator=accelerator
    )
    results["scores"] = scores
    if rank == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
