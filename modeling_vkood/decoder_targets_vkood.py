"""Decoder texts for VKOODForConditionalGeneration: the start, end and padding tokens of a tokenizer, and the
decoder inputs and labels of target texts (what `VKOODProcessor(answers=...)` returns).

Hub remote code, a flat sibling of `processing_vkood.py`: imports only torch.
"""

import torch


def tokenizer_decoder_tokens(tokenizer) -> dict[str, int]:
    """The start, end and padding token ids of decoder texts in `tokenizer`: BERT-style [CLS] / [SEP] / [PAD], or a
    causal tokenizer's BOS / EOS / PAD (EOS pads where there is no PAD). What `VKOODConfig.decoder_config` holds as
    `bos_token_id` / `eos_token_id` / `pad_token_id`, so that the model starts and stops where the targets do."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    if start is None or end is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has neither [CLS]/[SEP] nor BOS/EOS tokens to start and end decoder texts"
        )
    return {"bos_token_id": start, "eos_token_id": end, "pad_token_id": pad}


def decoder_targets(tokenizer, texts: list[str], max_length: int = 32) -> dict[str, torch.Tensor]:
    """Decoder inputs and labels for target `texts`: `decoder_input_ids` (B, T) = [start, tokens..., end, pad...]
    (at most `max_length` tokens: a longer text is cut, and still ends with the end token), its
    `decoder_attention_mask`, and `labels` = the same tokens with -100 at the start token and the padding, so that
    the loss counts exactly the text's tokens and its end."""
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError("answers must be a string or a list of strings")
    if max_length < 3:
        raise ValueError(f"max_answer_length={max_length} leaves no room for a token between start and end")
    special = tokenizer_decoder_tokens(tokenizer)
    encoded = tokenizer(
        list(texts),
        add_special_tokens=False,
        truncation=True,
        max_length=max_length - 2,
        return_attention_mask=False,
    )["input_ids"]
    rows = [[special["bos_token_id"], *ids, special["eos_token_id"]] for ids in encoded]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), special["pad_token_id"], dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = torch.tensor(row)
        attention_mask[index, : len(row)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, 0] = -100
    return {"decoder_input_ids": input_ids, "decoder_attention_mask": attention_mask, "labels": labels}


__all__ = ["decoder_targets", "tokenizer_decoder_tokens"]
