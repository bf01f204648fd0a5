"""VKOODForConditionalGeneration: generated answers after training, greedy vs beam search, the answer-token loss, save
-> load as Hub remote code (model and pipeline), LoRA merge, and SelTDA's pseudo-labelled dataset read back by the
training data path."""

import json
import shutil

import PIL.Image
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, CLIPImageProcessorPil, TrainingArguments

from modeling_vkood import VKOODForConditionalGeneration, VKOODProcessor, pipeline_vkood
from modeling_vkood.evaluation import vqa_accuracy
from modeling_vkood.generation_vkood import answer_token_loss
from modeling_vkood.training import VKOODTrainer
from modeling_vkood.training.collators import parse_question_answer, question_answer_text
from modeling_vkood.training.generation_eval import generated_vqa_metrics
from tests.utils.tiny import tiny_batch, tiny_decoder_config, tiny_vkood_config
from tests.utils.without_package import run_without_package

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "white": (250, 250, 250)}
# One question per image; the answers have 1 to 3 words, so the decoder must also learn where to stop.
QUESTIONS = ["what colour is it?", "which colour is this?", "is it green?", "what is the colour of this picture?"]
ANSWERS = ["red", "dark blue", "yes", "white and bright"]
KNOWLEDGE = [["red is a colour"], [], ["green is a colour", "grass is green"], ["snow is white"]]


def deterministic_config(**overrides):
    config = tiny_vkood_config(
        decoder_config=tiny_decoder_config(),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **overrides,
        ood_config=dict(max_iter=5),
    )
    config.text_config.hidden_dropout_prob = config.text_config.attention_probs_dropout_prob = 0.0
    return config


def tiny_processor(minilm_path, config):
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return VKOODProcessor.from_model_config(image_processor, AutoTokenizer.from_pretrained(minilm_path), config)


def images():
    return [PIL.Image.new("RGB", (32, 32), colour) for colour in COLOURS.values()]


def inputs(processor, with_answers=False):
    extra = {"answers": ANSWERS} if with_answers else {}
    return dict(processor(images=images(), text=QUESTIONS, knowledge=KNOWLEDGE, **extra))


@pytest.fixture(scope="module")
def trained(minilm_path):
    """A tiny model trained until it answers the four questions (full batch, Adam)."""
    torch.manual_seed(0)
    config = deterministic_config()
    model = VKOODForConditionalGeneration(config)
    processor = tiny_processor(minilm_path, config)
    batch = inputs(processor, with_answers=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(150):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), processor, float(loss.detach())


@pytest.mark.slow
def test_generate_after_training_reproduces_the_trained_answers(trained):
    model, processor, final_loss = trained
    assert final_loss < 0.5  # from 10.4 (uniform over the 30522 tokens)
    sequences = model.generate(**inputs(processor), max_new_tokens=8)
    assert processor.decode_answers(sequences) == ANSWERS
    # Every sequence starts with the decoder's start token and stops at its end token.
    assert (sequences[:, 0] == model.config.decoder_config.bos_token_id).all()
    assert ((sequences == model.config.decoder_config.eos_token_id).sum(-1) == 1).all()


@pytest.mark.slow
def test_beam_search_and_greedy_agree_where_they_must(trained):
    model, processor, _ = trained
    batch = inputs(processor)
    greedy = model.generate(**batch, max_new_tokens=8)
    # num_beams=1 is greedy search; with and without the key/value cache alike.
    torch.testing.assert_close(model.generate(**batch, max_new_tokens=8, num_beams=1, do_sample=False), greedy)
    torch.testing.assert_close(model.generate(**batch, max_new_tokens=8, use_cache=False), greedy)
    # The trained model is peaked: the best beam is the greedy sequence, and beams are ordered by their score.
    beams = model.generate(
        **batch, max_new_tokens=8, num_beams=3, num_return_sequences=3, return_dict_in_generate=True, output_scores=True
    )
    best = beams.sequences.view(len(ANSWERS), 3, -1)[:, 0]
    assert processor.decode_answers(best) == ANSWERS
    scores = beams.sequences_scores.view(len(ANSWERS), 3)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    # The fused states encoded once (`encode`) and handed to generate give the same ids.
    memory = model.encode(**batch)
    torch.testing.assert_close(model.generate(memory=memory, max_new_tokens=8), greedy)


