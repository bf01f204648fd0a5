"""The model card of a converted METER checkpoint: its source, METER's citation and licence, the numbers METER reports
for it, how it was converted and how it is used."""

from huggingface_hub import ModelCard

RELEASES = "https://github.com/zdou0830/METER/releases/download"
# METER's released CLIP-ViT-B/16 + RoBERTa checkpoints: (release tag, what it is, image size, METER's reported
# results for it: Dou et al., CVPR 2022, the METER-CLIP-ViT-BASE rows).
METER_CHECKPOINTS = {
    "meter_clip16_288_roberta_pretrain.ckpt": ("checkpoint", "pre-trained (MLM + ITM, 4M images)", 288, {}),
    "meter_clip16_224_roberta_pretrain.ckpt": ("checkpoint2", "pre-trained (MLM + ITM, 4M images)", 224, {}),
    "meter_clip16_288_roberta_vqa.ckpt": (
        "checkpoint",
        "fine-tuned on VQAv2",
        576,
        {"VQAv2 test-dev accuracy": 77.68, "VQAv2 test-std accuracy": 77.64},
    ),
    "meter_clip16_288_roberta_nlvr2.ckpt": (
        "checkpoint",
        "fine-tuned on NLVR2",
        288,
        {"NLVR2 dev accuracy": 82.33, "NLVR2 test-P accuracy": 83.05},
    ),
    "meter_clip16_288_roberta_snli.ckpt": (
        "checkpoint",
        "fine-tuned on SNLI-VE",
        384,
        {"SNLI-VE dev accuracy": 80.86, "SNLI-VE test accuracy": 81.19},
    ),
    "meter_clip16_288_roberta_flickr.ckpt": (
        "checkpoint",
        "fine-tuned on Flickr30k retrieval",
        384,
        {"Flickr30k test IR@1": 82.22, "Flickr30k test TR@1": 94.30},
    ),
    "meter_clip16_288_roberta_coco.ckpt": (
        "checkpoint",
        "fine-tuned on COCO retrieval",
        384,
        {"COCO 5k test IR@1": 57.08, "COCO 5k test TR@1": 76.16},
    ),
}
CITATION = """@inproceedings{dou2022meter,
  title={An Empirical Study of Training End-to-End Vision-and-Language Transformers},
  author={Dou, Zi-Yi and Xu, Yichong and Gan, Zhe and Wang, Jianfeng and Wang, Shuohang and Wang, Lijuan and
          Zhu, Chenguang and Zhang, Pengchuan and Yuan, Lu and Peng, Nanyun and Liu, Zicheng and Zeng, Michael},
  booktitle={CVPR}, year={2022}}"""
# A first call of each task's model on an image (the snippet makes one) and a text.
USAGE = {
    "pretrain": 'inputs = processor(images=image, text="a dog runs on the grass.")\n'
    "match = model(**inputs, return_loss=False).rank_scores  # ITM: how well the caption fits the image",
    "irtr": 'inputs = processor(images=image, text="a dog runs on the grass.")\n'
    "score = model(**inputs, return_loss=False).rank_scores  # METER's retrieval score of the pair",
    "vqa": 'inputs = processor(images=image, text="what is in the picture?")\n'
    "answer = model.config.id2label[model(**inputs).logits.argmax(-1).item()]",
    "nlvr2": 'inputs = processor(images=[[image, image]], text="both images show the same scene.")\n'
    "answer = model.config.id2label[model(**inputs).logits.argmax(-1).item()]  # True / False",
    "snli": 'inputs = processor(images=image, text="a dog runs on the grass.")\n'
    "answer = model.config.id2label[model(**inputs).logits.argmax(-1).item()]  # entailment / neutral / contradiction",
}
AUTO_CLASSES = {
    "pretrain": "AutoModelForZeroShotImageClassification",
    "vqa": "AutoModelForVisualQuestionAnswering",
    "nlvr2": "AutoModelForSequenceClassification",
    "snli": "AutoModelForSequenceClassification",
    "irtr": "AutoModelForZeroShotImageClassification",
}


def meter_card(
    source_name: str, task: str, image_size: int, command: str, dropped: list, labels_note: str, repo_id: str | None
) -> ModelCard:
    """The card of a converted checkpoint (`source_name`: the file converted; `dropped`: its keys left out)."""
    known = METER_CHECKPOINTS.get(source_name)
    source = f"[{source_name}]({RELEASES}/{known[0]}/{source_name})" if known else f"`{source_name}`"
    what = known[1] if known else f"a METER checkpoint ({task})"
    reported = known[3] if known else {}
    results = "\n".join(f"| {name} | {value:.2f} |" for name, value in reported.items())
    results = (
        f"| METER's reported result | value |\n|---|---|\n{results}"
        if results
        else "METER reports no downstream number for this checkpoint."
    )
    name = repo_id or "PATH_TO_THIS_FOLDER"
    dropped_note = ", ".join(f"`{key}`" for key in dropped) or "none"
    text = f"""---
license: mit
library_name: transformers
tags: [vkood, meter, vision-language, converted]
---

# METER (CLIP-ViT-B/16 + RoBERTa) as a vkood model: {what}

The weights of METER's {source}, converted exactly into a vkood VK-OOD model (METER's MIT
licence applies to them). At the checkpoint's resolution ({image_size} px) and without knowledge items it computes
METER's outputs (checked to 1e-5 against METER's own code on random models of the same layout). It takes any image
size: the position table is resized bicubically, as METER resizes it when it loads a checkpoint.

## Use

```python
from PIL import Image
from transformers import {AUTO_CLASSES[task]}, AutoProcessor

model = {AUTO_CLASSES[task]}.from_pretrained("{name}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)
image = Image.new("RGB", (640, 480), "white")  # or Image.open("photo.jpg")
{USAGE[task]}
```

Without `knowledge=`, the processor passes no knowledge items (METER's inputs); with `knowledge=[["a fact", ...]]`
the items go through the OOD layer.

Fine-tune it with knowledge: `python train.py configuration/<task>.yaml --init_from {name}`.

## Knowledge

METER has no knowledge path. The converted model adds VK-OOD's (the knowledge item projection, a knowledge token
type initialised from the text row, and the implicit OOD layer) with the OOD gate's threshold set high
(`ood_config.threshold`): every knowledge item starts gated out (its attention weight scaled by exp(score - tau)), so
the model begins at METER's function and training opens the gate for the items that fit the image.

## Results

{results}

## Conversion

`{command}`

{labels_note}
Weights left out (METER's forward does not read them, or vkood has no place for them): {dropped_note}.
Preprocessing: CLIP's transform at {image_size} px (bicubic resize of the shorter side, centre crop, CLIP mean and
std) and RoBERTa's tokenizer; where the centre crop's offset is a half pixel, torchvision 0.8 (METER's) rounds half to
even and transformers rounds down, so a few image shapes crop one pixel apart.

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(text)


__all__ = ["METER_CHECKPOINTS", "meter_card"]
