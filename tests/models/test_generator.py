"""models/generator.py: answer extraction, the versioned RAG prompt, passage cutting and context-length
dropping, and batched generation on the tiny random Llama (512 positions); one slow test on the packaged
Gemma 3 270M."""

from __future__ import annotations

import dataclasses
import json
import re
from types import SimpleNamespace

import pytest

from models.generator import (
    Passage,
    RagAnswer,
    RagGenerator,
    RagPrompt,
    context_limit,
    extract_answer,
    load_generator,
)
from models.loading import load_causal_lm
from tests.conftest import SHARED_DATA

QUESTION = "who founded the company?"


@pytest.fixture(scope="module")
def tiny(tiny_causal_lm):
    return load_causal_lm(str(tiny_causal_lm), dtype="fp32", device="cpu")


def words(word: str, n: int) -> str:
    return " ".join([word] * n)


# ------------------------------------------------------------------------------------ answer extraction


@pytest.mark.parametrize(
    ("raw", "question", "answer"),
    [
        ("Paris", "where?", "Paris"),
        ("  Paris.  ", "where?", "Paris"),
        ("Answer: Paris", "where?", "Paris"),
        ("answer:Paris", "where?", "Paris"),
        ("A: Paris", "where?", "Paris"),
        ("The answer is Paris.", "where?", "Paris"),
        ("the answer is: Paris", "where?", "Paris"),
        ("**Paris**", "where?", "Paris"),
        ("**Answer:** Paris", "where?", "Paris"),
        ('"Paris."', "where?", "Paris"),
        ("“Paris”", "where?", "Paris"),
        ("'Allo 'Allo", "which show?", "'Allo 'Allo"),  # not a quote pair: kept
        ("Paris\nThe capital of France.", "where?", "Paris"),
        ("\n\n  Paris\nLondon", "where?", "Paris"),
        ("Answer:\nParis", "where?", "Paris"),  # a line with nothing left is skipped
        ("Where is the Louvre? Paris", "Where is the Louvre?", "Paris"),
        ("where is the louvre Paris", "Where is the Louvre?", "Paris"),
        ("Question: Where is the Louvre?\nAnswer: Paris", "Where is the Louvre?", "Paris"),
        ("Where is the Louvre?", "Where is the Louvre?", ""),
        ("Whoever wrote it", "Who", "Whoever wrote it"),  # the question as a word prefix only: kept
        ("A Tale of Two Cities", "which novel?", "A Tale of Two Cities"),  # "A" without a colon
        ("Washington, D.C.", "where?", "Washington, D.C."),  # an abbreviation keeps its stop
        ("the U.S.", "where?", "the U.S."),
        ("1945.", "when?", "1945"),
        ("3.5 million", "how many?", "3.5 million"),
        ("[1] Title: Shirley Temple", "who?", "Shirley Temple"),
        ("1. The city of New York.", "where?", "The city of New York"),
        ("User: ", "where?", ""),  # a base model starting the next turn: no answer
        ("Assistant: Paris", "where?", "Paris"),
        ("", "where?", ""),
        ("  \n \n", "where?", ""),
        ("...", "where?", "..."),
    ],
)
def test_extract_answer(raw, question, answer):
    assert extract_answer(raw, question) == answer


# ------------------------------------------------------------------------------------------- the prompt


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, tuple):
        return (*value, "###")
    return value + " x"


def test_prompt_version_is_name_at_hash_and_changes_with_every_field():
    base = RagPrompt()
    assert re.fullmatch(r"rag-v1@[0-9a-f]{8}", base.version)
    assert RagPrompt().version == base.version
    versions = {base.version}
    for f in dataclasses.fields(RagPrompt):
        changed = dataclasses.replace(base, **{f.name: _changed(getattr(base, f.name))})
        assert changed.version not in versions, f.name
        versions.add(changed.version)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"passage_tokens": 0}, "passage_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"passage": "[{i}] {title}"}, "passage"),
        ({"request": "Question: {question}"}, "request"),
        ({"closed_book_request": "Answer:"}, "closed_book_request"),
    ],
)
def test_bad_prompt_fields_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        RagPrompt(**kwargs)


