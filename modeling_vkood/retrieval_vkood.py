"""VKOODForImageTextRetrieval: image-text retrieval (COCO, Flickr30k) as in ALBEF / BLIP (Hub remote code: torch,
transformers and its flat siblings only). Training: ITC on the unimodal CLS projections + ITM on fused pairs with
hard negatives; inference: `rank_gallery` scores a gallery in two stages (ITC for all pairs, ITM re-ranks the top k).
"""

import torch
from torch import nn
from torch.nn import functional as F

from .configuration_vkood import VKOODConfig
from .contrastive_vkood import VKOODLogitScale, contrastive_loss, draw_hard_negatives
from .modeling_vkood import VKOODModel, VKOODPreTrainedModel, knowledge_item_mask
from .ood_vkood import ImageFit
from .outputs_vkood import VKOODRetrievalOutput, fused_fields


class VKOODForImageTextRetrieval(VKOODPreTrainedModel):
    """Image-text retrieval (COCO, Flickr30k) as in ALBEF/BLIP: ITC on unimodal CLS projections + ITM on fused pairs
    with hard negatives drawn from the ITC similarities; `rank_gallery` scores a gallery in two stages.

    A fused pair's score (`rank_scores`) is the ITM logit margin, or with `config.retrieval_score="rank_output"`
    METER's retrieval score `rank_output(pooled)`, trained as METER does (softmax over the positive pair and its
    negatives; here the hard negatives) next to ITC and ITM."""

    def __init__(self, config: VKOODConfig):
        super().__init__(config)
        self.vkood = VKOODModel(config)
        self.image_embedding = nn.Linear(config.hidden_size, config.projection_dim)
        self.text_embedding = nn.Linear(config.hidden_size, config.projection_dim)
        self.logit_scale = VKOODLogitScale()
        self.itm_head = nn.Linear(2 * config.hidden_size, 2)
        self.rank_output = nn.Linear(2 * config.hidden_size, 1) if config.retrieval_score == "rank_output" else None
        self.post_init()

    def _embed(self, projection, tokens):
        return F.normalize(projection(tokens[:, 0]).float(), dim=-1)

    def _itm_scores(self, image_tokens, text_tokens, text_mask, knowledge, knowledge_mask, image_fit=None, **requested):
        """ITM logits (B, 2), pair scores (B,) and the fused pass; `requested`: fuse's `output_attentions` /
        `output_hidden_states`."""
        fused = self.vkood.fuse(
            image_tokens, text_tokens, text_mask, knowledge, knowledge_mask, image_fit=image_fit, **requested
        )
        itm_logits = self.itm_head(fused.pooler_output)
        if self.rank_output is None:
            scores = itm_logits[:, 1] - itm_logits[:, 0]
        else:
            scores = self.rank_output(fused.pooler_output)[:, 0]
        return itm_logits, scores, fused

    def _fit_images(self, image_tokens, knowledge, chunk=None):
        """Each image's OOD mixture, fitted once for all the pairs it is in (`chunk`: images per EM batch); None
        when there is no knowledge item to score."""
        if knowledge is None or knowledge.shape[1] == 0:
            return None
        chunk = chunk or image_tokens.shape[0]
        fits = [
            self.vkood.ood.fit_images(image_tokens[start : start + chunk])
            for start in range(0, image_tokens.shape[0], chunk)
        ]
        return ImageFit.cat(fits) if len(fits) > 1 else fits[0]

    def forward(
        self,
        pixel_values=None,
        input_ids=None,
        attention_mask=None,
        knowledge_input_ids=None,
        knowledge_attention_mask=None,
        knowledge_mask=None,
        image_ids=None,
        return_loss=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """Without `return_loss` (the default, as in CLIP): the fused (ITM) pass of the given pairs, deterministic.
        `return_loss=True` (training; the retrieval collator sets it): ITC + ITM on hard negatives drawn at random,
        with the outputs of the positive pairs. `image_ids` (B,) marks pairs that share an image as positives (several
        captions of one image). `output_attentions`, `output_hidden_states` and `return_dict` as in
        `VKOODModel.forward`."""
        requested = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        base = self.vkood
        text_tokens, attention_mask, knowledge, knowledge_mask = base.encode_inputs(
            input_ids, attention_mask, knowledge_input_ids, knowledge_attention_mask, knowledge_mask, pixel_values
        )
        image_tokens = base.encode_image(pixel_values)
        image_embeds = self._embed(self.image_embedding, image_tokens)
        text_embeds = self._embed(self.text_embedding, text_tokens)
        logits_per_image = self.logit_scale() * image_embeds @ text_embeds.t()
        embeddings = dict(
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            image_embeds=image_embeds,
            text_embeds=text_embeds,
        )
        if not return_loss:
            itm_logits, scores, fused = self._itm_scores(
                image_tokens, text_tokens, attention_mask, knowledge, knowledge_mask, **requested
            )
            output = VKOODRetrievalOutput(
                itm_logits=itm_logits, rank_scores=scores, **embeddings, **fused_fields(fused)
            )
            return self._returned(output, return_dict)
        batch = image_tokens.shape[0]
        if image_ids is None:
            positives = torch.eye(batch, dtype=torch.bool, device=image_tokens.device)
        else:
            positives = image_ids[:, None] == image_ids[None, :]
        itc_loss = contrastive_loss(image_embeds, text_embeds, self.logit_scale(), image_ids, gather=self.training)
        # ITM on the positive pairs, each image with a hard negative text and each text with a hard negative image.
        negative_text, negative_image, has_text_negative, has_image_negative = draw_hard_negatives(
            logits_per_image, positives
        )
        arange = torch.arange(batch, device=image_tokens.device)
        pair_image_index = torch.cat([arange, arange, negative_image])
        pair_image = image_tokens[pair_image_index]
        image_fit = self._fit_images(image_tokens, knowledge)  # one fit per image for its 3 pairs
        pair_text = torch.cat([text_tokens, text_tokens[negative_text], text_tokens])
        pair_mask = torch.cat([attention_mask, attention_mask[negative_text], attention_mask])
        pair_knowledge = pair_knowledge_mask = None
        if knowledge is not None:
            pair_knowledge = torch.cat([knowledge, knowledge[negative_text], knowledge])
            pair_knowledge_mask = torch.cat([knowledge_mask, knowledge_mask[negative_text], knowledge_mask])
        itm_logits, scores, fused = self._itm_scores(
            pair_image,
            pair_text,
            pair_mask,
            pair_knowledge,
            pair_knowledge_mask,
            image_fit=None if image_fit is None else image_fit.select(pair_image_index),
            **requested,
        )
        # A pair without a negative (no non-positive in its row) is left out of the ITM loss; the positive pairs
        # always remain, so the loss stays defined.
        ignore = torch.full_like(negative_text, -100)
        itm_labels = torch.cat(
            [
                torch.ones_like(negative_text),
                torch.where(has_text_negative, torch.zeros_like(negative_text), ignore),
                torch.where(has_image_negative, torch.zeros_like(negative_image), ignore),
            ]
        )
        itm_loss = F.cross_entropy(itm_logits.float(), itm_labels, ignore_index=-100)
        loss = itc_loss + itm_loss
        if self.rank_output is not None:  # each positive against its hard negative text and its hard negative image
            positive, negative_texts, negative_images = scores.float().view(3, batch)
            pairs = torch.stack([positive.repeat(2), torch.cat([negative_texts, negative_images])], dim=1)
            has_negative = torch.cat([has_text_negative, has_image_negative])
            rank_labels = torch.where(has_negative, torch.zeros_like(ignore.repeat(2)), ignore.repeat(2))
            loss = loss + F.cross_entropy(pairs, rank_labels, ignore_index=-100)
        output = VKOODRetrievalOutput(
            loss=loss,
            itm_logits=itm_logits[:batch],
            rank_scores=scores[:batch],
            itc_loss=itc_loss,
            itm_loss=itm_loss,
            **embeddings,
            **fused_fields(fused, lambda tensor: tensor[:batch]),
        )
        return self._returned(output, return_dict)

    @torch.no_grad()
    def encode_gallery_images(self, pixel_values):
        """Image tokens and ITC embeddings of a chunk of the gallery (concatenate chunks along dim 0)."""
        tokens = self.vkood.encode_image(pixel_values)
        return {"tokens": tokens, "embeds": self._embed(self.image_embedding, tokens)}

    @torch.no_grad()
    def encode_gallery_texts(
        self, input_ids, attention_mask, knowledge_input_ids=None, knowledge_attention_mask=None, knowledge_mask=None
    ):
        """Text tokens, knowledge vectors and ITC embeddings of a chunk of the text side of the gallery."""
        tokens = self.vkood.encode_text(input_ids, attention_mask)
        features = {"tokens": tokens, "mask": attention_mask, "embeds": self._embed(self.text_embedding, tokens)}
        if knowledge_input_ids is not None:
            knowledge_mask = knowledge_item_mask(knowledge_input_ids, knowledge_attention_mask, knowledge_mask)
            features["knowledge"] = self.vkood.encode_knowledge(
                knowledge_input_ids, knowledge_attention_mask, knowledge_mask
            )
            features["knowledge_mask"] = knowledge_mask
        return features

    @torch.no_grad()
    def rank_gallery(self, images, texts, k_test=None, pair_batch_size=256, image_queries=None, text_queries=None):
        """Two-stage scores: ITC similarity for all pairs, then ITM re-scores the top `k_test` of every query.

        `images` / `texts` are the (padded to a common length) outputs of `encode_gallery_images` /
        `encode_gallery_texts`. Returns (i2t (I, T), t2i (T, I)); re-ranked entries hold ITM logit-margin + ITC
        similarity (with `rank_output`: its score alone, METER's ranking when `k_test` covers the gallery), the rest
        keep -100 as in ALBEF so that only re-ranked candidates can reach the top.
        `image_queries` / `text_queries` (index tensors; default all) restrict the work to those queries and return
        only their rows: a distributed evaluation gives each process a share of the queries.
        """
        k_test = k_test or self.config.k_test
        similarity = images["embeds"] @ texts["embeds"].t()
        device = similarity.device
        image_queries = torch.arange(similarity.shape[0], device=device) if image_queries is None else image_queries
        text_queries = torch.arange(similarity.shape[1], device=device) if text_queries is None else text_queries
        # Every gallery image's mixture is fitted once, for all the pairs it is re-ranked in.
        image_fit = self._fit_images(images["tokens"], texts.get("knowledge"), chunk=pair_batch_size)
        i2t = self._rerank(
            similarity[image_queries], image_queries, images, texts, k_test, pair_batch_size, True, image_fit
        )
        t2i = self._rerank(
            similarity.t()[text_queries], text_queries, images, texts, k_test, pair_batch_size, False, image_fit
        )
        return i2t, t2i

    def _rerank(self, similarity, query_ids, images, texts, k_test, pair_batch_size, image_queries, image_fit):
        """Scores of the queries `query_ids` (the rows of `similarity`): ITM margin + ITC on their top k, -100 else."""
        k = min(k_test, similarity.shape[1])
        top_similarity, top_index = similarity.topk(k, dim=1)
        queries = query_ids.repeat_interleave(k)
        candidates = top_index.reshape(-1)
        image_index, text_index = (queries, candidates) if image_queries else (candidates, queries)
        itm = [similarity.new_zeros(0)]
        for start in range(0, queries.numel(), pair_batch_size):
            image_part = image_index[start : start + pair_batch_size]
            text_part = text_index[start : start + pair_batch_size]
            knowledge = texts["knowledge"][text_part] if "knowledge" in texts else None
            knowledge_mask = texts["knowledge_mask"][text_part] if "knowledge_mask" in texts else None
            _, scores, _ = self._itm_scores(
                images["tokens"][image_part],
                texts["tokens"][text_part],
                texts["mask"][text_part],
                knowledge,
                knowledge_mask,
                image_fit=None if image_fit is None else image_fit.select(image_part),
            )
            itm.append(scores.to(similarity.dtype))
        reranked = torch.cat(itm).view(-1, k)
        if self.rank_output is None:  # ITM margin + ITC similarity (ALBEF); METER's rank_output score stands alone
            reranked = reranked + top_similarity
        return torch.full_like(similarity, -100.0).scatter(1, top_index, reranked)


__all__ = ["VKOODForImageTextRetrieval"]