def test_loss_counts_the_answer_tokens_only_averaged_over_the_batch(minilm_path):
    torch.manual_seed(1)
    config = deterministic_config()
    model = VKOODForConditionalGeneration(config).eval()
    processor = tiny_processor(minilm_path, config)
    batch = inputs(processor, with_answers=True)
    labels, decoder_ids = batch["labels"], batch["decoder_input_ids"]
    assert (labels[:, 0] == -100).all() and (labels[batch["decoder_attention_mask"] == 0] == -100).all()
    with torch.no_grad():
        output = model(**batch)
        # The mean of -log p(token) over every answer token (and end token) of the batch.
        log_probabilities = output.logits[:, :-1].log_softmax(-1)
        targets = labels[:, 1:]
        counted = targets != -100
        picked = log_probabilities.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(output.loss, -(picked * counted).sum() / counted.sum())
        # Tokens at -100 positions after an answer (padding) change neither the loss nor any counted logit.
        padded = decoder_ids.masked_fill(batch["decoder_attention_mask"] == 0, 1999)
        assert not torch.equal(padded, decoder_ids)
        changed = model(**{**batch, "decoder_input_ids": padded})
        torch.testing.assert_close(changed.loss, output.loss, rtol=0, atol=1e-6)
        # The label's value at an ignored position is never read; at a counted one it is.
        relabelled = labels.clone()
        relabelled[:, 0] = 7
        assert answer_token_loss(output.logits, relabelled) == answer_token_loss(output.logits, labels)
        relabelled = labels.clone()
        relabelled[0, 1] = 1999
        assert answer_token_loss(output.logits, relabelled) != answer_token_loss(output.logits, labels)
        # Averaged over tokens, not over examples: the batch loss weighs each half by its answer tokens.
        halves = [{key: value[part] for key, value in batch.items()} for part in (slice(0, 2), slice(2, 4))]
        losses = [model(**half).loss for half in halves]
        counts = [(half["labels"][:, 1:] != -100).sum() for half in halves]
        torch.testing.assert_close(output.loss, (losses[0] * counts[0] + losses[1] * counts[1]) / sum(counts))


def test_forward_takes_transformers_decoder_arguments():
    """As transformers' decoders take them: `past_key_values` (the cache's old name, with a warning), `use_cache`,
    `output_attentions` / `output_hidden_states` (the decoder's in the standard fields, the fused pass's per stream)
    and `shift_labels` (targets already aligned with the logits, as the Trainer passes them under sequence
    parallelism)."""
    torch.manual_seed(0)
    config = deterministic_config()
    config._attn_implementation = "eager"
    model = VKOODForConditionalGeneration(config).eval()
    batch = tiny_batch()
    prefix, step = torch.tensor([[101, 1037]] * 3), torch.tensor([[2003]] * 3)
    with torch.no_grad():
        full = model(
            **batch, decoder_input_ids=torch.cat([prefix, step], 1), output_attentions=True, output_hidden_states=True
        )
        first = model(**batch, decoder_input_ids=prefix, use_cache=True)
        with pytest.warns(FutureWarning, match="past_key_values"):
            cached = model(**batch, decoder_input_ids=step, past_key_values=first.cache, use_cache=True)
        labels = torch.cat([prefix, step], 1)
        shifted = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], 1)
        assert model(**batch, labels=labels, shift_labels=shifted).loss == model(**batch, labels=labels).loss
        other = model(**batch, labels=labels, shift_labels=shifted.roll(1, dims=1)).loss
    torch.testing.assert_close(cached.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-5)
    layers = config.decoder_config.num_hidden_layers
    assert len(full.hidden_states) == layers + 1 and full.hidden_states[0].shape == (3, 3, 32)
    assert len(full.attentions) == layers and full.attentions[0].shape == (3, 2, 3, 3)
    assert (
        full.cross_attentions[0].shape[-1] == full.text_hidden_states[0].shape[1] + full.image_hidden_states[0].shape[1]
    )
    assert len(full.text_self_attentions) == config.num_fusion_layers
    assert other != model(**batch, labels=labels).loss