def test_passages_are_numbered_with_titles_and_closed_book_shows_none():
    p = RagPrompt()
    (role, ack, request) = p.messages("who?", [("Paris", "Capital of France."), (None, "No title here.")])
    assert (role["role"], ack["role"], request["role"]) == ("user", "assistant", "user")
    assert "[1] Title: Paris\nCapital of France.\n[2] No title here." in request["content"]
    assert request["content"].rstrip().endswith("Question: who?\n\n Answer:")
    closed = p.messages("who?", [])[-1]["content"]
    assert "[1]" not in closed and "information" not in closed and "Question: who?" in closed


# ----------------------------------------------------------------------------------- fitting the model


def test_context_limit_takes_the_smallest_sane_bound(tiny):
    assert context_limit(tiny.model, tiny.tokenizer) == 512  # the tokenizer states no limit (1e30)
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=2048))
    assert context_limit(model, SimpleNamespace(model_max_length=1024)) == 1024
    assert context_limit(model, SimpleNamespace(model_max_length=int(1e30))) == 2048
    assert context_limit(SimpleNamespace(config=None), SimpleNamespace(model_max_length=None)) is None


def test_passages_are_cut_to_the_token_budget_and_counted(tiny):
    gen = RagGenerator(tiny.model, tiny.tokenizer, RagPrompt(passage_tokens=10))
    enc = gen.encode(QUESTION, [Passage("a", words("river", 25), "town"), Passage("b", words("ceo", 10))])
    assert (enc.truncated_passages, enc.dropped_passages, enc.question_cut) == (1, 0, False)
    text = tiny.tokenizer.decode(enc.ids)
    assert text.count("river") == 10 and text.count("ceo") == 10


def test_overflowing_passages_drop_the_lowest_ranked_until_the_prompt_fits(tiny):
    prompt = RagPrompt(passage_tokens=150)
    gen = RagGenerator(tiny.model, tiny.tokenizer, prompt)
    limit = 512 - prompt.max_new_tokens
    assert gen.max_prompt_tokens == limit
    kinds = ["river", "town", "company", "species", "lives"]
    passages = [Passage(str(i), words(w, 200), w) for i, w in enumerate(kinds)]
    question = "who was where?"  # no passage word in it: a passage word in the prompt is its passage
    enc = gen.encode(question, passages)
    kept = len(kinds) - enc.dropped_passages
    assert 1 <= kept < len(kinds) and enc.truncated_passages == len(kinds)
    assert len(enc.ids) <= limit
    text = tiny.tokenizer.decode(enc.ids)
    assert all((w in text) == (i < kept) for i, w in enumerate(kinds))  # the best-ranked ones stay
    one_more = gen._ids(question, [(w, words(w, 150)) for w in kinds[: kept + 1]])
    assert len(one_more) > limit  # no passage dropped that would have fitted
    (answer,) = gen.generate([question], [passages])
    assert answer.dropped_passages == enc.dropped_passages and answer.prompt_tokens == len(enc.ids)


def test_a_question_too_long_alone_is_cut_from_the_left(tiny):
    gen = RagGenerator(tiny.model, tiny.tokenizer)
    question = words("who", 600) + " river"
    enc = gen.encode(question, [Passage("a", "town town")])
    assert enc.question_cut and enc.dropped_passages == 1
    assert gen.max_prompt_tokens - 3 <= len(enc.ids) <= gen.max_prompt_tokens
    assert "river" in tiny.tokenizer.decode(enc.ids)  # the question's end is kept
    (answer,) = gen.generate([question], [[]])
    assert answer.question_cut and answer.prompt_tokens <= gen.max_prompt_tokens


def test_a_prompt_that_cannot_fit_with_no_question_raises_naming_max_new_tokens(tiny):
    with pytest.raises(ValueError, match=r"^max_new_tokens: 500 new tokens leave 12 of the model's 512"):
        RagGenerator(tiny.model, tiny.tokenizer, RagPrompt(max_new_tokens=500))


