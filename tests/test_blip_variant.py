"""VK-OOD-BLIP (`VKOODBlipForQuestionAnswering`): a BLIP VQA checkpoint in transformers' format loads unchanged (only
the VK-OOD modules are new); without knowledge, and with knowledge whose gates are hard 0, it computes exactly what
transformers' `BlipForQuestionAnswering` computes (decoder logits, loss, greedy and beam `generate`); padded item slots
change nothing, an item let through does change the answer, and the gradient reaches the OOD layer through the gate;
a batch with padded questions and mixed item counts gives every row what it gets alone."""

import pytest
import torch
from transformers import BlipForQuestionAnswering

from modeling_vkood import VKOODBlipForQuestionAnswering, VKOODBlipProcessor
from tests.utils.tiny_blip import blip_image_processor, blip_tokenizer, save_tiny_blip

NEW_KEYS = {
    "knowledge_projection.weight",
    "knowledge_projection.bias",
    "ood.projection.weight",
    "ood.projection.bias",
    "ood.threshold",
    "ood.threshold_calibrated",
}
QUESTIONS = ["what colour is the ball?", "how many dogs are there?"]  # the same token count: no question padding
FACTS = [["a ball is round", "red is a colour"], ["dogs are animals", "a dog has four legs", "two is a number"]]
ANSWERS = ["dark red", "two", "yes"]


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory, minilm_path):
    return save_tiny_blip(tmp_path_factory.mktemp("tiny_blip"), minilm_path)


@pytest.fixture(scope="module")
def reference(blip_folder):
    return BlipForQuestionAnswering.from_pretrained(blip_folder).eval()


@pytest.fixture(scope="module")
def loaded(blip_folder):
    model, info = VKOODBlipForQuestionAnswering.from_pretrained(blip_folder, output_loading_info=True)
    return model.eval(), info