def test_the_head_honours_the_trainer_loss_contract_also_under_peft(tmp_path):
    model = VKOODForConditionalGeneration(deterministic_config(pretrained_backbones=["vision_model", "text_model"]))
    lora = LoraConfig(r=2, target_modules=model.lora_target_modules(), modules_to_save=model.modules_to_save())
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    for wrapped in (model, get_peft_model(model, lora)):
        assert VKOODTrainer(model=wrapped, args=args).model_accepts_loss_kwargs is False
    assert {"text_decoder", "memory_projection"} <= set(model.modules_to_save())  # new modules: trained in full
    with pytest.raises(TypeError, match="num_items_in_batch"):
        model(num_items_in_batch=8)


@pytest.mark.slow
def test_lora_merge_and_unload_keeps_the_generations(trained):
    trained_model, processor, _ = trained
    torch.manual_seed(2)
    model = VKOODForConditionalGeneration(deterministic_config(pretrained_backbones=["vision_model", "text_model"]))
    model.load_state_dict(trained_model.state_dict())
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=model.lora_target_modules(), modules_to_save=model.modules_to_save()
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # adapters that change the backbones (a fresh LoRA B is 0 and would merge trivially)
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    peft_model.eval()
    batch = inputs(processor)
    adapted = peft_model.generate(**batch, max_new_tokens=8, num_beams=2)
    adapted_logits = peft_model(**inputs(processor, with_answers=True)).logits
    merged = peft_model.merge_and_unload().eval()
    assert type(merged) is VKOODForConditionalGeneration
    torch.testing.assert_close(merged.generate(**batch, max_new_tokens=8, num_beams=2), adapted)
    torch.testing.assert_close(
        merged(**inputs(processor, with_answers=True)).logits, adapted_logits, rtol=1e-4, atol=1e-4
    )