# -------------------------------------------------------------------------------------------- generating


def test_generate_one_answer_per_question_closed_book_included(tiny):
    gen = RagGenerator(tiny.model, tiny.tokenizer, RagPrompt(max_new_tokens=6), batch_size=2)
    questions = [QUESTION, "where is the river?", "who lives in the town?"]
    contexts = [
        [Passage("a", "the company was founded", "company")],
        [],
        [Passage("b", "the town"), Passage("c", "")],
    ]
    answers = gen.generate(questions, contexts)
    assert len(answers) == 3 and all(isinstance(a, RagAnswer) for a in answers)
    for q, a in zip(questions, answers, strict=True):
        assert a.answer == extract_answer(a.raw, q)
    assert sum(bool(a.raw) for a in answers) >= 1  # the random model writes something
    closed = gen.encode(questions[1], [])
    assert answers[1].prompt_tokens == len(closed.ids) and answers[1].dropped_passages == 0
    assert gen.generate([], []) == []
    with pytest.raises(ValueError, match=r"^contexts: 1 passage lists for 2 questions"):
        gen.generate(questions[:2], contexts[:1])


def test_batched_answers_equal_one_at_a_time(tiny):
    questions = [QUESTION, "where is the river?", "who lives in the town?", "what eats the species?", "how?"]
    contexts = [[Passage("a", words("river", n), "town")] * (n % 3) for n in (3, 40, 9, 70, 1)]
    prompt = RagPrompt(max_new_tokens=8)
    batched = RagGenerator(tiny.model, tiny.tokenizer, prompt, batch_size=3).generate(questions, contexts)
    assert sum(bool(a.raw) for a in batched) >= 3
    single = RagGenerator(tiny.model, tiny.tokenizer, prompt, batch_size=1)
    assert batched == [single.generate([q], [c])[0] for q, c in zip(questions, contexts, strict=True)]


def test_an_empty_generation_is_an_empty_answer(tiny):
    eos = tiny.tokenizer.eos_token_id

    def end_at_once(module, inputs, logits):
        logits = logits.clone()
        logits[..., eos] = logits.max() + 100.0
        return logits

    handle = tiny.model.get_output_embeddings().register_forward_hook(end_at_once)
    try:
        answers = RagGenerator(tiny.model, tiny.tokenizer).generate(
            [QUESTION, "how?"], [[], [Passage("a", "x")]]
        )
    finally:
        handle.remove()
    assert [(a.answer, a.raw, a.finished) for a in answers] == [("", "", True), ("", "", True)]


# ----------------------------------------------------------------------------------------- a real model


@pytest.mark.slow
def test_packaged_gemma_answers_hotpotqa_questions_from_their_passages():
    path = SHARED_DATA / "hotpotqa-dev-500" / "questions.jsonl"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    with path.open() as f:
        rows = [json.loads(next(f)) for _ in range(2)]
    questions = [r["question_text"] for r in rows]
    contexts = [
        [Passage(c["id"], c["paragraph_text"], c["title"]) for c in r["contexts"] if c["is_supporting"]]
        for r in rows
    ]
    gen = load_generator(device="cpu", batch_size=2)
    answers = gen.generate(questions, contexts) + gen.generate(questions, [[], []])
    for q, a, r in zip(questions * 2, answers, rows * 2, strict=True):
        print(f"{q!r} gold={r['answers_objects'][0]['spans']} raw={a.raw!r} answer={a.answer!r}")
        assert a.answer == extract_answer(a.raw, q) and "\n" not in a.raw
        assert a.prompt_tokens > 0 and a.dropped_passages == 0 and not a.question_cut
    assert all(
        rag.prompt_tokens > closed.prompt_tokens for rag, closed in zip(answers[:2], answers[2:], strict=True)
    )
    assert gen.prompt_version == RagPrompt().version
