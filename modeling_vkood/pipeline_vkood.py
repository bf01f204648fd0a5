"""Visual question answering pipeline for VK-OOD (Hub remote code: transformers and the standard library only).

transformers 5 removed its "visual-question-answering" pipeline; a VK-OOD VQA checkpoint names this class under
`config.custom_pipelines`, so `pipeline("visual-question-answering", model=folder, trust_remote_code=True)` works.
Inputs go through the checkpoint's own VKOODProcessor, which also encodes optional knowledge items:

    vqa(image=image, question="what colour is the shape?")                                # no knowledge
    vqa(image=image, question="what colour is the shape?", knowledge=["red is a colour"])  # with knowledge
    vqa([{"image": a, "question": q, "knowledge": [...]}, ...])                             # a batch of examples
"""

from transformers import Pipeline
from transformers.image_utils import load_image

VQA_PIPELINE = {
    "visual-question-answering": {
        "impl": "pipeline_vkood.VKOODVisualQuestionAnsweringPipeline",
        "pt": ["AutoModelForVisualQuestionAnswering"],
        "type": "multimodal",
    }
}


class VKOODVisualQuestionAnsweringPipeline(Pipeline):
    """Answers a question about an image with the top-k answers of the vocabulary (sigmoid scores)."""

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(self, top_k=None, timeout=None, **kwargs):
        preprocess = {} if timeout is None else {"timeout": timeout}
        postprocess = {} if top_k is None else {"top_k": top_k}
        return preprocess, {}, postprocess

    def __call__(self, image, question=None, knowledge=None, **kwargs):
        """`image` (PIL image, path or URL) with `question` (and optional `knowledge` items), or a dict / list of
        dicts with the keys image, question and optionally knowledge."""
        if question is not None:
            image = {"image": image, "question": question, "knowledge": knowledge}
        elif knowledge is not None:
            raise ValueError("pass knowledge inside each input dict when the question is not given separately")
        return super().__call__(image, **kwargs)

    def preprocess(self, inputs, timeout=None):
        if not isinstance(inputs, dict) or "image" not in inputs or "question" not in inputs:
            raise ValueError(f"each input needs an 'image' and a 'question', got {inputs!r}")
        image = load_image(inputs["image"], timeout=timeout)
        return self.processor(images=image, text=inputs["question"], knowledge=inputs.get("knowledge"))

    def _forward(self, model_inputs):
        return self.model(**model_inputs)

    def postprocess(self, model_outputs, top_k=5):
        probabilities = model_outputs.logits.float().sigmoid()[0]
        scores, ids = probabilities.topk(min(top_k, probabilities.shape[-1]))
        id2label = self.model.config.id2label
        return [{"score": score, "answer": id2label[i]} for score, i in zip(scores.tolist(), ids.tolist())]