@pytest.mark.slow
def test_save_load_as_remote_code_gives_the_same_generations_and_pipeline_answers(trained, tmp_path):
    model, processor, _ = trained
    folder = tmp_path / "checkpoint"
    model.config.custom_pipelines = pipeline_vkood.GENERATIVE_VQA_PIPELINE  # as save_output_folder ships it
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    shutil.copy(pipeline_vkood.__file__, folder / "pipeline_vkood.py")
    names = {path.name for path in folder.iterdir()}
    assert {"generation_vkood.py", "modeling_vkood.py", "configuration_vkood.py", "ood_vkood.py"} <= names
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "generation_vkood.VKOODForConditionalGeneration"
    assert auto_map["AutoProcessor"] == "processing_vkood.VKOODProcessor"

    batch = inputs(processor)
    expected = {
        "greedy": model.generate(**batch, max_new_tokens=8),
        "beams": model.generate(**batch, max_new_tokens=8, num_beams=3),
    }
    reloaded = VKOODForConditionalGeneration.from_pretrained(folder).eval()
    torch.testing.assert_close(reloaded.generate(**batch, max_new_tokens=8), expected["greedy"], rtol=0, atol=0)
    for index, image in enumerate(images()):
        image.save(tmp_path / f"{index}.png")
    run_without_package(
        f"""
        import json, PIL.Image, torch, transformers
        model = transformers.AutoModelForImageTextToText.from_pretrained("checkpoint", trust_remote_code=True).eval()
        assert type(model).__name__ == "VKOODForConditionalGeneration", type(model)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        processor = transformers.AutoProcessor.from_pretrained("checkpoint", trust_remote_code=True)
        images = [PIL.Image.open(f"{{i}}.png") for i in range(4)]
        batch = processor(images=images, text={QUESTIONS!r}, knowledge={KNOWLEDGE!r})
        greedy = model.generate(**batch, max_new_tokens=8)
        beams = model.generate(**batch, max_new_tokens=8, num_beams=3)
        torch.save({{"greedy": greedy, "beams": beams}}, "remote.pt")
        vqa = transformers.pipeline("visual-question-answering", model="checkpoint", trust_remote_code=True)
        answers = [vqa(image=f"{{i}}.png", question=q, knowledge=k, top_k=1)
                   for i, (q, k) in enumerate(zip({QUESTIONS!r}, {KNOWLEDGE!r}))]
        top3 = vqa(image="0.png", question={QUESTIONS[0]!r}, knowledge={KNOWLEDGE[0]!r}, top_k=3)
        json.dump(
            {{"answers": answers, "top3": top3, "texts": processor.decode_answers(greedy)}}, open("out.json", "w")
        )
        """,
        tmp_path,
    )
    remote = torch.load(tmp_path / "remote.pt")
    for key, value in expected.items():
        torch.testing.assert_close(remote[key], value, rtol=0, atol=0)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["texts"] == ANSWERS
    assert [found[0]["answer"] for found in out["answers"]] == ANSWERS
    # The pipeline's score is the sequence probability: the product of the answer's token probabilities.
    with torch.no_grad():
        single = {key: value[:1] for key, value in inputs(processor, with_answers=True).items()}
        logits = model(**single).logits[0, :-1].log_softmax(-1)
        targets = single["labels"][0, 1:]
        probability = logits[targets != -100].gather(-1, targets[targets != -100].unsqueeze(-1)).sum().exp()
    assert out["answers"][0][0]["score"] == pytest.approx(float(probability), rel=1e-4)
    top3 = out["top3"]
    assert len(top3) == 3 and top3[0]["answer"] == ANSWERS[0]
    assert [a["score"] for a in top3] == sorted((a["score"] for a in top3), reverse=True) and top3[0]["score"] <= 1.0


def test_question_answer_texts_round_trip_also_through_the_tokenizer(minilm_path):
    text = question_answer_text(" what shape is in the image? ", "circle ")
    assert text == "question: what shape is in the image? answer: circle"
    assert parse_question_answer(text) == ("what shape is in the image?", "circle")
    # What the teacher's generated ids decode to (WordPiece writes "question : ... answer : ...").
    processor = tiny_processor(minilm_path, deterministic_config())
    decoded = processor.decode_answers(processor.decoder_targets([text])["decoder_input_ids"])
    assert parse_question_answer(decoded[0]) == ("what shape is in the image?", "circle")
    for broken in ("what shape? circle", "question: answer: circle", "question: what shape? answer:"):
        assert parse_question_answer(broken) is None


def test_generated_answers_are_scored_with_the_official_normalisation():
    references = [["two"] * 3 + ["2"] * 7, ["yes"] * 10, ["red"]]
    dataset = {"answers": references, "answer_type": ["number", "yes/no", "other"]}
    predictions = ["2.", "Yes", "red"]
    metrics = generated_vqa_metrics(predictions, dataset)
    assert metrics["vqa_accuracy"] == pytest.approx(vqa_accuracy(predictions, references)["overall"])
    # "2." normalises to "2" (the annotators disagree); "Yes" is compared raw (all ten said "yes"), as officially.
    assert metrics["vqa_accuracy_number"] == 100.0 and metrics["vqa_accuracy_yes_no"] == 0.0
    assert metrics["vqa_accuracy_other"] == 100.0
