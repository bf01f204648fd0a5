"""Two-stage retrieval evaluation over a whole gallery (ALBEF/BLIP protocol) with recall@1/5/10 both ways.

Stage 1 scores every image-text pair by ITC similarity; stage 2 re-scores each query's top `k_test` candidates with
the fused ITM head (`VKOODForImageTextRetrieval.rank_gallery`). In a distributed run both stages are sharded:
each process encodes a share of the gallery (gathered, so every process holds all features), then re-ranks a share
of the queries (gathered again); every process runs as many passes, as FSDP2 needs. Everything runs under the
accelerator's autocast, in the precision of the run.
"""

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modeling_vkood.evaluation import retrieval_recall

from .fsdp import register_forward_methods

# What the evaluation calls instead of `forward`: under FSDP2 each gathers the sharded weights as `forward` does.
GALLERY_METHODS = ("encode_gallery_images", "encode_gallery_texts", "rank_gallery")


def _pad_to(tensor: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - dim - 1) + [0, missing]
    return F.pad(tensor, pad)


def _concat_padded(chunks: list[dict]) -> dict:
    """Concatenate per-chunk feature dicts along the batch, padding token/item axes (dim 1) to a common length."""
    merged = {}
    for key in chunks[0]:
        length = max(chunk[key].shape[1] for chunk in chunks) if chunks[0][key].dim() > 1 else 0
        merged[key] = torch.cat([_pad_to(chunk[key], length) for chunk in chunks])
    return merged


def gallery(dataset) -> tuple[list, list[str], list[int]]:
    """(images, texts, text_to_image) of a retrieval split: every caption of every row is a text query."""
    images, texts, text_to_image = [], [], []
    for index, row in enumerate(dataset):
        images.append(row["image"])
        texts.extend(row["captions"])
        text_to_image.extend([index] * len(row["captions"]))
    return images, texts, text_to_image


def _encode(accelerator, items: list, encode_chunk, batch_size: int, description: str) -> dict:
    """Encode `items` in chunks sharded across processes; gathered features in the original order."""
    loader = accelerator.prepare(DataLoader(items, batch_size=batch_size, collate_fn=list))
    chunks = []
    for chunk in tqdm(loader, desc=description, disable=not accelerator.is_local_main_process):
        features = accelerator.pad_across_processes(encode_chunk(chunk), dim=1)
        chunks.append(accelerator.gather_for_metrics(features))
    return _concat_padded(chunks)


def _share(count: int, accelerator) -> torch.Tensor:
    """This process's contiguous share of `count` queries: ceil(count / processes) each, the last shares padded with
    repeats of the last query (`_gather_rows` drops them). Every process then re-ranks as many pairs, in as many
    fused passes: under FSDP2 each pass gathers the sharded weights collectively."""
    per_process = -(-count // accelerator.num_processes)
    start = accelerator.process_index * per_process
    return torch.arange(start, start + per_process, device=accelerator.device).clamp(max=count - 1)


def _gather_rows(accelerator, rows: torch.Tensor, count: int) -> torch.Tensor:
    """The (count, n) score matrix from each process's share of rows (see `_share`), in query order."""
    return accelerator.gather(rows)[:count]


@torch.no_grad()
def evaluate_retrieval(
    model,
    dataset,
    pixels,
    processor,
    knowledge_base,
    max_knowledge_items: int,
    accelerator,
    batch_size: int = 64,
    k_test: int | None = None,
) -> dict[str, float]:
    """R@1/5/10 for image->text (`i2t_r*`) and text->image (`t2i_r*`) and their mean `r_mean`, in percent."""
    register_forward_methods(model, GALLERY_METHODS)
    was_training = model.training
    model.eval()
    device = accelerator.device
    images, texts, text_to_image = gallery(dataset)

    def encode_images(chunk):
        return model.encode_gallery_images(pixels(chunk).to(device))

    def encode_texts(chunk):
        knowledge = knowledge_base.retrieve_batch(chunk, max_items=max_knowledge_items)
        inputs = processor(text=chunk, knowledge=knowledge).to(device)
        return model.encode_gallery_texts(**inputs)

    with accelerator.autocast():
        image_features = _encode(accelerator, images, encode_images, batch_size, "gallery images")
        text_features = _encode(accelerator, texts, encode_texts, batch_size, "gallery texts")
        image_queries = _share(len(images), accelerator)
        text_queries = _share(len(texts), accelerator)
        i2t, t2i = model.rank_gallery(
            image_features, text_features, k_test=k_test, image_queries=image_queries, text_queries=text_queries
        )
    i2t = _gather_rows(accelerator, i2t, len(images))
    t2i = _gather_rows(accelerator, t2i, len(texts))
    model.train(was_training)
    image_queries = retrieval_recall(i2t.float().cpu().numpy(), text_to_image)
    text_queries = retrieval_recall(t2i.t().float().cpu().numpy(), text_to_image)
    metrics = {key: value for key, value in image_queries.items() if key.startswith("i2t_")}
    metrics.update({key: value for key, value in text_queries.items() if key.startswith("t2i_")})
    metrics["r_mean"] = sum(metrics.values()) / len(metrics)
    return metrics