@pytest.fixture(scope="module")
def model(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def processor(minilm_path, model):
    return VKOODBlipProcessor.from_model_config(blip_image_processor(), blip_tokenizer(minilm_path), model.config)


def pixels(batch, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def question_inputs(processor, questions=QUESTIONS, knowledge=None):
    encoded = processor(text=list(questions), knowledge=knowledge)
    encoded["pixel_values"] = pixels(len(questions))
    return dict(encoded)


def reference_logits(reference, **inputs):
    """transformers' BLIP forward returns no logits: its answer decoder's, captured on the way."""
    captured = {}
    handle = reference.text_decoder.register_forward_hook(lambda module, args, output: captured.update(out=output))
    try:
        with torch.no_grad():
            loss = reference(**inputs).loss
    finally:
        handle.remove()
    return captured["out"].logits, loss


def close_gates(model):
    """Hard gates that keep nothing: every item's gate is exactly 0."""
    model.ood.hard_gate = True
    model.ood.set_threshold(1e9)


def open_gates(model):
    model.ood.hard_gate = True
    model.ood.set_threshold(-1e9)


@pytest.fixture
def gates(model):
    """Restore the OOD layer's gate settings after a test changes them."""
    hard, threshold = model.ood.hard_gate, model.ood.threshold.detach().clone()
    yield
    model.ood.hard_gate = hard
    model.ood.set_threshold(threshold)


def test_every_blip_weight_loads_unchanged_and_only_vkood_modules_are_new(loaded, reference):
    model, info = loaded
    assert set(info["missing_keys"]) == NEW_KEYS
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = model.state_dict()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)
    assert set(ours) - set(reference.state_dict()) == NEW_KEYS
    # the decoder's output layer stays tied to its word embeddings, as in BLIP
    assert (
        model.text_decoder.cls.predictions.decoder.weight is model.text_decoder.bert.embeddings.word_embeddings.weight
    )


def test_without_knowledge_logits_loss_and_generate_are_blips(model, reference, processor):
    inputs = question_inputs(processor)
    labels = processor.decoder_targets(ANSWERS[:2])["decoder_input_ids"]
    expected_logits, expected_loss = reference_logits(reference, **inputs, labels=labels)
    with torch.no_grad():
        output = model(**inputs, labels=labels)
    torch.testing.assert_close(output.logits, expected_logits, rtol=0, atol=0)
    torch.testing.assert_close(output.loss, expected_loss, rtol=0, atol=0)
    for options in ({}, {"num_beams": 3}, {"num_beams": 3, "num_return_sequences": 2}):
        expected = reference.generate(**inputs, max_new_tokens=6, **options)
        torch.testing.assert_close(model.generate(**inputs, max_new_tokens=6, **options), expected, rtol=0, atol=0)


def test_hard_zero_gates_give_blips_outputs(model, reference, processor, gates):
    close_gates(model)
    plain = question_inputs(processor)
    inputs = question_inputs(processor, knowledge=FACTS)
    labels = processor.decoder_targets(ANSWERS[:2])["decoder_input_ids"]
    expected_logits, expected_loss = reference_logits(reference, **plain, labels=labels)
    with torch.no_grad():
        output = model(**inputs, labels=labels)
    assert torch.equal(output.ood_gate, torch.zeros_like(output.ood_gate))
    torch.testing.assert_close(output.logits, expected_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(output.loss, expected_loss, rtol=1e-6, atol=1e-6)
    for options in ({}, {"num_beams": 3}):
        expected = reference.generate(**plain, max_new_tokens=6, **options)
        assert torch.equal(model.generate(**inputs, max_new_tokens=6, **options), expected)


def test_an_item_let_through_changes_the_question_states_and_the_answer_distribution(model, processor, gates):
    open_gates(model)
    labels = processor.decoder_targets(ANSWERS[:2])["decoder_input_ids"]
    with torch.no_grad():
        without = model(**question_inputs(processor), labels=labels)
        output = model(**question_inputs(processor, knowledge=FACTS), labels=labels)
    assert torch.equal(output.ood_gate, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))
    # far above the rounding of the hard-0 parity (1e-7): in this tiny random BLIP the decoder reads its
    # question states only weakly, so the logits move less than the states do
    assert (output.question_embeds - without.question_embeds).abs().amax() > 1e-4
    assert (output.logits - without.logits).abs().amax() > 1e-6


def test_padded_item_slots_change_nothing(model, processor):
    """The same items, in a batch padded to more item slots and longer items ("max_length"), give the same outputs;
    the soft gate (the default) is in use, so the padded slots are removed by the mask alone."""
    labels = processor.decoder_targets(ANSWERS[:2])["decoder_input_ids"]
    tight = question_inputs(processor, knowledge=FACTS)
    padded = dict(tight, **processor(knowledge=FACTS, knowledge_padding="max_length"))
    assert padded["knowledge_input_ids"].shape[1:] > tight["knowledge_input_ids"].shape[1:]
    with torch.no_grad():
        expected = model(**tight, labels=labels)
        output = model(**padded, labels=labels)
    torch.testing.assert_close(output.logits, expected.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.ood_gate[:, :3], expected.ood_gate, rtol=1e-5, atol=1e-6)
    assert torch.equal(output.ood_gate[:, 3:], torch.zeros_like(output.ood_gate[:, 3:]))
    assert 0 < float(expected.ood_gate[0, 0]) < 1  # a soft gate, neither closed nor open


def test_gradient_reaches_the_ood_layer_and_knowledge_projection_through_the_gate(model, processor):
    inputs = question_inputs(processor, knowledge=FACTS)
    targets = processor.decoder_targets(ANSWERS[:2])
    model.train()
    model.zero_grad()
    try:
        model(**inputs, decoder_input_ids=targets["decoder_input_ids"], labels=targets["labels"]).loss.backward()
    finally:
        model.eval()
    for name in ("knowledge_projection.weight", "ood.projection.weight", "ood.threshold"):
        gradient = model.get_parameter(name).grad
        assert gradient is not None and gradient.abs().sum() > 0, name
    model.zero_grad()


def test_batched_rows_with_padded_questions_and_mixed_items_equal_single_calls(model, processor):
    """Questions of different lengths (padded) and 0..3 items per row: each row's logits, gates and generated answer
    are those of the row alone, because the question padding is masked in the decoder's cross-attention too (which
    transformers' BLIP leaves unmasked)."""
    questions = ["is it red?", "what is the man on the left of the picture holding in his hand?", "why?"]
    knowledge = [["red is a colour"], [], ["a man holds a bat", "a", "bats are used for baseball"]]
    batch = dict(processor(text=questions, knowledge=knowledge), pixel_values=pixels(3, seed=1))
    targets = processor.decoder_targets(ANSWERS)
    with torch.no_grad():
        output = model(**batch, decoder_input_ids=targets["decoder_input_ids"])
        generated = model.generate(**batch, max_new_tokens=5, num_beams=2)
        for row in range(3):
            single = dict(processor(text=questions[row], knowledge=[knowledge[row]]))
            single["pixel_values"] = batch["pixel_values"][row : row + 1]
            alone = model(**single, decoder_input_ids=targets["decoder_input_ids"][row : row + 1])
            torch.testing.assert_close(output.logits[row : row + 1], alone.logits, rtol=1e-5, atol=1e-5)
            items = len(knowledge[row])
            torch.testing.assert_close(output.ood_gate[row, :items], alone.ood_gate[0], rtol=1e-5, atol=1e-6)
            tokens = model.generate(**single, max_new_tokens=5, num_beams=2)[0]
            assert generated[row, : tokens.shape[0]].tolist() == tokens.tolist()


CANDIDATES = ["red", "dark red", "dark blue", "two", "yes", "no", "a red ball", "four legs"]


def brute_force_log_likelihoods(reference, inputs, candidates):
    """Per question and candidate, the log-likelihood of the candidate's tokens after the start token under
    transformers' own BLIP (its question encoder and answer decoder, one candidate at a time)."""
    with torch.no_grad():
        image = reference.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        states = reference.text_encoder(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], encoder_hidden_states=image
        ).last_hidden_state
        scores = torch.zeros(states.shape[0], len(candidates))
        for row in range(states.shape[0]):
            for index, tokens in enumerate(candidates):
                tokens = tokens[None]
                logits = reference.text_decoder(input_ids=tokens, encoder_hidden_states=states[row : row + 1]).logits
                log_probs = logits[0, :-1].log_softmax(-1).gather(-1, tokens[0, 1:, None])
                scores[row, index] = log_probs.sum()
    return scores


