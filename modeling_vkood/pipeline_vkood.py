"""Visual question answering pipeline for VK-OOD (Hub remote code: transformers, torch and the standard library only).

transformers 5 removed its "visual-question-answering" pipeline; a VK-OOD VQA checkpoint names this class under
`config.custom_pipelines`, so `pipeline("visual-question-answering", model=folder, trust_remote_code=True)` works.
Inputs go through the checkpoint's own VKOODProcessor. Without `knowledge`, a checkpoint whose processor has a
knowledge source retrieves each question's items itself, as its training data did; passed items are used as given
(`knowledge=[]`: none):

    vqa(image=image, question="what colour is the shape?")                                # retrieved knowledge
    vqa(image=image, question="what colour is the shape?", knowledge=["red is a colour"])  # these items
    vqa([{"image": a, "question": q, "knowledge": [...]}, ...])                             # a batch of examples
    vqa(image=image, question=q, return_knowledge=True)
    # -> {"answers": [{"answer", "score"}, ...], "knowledge": [{"text", "score", "gate", "kept"}, ...]}

A generative checkpoint (`VKOODForConditionalGeneration`) answers with the texts its decoder generates: the top_k
beams of a beam search (greedy decoding for top_k=1), each with its sequence probability as `score` (the product of
its tokens' probabilities, end token included); `max_new_tokens` (default 16) bounds an answer's length.

A VK-OOD-BLIP checkpoint (`VKOODBlipForQuestionAnswering`) answers either way (`inference=`, default its config's):
"generate" as above, or "rank", BLIP's rank inference over a candidate list (`answer_list=[...]`, default the list
shipped in its config): the top_k candidates by the decoder's likelihood, each with that probability as `score`.

In the knowledge list, `score` is the OOD layer's GEM score of the item against the image, `gate` its gate (the hard
0/1 gate when the model is configured with `ood_hard_gate`) and `kept` whether the gate lets it through (> 0.5).

`vqa(examples, batch_size=n)` runs n examples per model call, padded as the processor pads a batch (question tokens,
item count and item length, each with its mask): every example gets the answers and scores of a call on its own.
"""

import os

import torch
from torch.utils.data import DataLoader
from transformers import Pipeline
from transformers.image_utils import load_image
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

VQA_PIPELINE = {
    "visual-question-answering": {
        "impl": "pipeline_vkood.VKOODVisualQuestionAnsweringPipeline",
        "pt": ["AutoModelForVisualQuestionAnswering"],
        "type": "multimodal",
    }
}
# A generative checkpoint (VKOODForConditionalGeneration) names the same pipeline under its own Auto class.
GENERATIVE_VQA_PIPELINE = {
    "visual-question-answering": {**VQA_PIPELINE["visual-question-answering"], "pt": ["AutoModelForImageTextToText"]}
}
KEPT_ABOVE = 0.5
KNOWLEDGE_KEYS = ("knowledge_input_ids", "knowledge_attention_mask", "knowledge_mask")