def test_rank_inference_orders_candidates_by_blips_likelihood(model, reference, processor):
    inputs = question_inputs(processor)
    answer = processor.answer_candidates(CANDIDATES)
    real = [ids[mask.bool()] for ids, mask in zip(answer["answer_input_ids"], answer["answer_attention_mask"])]
    expected = brute_force_log_likelihoods(reference, inputs, real)
    indices, log_likelihoods = model.rank_answers(**answer, **inputs, k=len(CANDIDATES))
    assert indices.tolist() == expected.argsort(dim=-1, descending=True, stable=True).tolist()
    torch.testing.assert_close(log_likelihoods, expected.gather(1, indices), rtol=1e-5, atol=1e-5)


def test_rank_inference_re_ranks_the_top_k_first_tokens(model, processor):
    """With k below the list size, the k candidates whose first token is likeliest are re-ranked by their whole
    likelihood (BLIP's `rank_answer`); the list's first tokens are distinct, so the top k has no ties."""
    candidates = ["red", "blue", "two", "yes", "no", "four legs", "a ball"]
    inputs = question_inputs(processor)
    answer = processor.answer_candidates(candidates)
    with torch.no_grad():
        start = answer["answer_input_ids"][:1, :1].expand(2, 1)
        first = model(**inputs, decoder_input_ids=start).logits[:, 0].log_softmax(-1)
    first = first[:, answer["answer_input_ids"][:, 1]]
    _, everything = model.rank_answers(**answer, **inputs, k=len(candidates))
    indices, log_likelihoods = model.rank_answers(**answer, **inputs, k=3)
    for row in range(2):
        assert set(indices[row].tolist()) == set(first[row].topk(3).indices.tolist())
    assert (log_likelihoods[:, :-1] >= log_likelihoods[:, 1:]).all()
    all_indices, _ = model.rank_answers(**answer, **inputs, k=len(candidates))
    full = torch.zeros(2, len(candidates)).scatter(1, all_indices, everything)
    torch.testing.assert_close(log_likelihoods, full.gather(1, indices), rtol=1e-5, atol=1e-5)


def test_rank_inference_rows_of_a_padded_batch_equal_single_calls(model, processor):
    questions = ["is it red?", "what is the man on the left of the picture holding?"]
    knowledge = [["red is a colour"], []]
    batch = dict(processor(text=questions, knowledge=knowledge), pixel_values=pixels(2, seed=2))
    answer = processor.answer_candidates(CANDIDATES)
    indices, log_likelihoods = model.rank_answers(**answer, **batch, k=5)
    for row in range(2):
        single = dict(processor(text=questions[row], knowledge=[knowledge[row]]))
        single["pixel_values"] = batch["pixel_values"][row : row + 1]
        alone, alone_scores = model.rank_answers(**answer, **single, k=5)
        assert indices[row].tolist() == alone[0].tolist()
        torch.testing.assert_close(log_likelihoods[row], alone_scores[0], rtol=1e-5, atol=1e-5)


def test_several_weighted_answers_per_question_give_blips_vqa_loss(model, processor):
    """BLIP's VQA objective: each answer's summed token loss, weighted, summed over a question's answers, averaged
    over the questions; a padded answer slot (weight 0, labels -100) adds nothing."""
    answers = [["red", "dark red"], ["two"]]
    weights = [[0.6, 0.3], [1.0]]
    inputs = question_inputs(processor, knowledge=FACTS)
    targets = processor.answer_targets(answers, weights)
    assert targets["labels"].shape[:2] == (2, 2)
    torch.testing.assert_close(targets["answer_weights"], torch.tensor([[0.6, 0.3], [1.0, 0.0]]))
    assert (targets["labels"][1, 1] == -100).all()
    with torch.no_grad():
        loss = model(**inputs, **targets).loss
        expected = torch.zeros(())
        for row, (texts, row_weights) in enumerate(zip(answers, weights)):
            single = {key: value[row : row + 1] for key, value in inputs.items()}
            for text, weight in zip(texts, row_weights):
                target = processor.decoder_targets([text])
                logits = model(**single, decoder_input_ids=target["decoder_input_ids"]).logits
                labels = target["labels"][:, 1:]
                nll = -logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
                expected += weight * nll[labels != -100].sum()
    torch.testing.assert_close(loss, expected / 2, rtol=1e-5, atol=1e-5)