class VKOODVisualQuestionAnsweringPipeline(Pipeline):
    """Answers a question about an image with the top-k answers of the vocabulary (sigmoid scores)."""

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(
        self,
        top_k=None,
        timeout=None,
        return_knowledge=None,
        max_new_tokens=None,
        inference=None,
        answer_list=None,
        **kwargs,
    ):
        preprocess = {} if timeout is None else {"timeout": timeout}
        postprocess = {} if top_k is None else {"top_k": top_k}
        forward = {} if top_k is None else {"top_k": top_k}
        if max_new_tokens is not None:
            forward["max_new_tokens"] = max_new_tokens
        if return_knowledge is not None:
            postprocess["return_knowledge"] = return_knowledge
        if inference is not None or answer_list is not None:
            forward.update(inference=self._inference(inference, answer_list), answer_list=answer_list)
            postprocess["answer_list"] = answer_list
        return preprocess, forward, postprocess

    def _inference(self, inference, answer_list):
        """How the model answers: "generate", "rank" (a model with `rank_answers`) or "classify" (the vocabulary)."""
        if not getattr(self.model, "generates_answers", False):
            if inference is not None or answer_list is not None:
                raise ValueError("`inference` and `answer_list` are for models that answer with texts")
            return "classify"
        if inference is None:
            inference = "rank" if answer_list is not None else getattr(self.model.config, "inference", "generate")
        if inference not in ("generate", "rank"):
            raise ValueError(f"inference must be 'generate' or 'rank', got {inference!r}")
        if inference == "rank":
            if not getattr(self.model, "ranks_answers", False):
                raise ValueError(f"{type(self.model).__name__} has no rank inference (`rank_answers`)")
            if not self._answer_list(answer_list):
                raise ValueError("rank inference needs an answer_list: pass one, or ship one in config.answer_list")
        return inference

    def _answer_list(self, answer_list=None):
        """The candidates of rank inference: the given list, else the checkpoint's `config.answer_list`."""
        return answer_list if answer_list is not None else getattr(self.model.config, "answer_list", None)

    def _answer_candidates(self, answer_list):
        """The tokenised candidates (`VKOODBlipProcessor.answer_candidates`), kept for the next call with the same
        list (BLIP's VQAv2 list has 3,128 answers)."""
        key = tuple(answer_list)
        cached = getattr(self, "_candidates", None)
        if cached is None or cached[0] != key:
            candidates = self.processor.answer_candidates(list(answer_list))
            self._candidates = (key, {name: tensor.to(self.device) for name, tensor in candidates.items()})
        return self._candidates[1]

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
        question, knowledge = inputs["question"], inputs.get("knowledge")
        if knowledge is None and self.processor.has_knowledge_source:
            (knowledge,) = self.processor.retrieve_knowledge([question])
        if knowledge is None:
            return {**self.processor(images=image, text=question), "knowledge_texts": []}
        (sentences,) = self.processor.knowledge_sentences([knowledge])
        model_inputs = self.processor(images=image, text=question, knowledge=[sentences])
        return {**model_inputs, "knowledge_texts": sentences}

    def get_iterator(
        self, inputs, num_workers: int, batch_size: int, preprocess_params, forward_params, postprocess_params
    ):
        """As `Pipeline.get_iterator`, with `collate` batching the examples (transformers' generic padding knows
        neither the (B, M, Lk) knowledge tensors nor the per-example item sentences)."""
        if not hasattr(inputs, "__len__"):
            raise TypeError("the VK-OOD pipeline takes a list (or dataset) of examples, not a generator")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        collate = (lambda rows: rows[0]) if batch_size == 1 else self.collate
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=collate)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def collate(self, rows: list[dict]) -> dict:
        """One batch of `preprocess` outputs, padded as `VKOODProcessor` pads a batch: the question on the
        tokenizer's padding side, the knowledge to the most items and the longest item of the batch, the padding
        masked (attention_mask, knowledge_attention_mask, knowledge_mask = 0) so that no example's result changes.
        An example without knowledge keys (no items, no knowledge source) gets no item slots."""
        pad_id = self.processor.tokenizer.pad_token_id or 0
        left = self.processor.tokenizer.padding_side == "left"
        length = max(row["input_ids"].shape[1] for row in rows)

        def pad_text(tensor, value):
            padding = tensor.new_full((1, length - tensor.shape[1]), value)
            return torch.cat([padding, tensor] if left else [tensor, padding], dim=1)

        if len({tuple(row["pixel_values"].shape) for row in rows}) > 1:
            raise ValueError("images of different sizes after the image processor cannot be batched: use batch_size=1")
        batch = {
            "pixel_values": torch.cat([row["pixel_values"] for row in rows]),
            "input_ids": torch.cat([pad_text(row["input_ids"], pad_id) for row in rows]),
            "attention_mask": torch.cat([pad_text(row["attention_mask"], 0) for row in rows]),
            "knowledge_texts": [row["knowledge_texts"] for row in rows],
        }
        if any("knowledge_mask" in row for row in rows):
            with_items = [row for row in rows if "knowledge_mask" in row]
            items = max(row["knowledge_mask"].shape[1] for row in with_items)
            item_length = max(row["knowledge_input_ids"].shape[2] for row in with_items)
            ids = torch.full((len(rows), items, item_length), pad_id, dtype=torch.long)
            attention = torch.zeros((len(rows), items, item_length), dtype=torch.long)
            mask = torch.zeros((len(rows), items), dtype=torch.long)
            for b, row in enumerate(rows):
                if "knowledge_mask" in row:
                    m, k = row["knowledge_input_ids"].shape[1:]
                    ids[b, :m, :k] = row["knowledge_input_ids"][0]
                    attention[b, :m, :k] = row["knowledge_attention_mask"][0]
                    mask[b, :m] = row["knowledge_mask"][0]
            batch.update(zip(KNOWLEDGE_KEYS, (ids, attention, mask)))
        return batch

    def _forward(self, model_inputs, top_k=5, max_new_tokens=16, inference=None, answer_list=None):
        sentences = model_inputs.pop("knowledge_texts")
        inference = self._inference(None, None) if inference is None else inference
        if inference == "rank":
            return {**self._rank(model_inputs, top_k, answer_list), "knowledge_texts": sentences}
        if inference == "generate":
            return {**self._generate(model_inputs, top_k, max_new_tokens), "knowledge_texts": sentences}
        outputs = self.model(**model_inputs)
        return {
            "logits": outputs.logits,
            "ood_scores": outputs.ood_scores,
            "ood_gate": outputs.ood_gate,
            "knowledge_texts": sentences,
        }

    def _generate(self, model_inputs, top_k, max_new_tokens):
        """The top_k generated answers of each example (B, top_k, T), their log-probabilities (B, top_k) and the
        fused pass's OOD outputs."""
        memory = self.model.encode(**model_inputs)
        beams = {"num_beams": top_k, "num_return_sequences": top_k, "length_penalty": 0.0} if top_k > 1 else {}
        generated = self.model.generate(
            memory=memory, max_new_tokens=max_new_tokens, return_dict_in_generate=True, output_scores=True, **beams
        )
        token_scores = self.model.compute_transition_scores(
            generated.sequences, generated.scores, getattr(generated, "beam_indices", None), normalize_logits=True
        )
        # A sequence's tokens up to its first end token (the padding of a finished sequence is not part of it).
        end = getattr(self.model, "answer_end_token_id", None)
        end = self.model.config.decoder_config.eos_token_id if end is None else end
        ends = generated.sequences[:, -token_scores.shape[1] :] == end
        counted = (ends.long().cumsum(-1) - ends.long()) == 0
        log_probabilities = token_scores.float().masked_fill(~counted, 0.0).sum(-1)
        examples = model_inputs["input_ids"].shape[0]
        return {
            "sequences": generated.sequences.view(examples, -1, generated.sequences.shape[-1]),
            "log_probabilities": log_probabilities.view(examples, -1),
            "ood_scores": memory.ood_scores,
            "ood_gate": memory.ood_gate,
        }

    def _rank(self, model_inputs, top_k, answer_list):
        """BLIP's rank inference (`rank_answers`): the top_k candidates of each example (B, top_k) by the decoder's
        likelihood, their log-likelihoods, and the OOD outputs of the encoding."""
        candidates = self._answer_candidates(self._answer_list(answer_list))
        memory = self.model.encode(**model_inputs)
        depth = max(top_k, getattr(self.model.config, "k_test", top_k))
        indices, log_likelihoods = self.model.rank_answers(**candidates, memory=memory, k=depth)
        return {
            "answer_indices": indices[:, :top_k],
            "log_probabilities": log_likelihoods[:, :top_k],
            "ood_scores": memory.ood_scores,
            "ood_gate": memory.ood_gate,
        }

    def postprocess(self, model_outputs, top_k=5, return_knowledge=False, answer_list=None):
        if "answer_indices" in model_outputs:
            texts = self._answer_list(answer_list)
            probabilities = model_outputs["log_probabilities"][0].float().exp().tolist()
            indices = model_outputs["answer_indices"][0].tolist()
            answers = [{"score": score, "answer": texts[i]} for score, i in zip(probabilities, indices)]
        elif "sequences" in model_outputs:
            texts = self.processor.decode_answers(model_outputs["sequences"][0])
            probabilities = model_outputs["log_probabilities"][0].exp().tolist()
            answers = [{"score": score, "answer": text} for score, text in zip(probabilities, texts)]
            answers = sorted(answers, key=lambda answer: -answer["score"])
        else:
            probabilities = model_outputs["logits"].float().sigmoid()[0]
            scores, ids = probabilities.topk(min(top_k, probabilities.shape[-1]))
            id2label = self.model.config.id2label
            answers = [{"score": score, "answer": id2label[i]} for score, i in zip(scores.tolist(), ids.tolist())]
        if not return_knowledge:
            return answers
        sentences = model_outputs["knowledge_texts"]
        item_scores = model_outputs["ood_scores"][0, : len(sentences)].float().tolist() if sentences else []
        gates = model_outputs["ood_gate"][0, : len(sentences)].float().tolist() if sentences else []
        knowledge = [
            {"text": text, "score": score, "gate": gate, "kept": gate > KEPT_ABOVE}
            for text, score, gate in zip(sentences, item_scores, gates)
        ]
        return {"answers": answers, "knowledge": knowledge}
