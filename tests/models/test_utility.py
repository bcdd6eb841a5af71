"""models/utility.py on the tiny random Llama: windows, prompt versions, parsing, the four annotation modes,
answer likelihood against a hand computation, and the greedy generator's batching and constraints.

The tiny model writes garbage; where a test needs specific replies, the annotator's generator is replaced by an
oracle that reads each window's passages from the prompt's ``[i] word`` turns and answers as a perfect annotator
would, so the assertions hold whatever order the seeded shuffles show the passages in."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

from models.loading import load_causal_lm
from models.utility import (
    AllowedTokens,
    Candidate,
    Generation,
    GreedyGenerator,
    Question,
    StopAfterContent,
    UtilityAnnotator,
    UtilityPrompts,
    answer_log_likelihood,
    charset_token_ids,
    complete_ranking,
    parse_indices,
    sliding_windows,
    top_count,
    window_seed,
    window_slices,
)
from tests.helpers import TINY_VOCAB

# Words of TINY_VOCAB that no prompt string uses: a passage made of one of them is identifiable in a prompt.
PASSAGE_WORDS = [
    "river",
    "town",
    "company",
    "species",
    "lives",
    "eats",
    "ceo",
    "make",
    "founded",
    "population",
]
QUERY = "who was where"
UNK = TINY_VOCAB.index("[UNK]")


@pytest.fixture(scope="module")
def tiny(tiny_causal_lm):
    return load_causal_lm(str(tiny_causal_lm), dtype="fp32", device="cpu")


def question(qid: str, words=PASSAGE_WORDS, answer: str | None = None) -> Question:
    return Question(qid, QUERY, [Candidate(f"{qid}-d{i}", w) for i, w in enumerate(words)], answer)


def entries(passage, stage: str) -> list[dict]:
    return [e for e in passage.windows if e["stage"] == stage]


def shown_by_window(result, stage: str) -> dict[int, list[int]]:
    """Candidate indices per window of ``stage``, in the order they were shown, from the recorded entries."""
    by: dict[int, dict[int, int]] = {}
    for i, p in enumerate(result.passages):
        for e in entries(p, stage):
            assert e["position"] not in by.setdefault(e["window"], {})
            by[e["window"]][e["position"]] = i
    return {w: [pos[k] for k in sorted(pos)] for w, pos in by.items()}


class Spy:
    """Wraps the real generator: records prompts and what it returned."""

    def __init__(self, generate):
        self.real, self.calls = generate, []

    def __call__(self, prompts, max_new_tokens, allowed=None):
        gens = self.real(prompts, max_new_tokens, allowed)
        self.calls.append((list(prompts), max_new_tokens, allowed, gens))
        return gens


class Oracle:
    """A perfect annotator in place of ``GreedyGenerator.generate``. The call's kind comes from its token bound
    (distinct per kind in ``ORACLE_PROMPTS``); the first selection call is RelSel, later ones UtilSel."""

    def __init__(self, tokenizer, relevant=(), useful=(), utility=(), answer="the river"):
        self.tok = tokenizer
        self.relevant, self.useful, self.answer = set(relevant), set(useful), answer
        self.utility = {w: s for s, w in enumerate(reversed(utility))}  # first word = most useful
        self.word_of = {tokenizer.convert_tokens_to_ids(w): w for w in PASSAGE_WORDS}
        self.index_ids = {tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}  # [UNK] included
        self.seen: dict[str, list[list[str]]] = {"relsel": [], "utilsel": [], "utilrank": []}
        self.prompts: dict[str, list[list[int]]] = {"relsel": [], "utilsel": [], "utilrank": [], "answer": []}

    def passages(self, ids) -> dict[int, str]:
        """Position -> word of each ``[i] word`` turn, numbered in order of appearance: ``[``, ``]`` and the
        digits above 3 are all [UNK] to the tiny tokenizer."""
        words = [
            self.word_of[ids[j + 3]]
            for j in range(len(ids) - 3)
            if ids[j] == ids[j + 2] == UNK and ids[j + 1] in self.index_ids and ids[j + 3] in self.word_of
        ]
        return dict(enumerate(words, 1))

    def __call__(self, prompts, max_new_tokens, allowed=None):
        p = ORACLE_PROMPTS
        if max_new_tokens == p.max_answer_tokens:
            self.prompts["answer"] += prompts
            return [Generation(self.answer, True, len(x)) for x in prompts]
        if max_new_tokens == p.max_ranking_tokens:
            stage = "utilrank"
        else:
            stage = "utilsel" if self.prompts["relsel"] else "relsel"
        out = []
        for ids in prompts:
            shown = self.passages(ids)
            self.prompts[stage].append(ids)
            self.seen[stage].append([shown[k] for k in sorted(shown)])
            if stage == "utilrank":
                ranking = sorted(shown, key=lambda k: -self.utility.get(shown[k], -1))
                text = "] > [".join(map(str, ranking))  # after the cue "["
            else:
                want = self.relevant if stage == "relsel" else self.useful
                text = "],[".join(str(k) for k in sorted(shown) if shown[k] in want) + "]]."
            out.append(Generation(text, True, len(ids)))
        return out


ORACLE_PROMPTS = UtilityPrompts(
    window=4, max_selection_tokens=11, max_ranking_tokens=13, max_answer_tokens=17
)


def oracle_annotator(tiny, monkeypatch, prompts=ORACLE_PROMPTS, **oracle):
    ann = UtilityAnnotator(tiny.model, tiny.tokenizer, prompts, batch_size=4)
    fake = Oracle(tiny.tokenizer, **oracle)
    monkeypatch.setattr(ann.generator, "generate", fake)
    return ann, fake


def hand_logp(model, prompt: list[int], answer: list[int]) -> float:
    """log P(answer | prompt) from the model's plain forward over the unpadded sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return float(sum(lp[len(prompt) - 1 + t, a] for t, a in enumerate(answer)))


# ------------------------------------------------------------------------------------------- windows


def test_window_slices_split_evenly_and_cover_everything():
    assert window_slices(0, 16) == []
    assert window_slices(5, 16) == [range(0, 5)]
    assert window_slices(16, 16) == [range(0, 16)]
    # 17 in windows of 16: two windows of 8 and 9, not 16 + 1
    assert sorted(len(s) for s in window_slices(17, 16)) == [8, 9]
    assert [len(s) for s in window_slices(10, 4)] == [3, 4, 3]
    for n in range(1, 60):
        for size in (1, 2, 3, 4, 7, 16):
            sl = window_slices(n, size)
            assert [i for s in sl for i in s] == list(range(n)), (n, size)
            assert len(sl) == -(-n // size) and max(map(len, sl)) <= size
            assert max(map(len, sl)) - min(map(len, sl)) <= 1, (n, size)


def test_sliding_windows_run_back_to_front_and_cover_everything():
    assert sliding_windows(0, 4, 2) == []
    assert sliding_windows(3, 4, 2) == [range(0, 3)]
    assert sliding_windows(4, 4, 2) == [range(0, 4)]
    assert sliding_windows(10, 4, 2) == [range(6, 10), range(4, 8), range(2, 6), range(0, 4)]
    for n in range(5, 40):
        ws = sliding_windows(n, 4, 2)
        assert ws[0].stop == n and ws[-1].start == 0
        assert all(len(w) <= 4 for w in ws)
        assert set().union(*map(set, ws)) == set(range(n))
        # consecutive windows overlap, so the best passage can travel all the way to the front
        assert all(b.start < a.start < b.stop for a, b in itertools.pairwise(ws))


def test_window_seed_is_stable_and_differs_per_stage_window_qid_and_base_seed():
    assert window_seed(0, "q1", "relsel", 0) == 5465073831850238786
    assert window_seed(0, "q1", "relsel", 0) == window_seed(0, "q1", "relsel", 0)
    seeds = {
        window_seed(s, q, st, w)
        for s in (0, 7)
        for q in ("q1", "q2")
        for st in ("relsel", "utilsel", "utilrank")
        for w in (0, 1, 2)
    }
    assert len(seeds) == 2 * 2 * 3 * 3
    assert all(0 <= s < 2**63 for s in seeds)  # fits numpy's default_rng and an int64 column


def test_window_shuffle_is_recorded_and_rebuilds_from_its_seed(tiny):
    ann = UtilityAnnotator(tiny.model, tiny.tokenizer, UtilityPrompts(window=4), seed=11)
    (res,) = ann.annotate([question("q1")], "relsel")
    shown = shown_by_window(res, "relsel")
    assert sorted(shown) == [0, 1, 2]
    for w, sl in enumerate(window_slices(10, 4)):
        seeds = {e["seed"] for i in shown[w] for e in entries(res.passages[i], "relsel")}
        assert seeds == {window_seed(11, "q1", "relsel", w)}
        rebuilt = list(sl)
        np.random.default_rng(seeds.pop()).shuffle(rebuilt)
        assert shown[w] == rebuilt
    assert any(shown[w] != list(sl) for w, sl in enumerate(window_slices(10, 4))), "nothing was shuffled"


# ----------------------------------------------------------------------------------- prompt versions


def test_prompt_version_is_name_at_hash_and_changes_with_every_string_and_limit():
    base = UtilityPrompts()
    assert re.fullmatch(r"utility-v1@[0-9a-f]{10}", base.version)
    assert UtilityPrompts().version == base.version
    changed = [
        UtilityPrompts(window=8),
        UtilityPrompts(passage_tokens=300),
        UtilityPrompts(top_fraction=0.2),
        UtilityPrompts(max_ranking_tokens=64),
        UtilityPrompts(constrain_listwise=False),
        UtilityPrompts(listwise_charset="0123456789[],"),
        UtilityPrompts(stop=()),
        UtilityPrompts(relsel_instruction=base.relsel_instruction + " "),
        UtilityPrompts(utilsel_intro=base.utilsel_intro.replace("utility", "use")),
        UtilityPrompts(closed_book_request="Q: {query}\nA:"),
        UtilityPrompts(selection_cue="["),
        UtilityPrompts(name="utility-v2"),
    ]
    versions = [p.version for p in changed]
    assert base.version not in versions and len(set(versions)) == len(versions)
    assert changed[-1].version.startswith("utility-v2@")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"window": 0}, "window"),
        ({"top_fraction": 0}, "top_fraction"),
        ({"top_fraction": 1.5}, "top_fraction"),
        ({"passage_tokens": 0}, "passage_tokens"),
        ({"max_answer_tokens": 0}, "max_answer_tokens"),
    ],
)
def test_bad_prompt_limits_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        UtilityPrompts(**kwargs)


def test_bad_annotator_arguments_raise_naming_the_field(tiny):
    with pytest.raises(ValueError, match=r"^answer_source"):
        UtilityAnnotator(tiny.model, tiny.tokenizer, answer_source="silver")
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"^likelihood_top_fraction"):
            UtilityAnnotator(tiny.model, tiny.tokenizer, likelihood_top_fraction=bad)
    with pytest.raises(ValueError, match=r"^mode"):
        UtilityAnnotator(tiny.model, tiny.tokenizer).annotate([question("q1")], "relevance")


# ------------------------------------------------------------------------------------------- parsing


def test_parse_bracketed_indices_in_order_of_first_mention():
    p = parse_indices("My selection:[[3],[1],[4]].", 4)
    assert p.indices == (2, 0, 3) and not p.no_bracket and p.out_of_range == 0 and p.duplicates == 0
    assert parse_indices("[ 3 ], [  1]", 4).indices == (2, 0)


def test_parse_drops_and_counts_out_of_range_and_duplicates():
    p = parse_indices("[[0],[2],[5],[2],[1],[12],[1]]", 4)
    assert p.indices == (1, 0) and p.out_of_range == 3 and p.duplicates == 2 and not p.no_bracket
    only_bad = parse_indices("[9]", 4)
    assert only_bad.indices == () and only_bad.out_of_range == 1 and not only_bad.no_bracket


def test_parse_empty_selection_is_valid_and_no_bracket_is_garbage():
    for empty in ("My selection:[].", "[ ]", "[]"):
        p = parse_indices(empty, 4)
        assert p.indices == () and not p.no_bracket
    for garbage in ("", "the river town", "1, 2, 3", "My selection:[1, 2", "(1) (2)"):
        p = parse_indices(garbage, 4)
        assert p.indices == () and p.no_bracket, garbage


def test_parse_strips_reasoning_including_an_unclosed_think():
    p = parse_indices("<think>maybe [1] or [2]</think>[3]", 4)
    assert p.indices == (2,) and p.duplicates == 0
    assert parse_indices("<think>[1] and\n[2]</think>", 4).no_bracket
    assert parse_indices("<think>\n[1] [2] then the list", 4).no_bracket  # cut while thinking
    assert parse_indices("[4]<think>[1]</think> [2]", 4).indices == (3, 1)
    assert not parse_indices("<think>[1]</think>[]", 4).no_bracket


def test_rankings_dedupe_and_complete_in_shown_order():
    p = parse_indices("[2] > [1] > [2] > [7]", 4)
    assert p.indices == (1, 0) and p.duplicates == 1 and p.out_of_range == 1
    assert complete_ranking(p.indices, 4) == [1, 0, 2, 3]
    assert complete_ranking([], 3) == [0, 1, 2]
    assert complete_ranking([2, 2, 0], 3) == [2, 0, 1]
    assert complete_ranking([], 0) == []


def test_top_count_is_the_top_fraction_at_least_one():
    assert top_count(10, 0.1) == 1
    assert top_count(0, 0.1) == 0
    assert top_count(31, 0.1) == 3
    assert top_count(5, 0.1) == 1
    assert top_count(30, 0.1) == 3  # 0.1 * 30 is 3.0000000000000004 in floats
    assert top_count(100, 0.29) == 29  # 0.29 * 100 is 28.999999999999996
    assert top_count(7, 1.0) == 7


# ------------------------------------------------------------------------------ annotator, tiny model


@pytest.mark.parametrize("mode", ["relsel", "utility-sel", "utility-rank", "answer-likelihood"])
def test_every_mode_runs_on_the_tiny_model_one_result_per_candidate(tiny, mode):
    ann = UtilityAnnotator(tiny.model, tiny.tokenizer, UtilityPrompts(window=4), batch_size=4)
    spy = Spy(ann.generator.generate)
    ann.generator.generate = spy
    qs = [
        question("q1"),
        Question("q-empty", QUERY, []),
        question("q2", PASSAGE_WORDS[:3], answer="the town"),
    ]
    out = ann.annotate(qs, mode)
    assert [r.qid for r in out] == ["q1", "q-empty", "q2"]
    assert [len(r.passages) for r in out] == [10, 0, 3]
    assert out[1].pseudo_answer is None
    if mode == "answer-likelihood":
        # q2 is scored with its gold answer; q1 has none and needs RelSel (which the tiny model fails)
        assert all(p.utility is not None and p.rank is not None for p in out[2].passages)
        assert all(p.relevant is None and not entries(p, "relsel") for p in out[2].passages)
        assert all(p.utility is None and p.notes for p in out[0].passages)
        assert ann.stats.as_dict()["answer-likelihood"]["pairs"] == 3
        assert ann.stats.as_dict()["relsel"]["windows"] == 3  # q1's three windows only
    else:
        # the tiny vocabulary has no "]": every window is garbage, counted, nothing selected
        relsel = ann.stats.as_dict()["relsel"]
        assert relsel["windows"] == relsel["no_bracket"] == 4  # q1: 3 windows, q2: 1
        assert all("no bracketed index" in p.notes[0] for r in out for p in r.passages)
        assert not any(p.selected for r in out for p in r.passages)
    if mode in ("relsel", "utility-sel", "utility-rank"):
        assert all(len(entries(p, "relsel")) == 1 for r in out for p in r.passages)
    assert all(set(g.text) <= set(ann.prompts.listwise_charset) for *_, gens in spy.calls for g in gens)


@pytest.mark.parametrize("mode", ["relsel", "utility-sel", "utility-rank", "answer-likelihood"])
def test_no_candidates_means_no_generation_and_an_empty_result(tiny, mode, monkeypatch):
    ann = UtilityAnnotator(tiny.model, tiny.tokenizer)

    def never(*a, **k):
        raise AssertionError("generated for a question without candidates")

    monkeypatch.setattr(ann.generator, "generate", never)
    out = ann.annotate([Question("q0", QUERY, [], answer="the river")], mode)
    assert len(out) == 1 and out[0].qid == "q0" and out[0].passages == []
    assert ann.annotate([], mode) == []


def test_more_candidates_than_a_window_each_passage_shown_once_per_stage(tiny, monkeypatch):
    words = PASSAGE_WORDS
    relevant = words[:7]
    ann, fake = oracle_annotator(tiny, monkeypatch, relevant=relevant, useful=["town", "eats"])
    (res,) = ann.annotate([question("q1", words)], "utility-sel")
    assert all(len(entries(p, "relsel")) == 1 for p in res.passages)
    assert sorted(shown_by_window(res, "relsel")) == [0, 1, 2]
    kept = [i for i, w in enumerate(words) if w in relevant]
    assert [i for i, p in enumerate(res.passages) if entries(p, "utilsel")] == kept
    assert all(len(entries(res.passages[i], "utilsel")) == 1 for i in kept)
    stats = ann.stats.as_dict()
    assert stats["relsel"]["windows"] == 3 and stats["utilsel"]["windows"] == 2  # 7 kept: 4 + 3
    assert stats["answer"]["answers"] == 1
    assert sorted(w for seen in fake.seen["relsel"] for w in seen) == sorted(words)


def test_selections_map_shown_positions_back_to_candidates(tiny, monkeypatch):
    relevant, useful = (
        ["river", "company", "lives", "ceo", "founded", "population"],
        ["company", "ceo", "town"],
    )
    relsel = oracle_annotator(tiny, monkeypatch, relevant=relevant)[0].annotate([question("q1")], "relsel")[0]
    ann, fake = oracle_annotator(tiny, monkeypatch, relevant=relevant, useful=useful)
    (usel,) = ann.annotate([question("q1")], "utility-sel")
    for r in (relsel, usel):
        assert [p.relevant for p in r.passages] == [w in relevant for w in PASSAGE_WORDS]
    assert [p.selected for p in relsel.passages] == [w in relevant for w in PASSAGE_WORDS]
    # "town" is useful but RelSel dropped it: UtilSel only ever sees what RelSel kept
    assert [p.selected for p in usel.passages] == [w in ("company", "ceo") for w in PASSAGE_WORDS]
    assert {w for seen in fake.seen["utilsel"] for w in seen} == set(relevant)
    assert usel.pseudo_answer == "the river" and relsel.pseudo_answer is None
    # the reference answer is in UtilSel's prompts and not in RelSel's
    answer = ann._tok("the river")

    def holds(ids):
        return any(ids[j : j + len(answer)] == answer for j in range(len(ids)))

    assert all(holds(p) for p in fake.prompts["utilsel"]) and not any(
        holds(p) for p in fake.prompts["relsel"]
    )
    # the pseudo-answer writer saw the kept passages, none of the others
    (answer_prompt,) = fake.prompts["answer"]
    assert set(fake.passages(answer_prompt).values()) == set(relevant)


def _scripted(monkeypatch, ann, texts, finished=None):
    def generate(prompts, max_new_tokens, allowed=None):
        assert len(prompts) == len(texts)
        return [Generation(t, (finished or [True] * len(texts))[k], len(p)) for k, (t, p) in
                enumerate(zip(texts, prompts, strict=True))]  # fmt: skip

    monkeypatch.setattr(ann.generator, "generate", generate)


def test_garbage_empty_and_truncated_selections_are_counted_never_raised(tiny, monkeypatch):
    ann = UtilityAnnotator(tiny.model, tiny.tokenizer, UtilityPrompts(window=4))
    # windows in order: q1 (10 candidates: 3, 4, 3 passages), then q2 (3 passages)
    _scripted(monkeypatch, ann, ["1],[3]].", "garbage", "].", "1],[2"], finished=[True, True, True, False])
    q1, q2 = ann.annotate([question("q1"), question("q2", PASSAGE_WORDS[:3])], "relsel")
    w1 = shown_by_window(q1, "relsel")
    assert [i for i, p in enumerate(q1.passages) if p.selected] == sorted([w1[0][0], w1[0][2]])
    for i in w1[1]:  # garbage: unselected, the reason and the output recorded
        (e,) = entries(q1.passages[i], "relsel")
        assert e["no_bracket"] is True and e["output"] == "garbage"
        assert q1.passages[i].notes == ["relsel: no bracketed index in the output; left unselected"]
    for i in w1[0] + w1[2]:
        assert q1.passages[i].notes == [] and "no_bracket" not in entries(q1.passages[i], "relsel")[0]
    # a cut reply keeps what it holds: "[1],[2" is passage 1 only
    (w2,) = shown_by_window(q2, "relsel").values()
    assert [i for i, p in enumerate(q2.passages) if p.selected] == [w2[0]]
    assert all(entries(p, "relsel")[0]["truncated"] is True for p in q2.passages)
    assert ann.stats.as_dict()["relsel"] == {
        "windows": 4,
        "no_bracket": 1,
        "empty_selection": 1,
        "truncated": 1,
    }


def test_unconstrained_tiny_model_garbage_is_no_bracket_with_a_note(tiny):
    ann = UtilityAnnotator(tiny.model, tiny.tokenizer, UtilityPrompts(window=4, constrain_listwise=False))
    spy = Spy(ann.generator.generate)
    ann.generator.generate = spy
    (res,) = ann.annotate([question("q1")], "relsel")
    (call,) = spy.calls
    assert call[2] is None  # no constraint
    texts = [g.text for g in call[3]]
    assert ann.stats.as_dict()["relsel"]["no_bracket"] == ann.stats.as_dict()["relsel"]["windows"] == 3
    assert not any(p.selected or p.relevant for p in res.passages)
    for w, shown in shown_by_window(res, "relsel").items():
        for i in shown:
            assert entries(res.passages[i], "relsel")[0]["output"] == texts[w][:300]
            assert "no bracketed index" in res.passages[i].notes[0]
    assert any(set(t) - set(ann.prompts.listwise_charset) for t in texts), "the tiny model wrote no words"


def test_constrained_tiny_model_writes_only_charset_characters(tiny):
    ann = UtilityAnnotator(tiny.model, tiny.tokenizer, UtilityPrompts(window=4, max_selection_tokens=24))
    spy = Spy(ann.generator.generate)
    ann.generator.generate = spy
    ann.annotate([question("q1"), question("q2", PASSAGE_WORDS[2:7])], "relsel")
    (call,) = spy.calls
    assert set(call[2]) == set(charset_token_ids(tiny.tokenizer, "0123456789[],>. \n"))
    texts = [g.text for g in call[3]]
    assert len(texts) == 5 and any(texts)
    assert all(set(t) <= set(ann.prompts.listwise_charset) for t in texts), texts


def test_empty_passage_and_passage_cut_to_the_token_budget(tiny, monkeypatch):
    long = "river town company species lives eats ceo"  # 7 tokens
    ann, fake = oracle_annotator(tiny, monkeypatch, prompts=UtilityPrompts(
        window=4, passage_tokens=5, max_selection_tokens=11, max_ranking_tokens=13, max_answer_tokens=17),
        relevant=["river", "make"])  # fmt: skip
    assert ann.cut(long) == ("river town company species lives", True)
    assert ann.cut("make founded") == ("make founded", False) and ann.cut("") == ("", False)
    q = Question("q1", QUERY, [Candidate("a", long), Candidate("b", ""), Candidate("c", "make founded")])
    (res,) = ann.annotate([q], "relsel")
    assert [p.truncated for p in res.passages] == [True, False, False]
    assert [p.selected for p in res.passages] == [True, False, True]
    assert all(len(entries(p, "relsel")) == 1 for p in res.passages)  # the empty passage was shown too
    (prompt,) = fake.prompts["relsel"]
    ids = ann._tok(long)

    def holds(part):
        return any(prompt[j : j + len(part)] == part for j in range(len(prompt)))

    assert holds(ids[:5]) and not holds(ids[:6])


def test_utility_rank_sliding_windows_bubble_the_best_to_the_top(tiny, monkeypatch):
    # the best passage sits in the middle, the second best at the very back, before any shuffle
    utility = ["eats", "population", "town", "river"]
    prompts = UtilityPrompts(window=4, max_selection_tokens=11, max_ranking_tokens=13, max_answer_tokens=17,
                             top_fraction=0.2)  # fmt: skip
    ann, fake = oracle_annotator(tiny, monkeypatch, prompts=prompts, relevant=PASSAGE_WORDS, utility=utility)
    (res,) = ann.annotate([question("q1")], "utility-rank")
    rank = {PASSAGE_WORDS[i]: p.rank for i, p in enumerate(res.passages)}
    assert sorted(rank.values()) == list(range(1, 11))
    assert rank["eats"] == 1 and rank["population"] == 2
    assert {w for w, p in zip(PASSAGE_WORDS, res.passages, strict=True) if p.selected} == {
        "eats",
        "population",
    }
    stats = ann.stats.as_dict()
    assert stats["utilrank"]["windows"] == len(sliding_windows(10, 4, 2)) == 4
    assert [len(seen) for seen in fake.seen["utilrank"]] == [4, 4, 4, 4]
    for w in range(4):
        seeds = {e["seed"] for p in res.passages for e in entries(p, "utilrank") if e["window"] == w}
        assert seeds == {window_seed(0, "q1", "utilrank", w)}
    assert sorted(shown_by_window(res, "utilrank")) == [0, 1, 2, 3]


def test_utility_rank_ranks_only_kept_passages_and_garbage_keeps_the_order(tiny, monkeypatch):
    relevant = ["river", "species", "ceo"]
    ann, _ = oracle_annotator(tiny, monkeypatch, relevant=relevant, utility=["ceo", "river", "species"])
    (res,) = ann.annotate([question("q1")], "utility-rank")
    ranks = [p.rank for p in res.passages]
    assert ranks == [{"ceo": 1, "river": 2, "species": 3}.get(w) for w in PASSAGE_WORDS]
    assert [p.selected for p in res.passages] == [w == "ceo" for w in PASSAGE_WORDS]  # 10% of 3: at least one

    ann2 = UtilityAnnotator(tiny.model, tiny.tokenizer, UtilityPrompts(window=4))
    replies = iter([["2],[3]]."], ["the answer"], ["garbage"]])
    ann2.generator.generate = lambda prompts, n, allowed=None: [
        Generation(t, True, len(p)) for t, p in zip(next(replies), prompts, strict=True)
    ]
    (res2,) = ann2.annotate([question("q2", ["river", "town", "company"])], "utility-rank")
    shown = shown_by_window(res2, "relsel")[0]
    kept = sorted(shown[1:3])
    # an unreadable ranking leaves the kept passages in candidate order
    assert [res2.passages[i].rank for i in kept] == [1, 2]
    assert [i for i, p in enumerate(res2.passages) if p.selected] == [kept[0]]
    assert ann2.stats.as_dict()["utilrank"] == {"windows": 1, "no_bracket": 1}
    assert all("utilrank: no bracketed index" in res2.passages[i].notes[-1] for i in kept)


# ------------------------------------------------------------------------------------ answer likelihood


def test_answer_log_likelihood_equals_the_hand_computation_with_left_padding(tiny):
    rng = np.random.default_rng(0)
    lengths = [(3, 1), (12, 4), (7, 2), (20, 3), (5, 6)]
    prompts = [rng.integers(4, len(TINY_VOCAB), p).tolist() for p, _ in lengths]
    answers = [rng.integers(4, len(TINY_VOCAB), a).tolist() for _, a in lengths]
    hand = [hand_logp(tiny.model, p, a) for p, a in zip(prompts, answers, strict=True)]
    pad = tiny.tokenizer.pad_token_id
    one = answer_log_likelihood(tiny.model, prompts, answers, pad, batch_size=1)
    three = answer_log_likelihood(tiny.model, prompts, answers, pad, batch_size=3)
    np.testing.assert_allclose(one, hand, atol=1e-4)
    np.testing.assert_allclose(three, hand, atol=1e-4)
    capped = answer_log_likelihood(tiny.model, prompts, answers, pad, batch_size=3, max_batch_tokens=30)
    np.testing.assert_allclose(capped, hand, atol=1e-4)
    assert all(v < 0 for v in hand)


def test_annotated_utility_is_logp_with_passage_minus_closed_book(tiny):
    ann = UtilityAnnotator(tiny.model, tiny.tokenizer, batch_size=3, likelihood_top_fraction=0.5,
                           min_utility=float("-inf"))  # fmt: skip
    texts = ["the river is in the town", "", "company ceo", "species eats", "the population of the town"]
    q = Question("q1", "where is the river", [Candidate(str(i), t) for i, t in enumerate(texts)], "the town")
    (res,) = ann.annotate([q], "answer-likelihood")
    a = tiny.tokenizer(" the town", add_special_tokens=False)["input_ids"]
    base = hand_logp(tiny.model, ann.renderer.ids(ann.closed_book_messages(q.query)), a)
    hand = [
        hand_logp(tiny.model, ann.renderer.ids(ann.answer_messages(q.query, [t])), a) - base for t in texts
    ]
    np.testing.assert_allclose([p.utility for p in res.passages], hand, atol=1e-4)
    order = sorted(range(5), key=lambda i: -hand[i])
    assert [res.passages[i].rank for i in order] == [1, 2, 3, 4, 5]
    assert [p.selected for p in res.passages] == [order.index(i) < 2 for i in range(5)]  # half of 5: 2
    assert res.pseudo_answer is None and all(p.relevant is None for p in res.passages)


def test_answer_likelihood_selects_only_above_min_utility(tiny):
    texts = ["the river", "company ceo", "town"]
    q = Question("q1", "where", [Candidate(str(i), t) for i, t in enumerate(texts)], "the town")
    ann = UtilityAnnotator(tiny.model, tiny.tokenizer, likelihood_top_fraction=1.0, min_utility=float("inf"))
    (res,) = ann.annotate([q], "answer-likelihood")
    assert not any(p.selected for p in res.passages) and all(p.utility is not None for p in res.passages)


def test_answer_likelihood_with_the_pseudo_answer(tiny, monkeypatch):
    ann, _ = oracle_annotator(tiny, monkeypatch, relevant=["river", "town"], answer="the company")
    ann.answer_source = "pseudo"
    q = question("q1", ["river", "town", "eats"], answer="the ceo")  # the gold answer is ignored
    (res,) = ann.annotate([q], "answer-likelihood")
    assert res.pseudo_answer == "the company"
    a = ann._tok(" the company")
    base = hand_logp(tiny.model, ann.renderer.ids(ann.closed_book_messages(QUERY)), a)
    hand = [hand_logp(tiny.model, ann.renderer.ids(ann.answer_messages(QUERY, [w])), a) - base
            for w in ["river", "town", "eats"]]  # fmt: skip
    np.testing.assert_allclose([p.utility for p in res.passages], hand, atol=1e-4)
    assert [p.relevant for p in res.passages] == [True, True, False]


def test_gold_answer_source_with_a_missing_answer_names_the_question(tiny):
    ann = UtilityAnnotator(tiny.model, tiny.tokenizer, answer_source="gold")
    with pytest.raises(ValueError, match="'q-none'"):
        ann.annotate([question("q1", answer="the river"), question("q-none")], "answer-likelihood")


def test_an_empty_pseudo_answer_is_counted_and_utilsel_still_runs(tiny, monkeypatch):
    ann, fake = oracle_annotator(tiny, monkeypatch, relevant=["river", "town"], useful=["town"], answer="")
    (res,) = ann.annotate([question("q1", ["river", "town", "eats"])], "utility-sel")
    assert res.pseudo_answer == ""
    assert ann.stats.as_dict()["answer"] == {"answers": 1, "empty": 1}
    assert all("answer: the pseudo answer is empty" in p.notes for p in res.passages)
    assert [p.selected for p in res.passages] == [False, True, False]
    assert len(fake.prompts["utilsel"]) == 1

    ann, _ = oracle_annotator(tiny, monkeypatch, relevant=["river"], answer="")
    (res,) = ann.annotate([question("q2", ["river", "town"])], "answer-likelihood")
    assert all(p.utility is None and not p.selected for p in res.passages)
    assert all(any("no answer to score" in n for n in p.notes) for p in res.passages)


# ------------------------------------------------------------------------------------------ generation


def test_left_padded_batches_generate_what_single_prompts_do(tiny):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(4, len(TINY_VOCAB), n).tolist() for n in (4, 19, 9, 31, 13)]
    batched = GreedyGenerator(tiny.model, tiny.tokenizer, batch_size=3).generate(prompts, 10)
    single = GreedyGenerator(tiny.model, tiny.tokenizer, batch_size=1)
    alone = [single.generate([p], 10)[0] for p in prompts]
    assert batched == alone
    assert sum(bool(g.text) for g in batched) >= 3
    assert [g.prompt_tokens for g in batched] == [4, 19, 9, 31, 13]


def test_allowed_tokens_masks_everything_else(tiny):
    scores = torch.randn(2, 10)
    out = AllowedTokens([3, 7, 7], 10)(torch.zeros(2, 1, dtype=torch.long), scores)
    assert torch.equal(out[:, [3, 7]], scores[:, [3, 7]])
    assert torch.isinf(out[:, [0, 1, 2, 4, 5, 6, 8, 9]]).all()
    wide = AllowedTokens([3], 10)(torch.zeros(1, 1, dtype=torch.long), torch.randn(1, 13))
    assert torch.isfinite(wide).nonzero()[:, 1].tolist() == [3]  # a head wider than the vocabulary
    allowed = [tiny.tokenizer.convert_tokens_to_ids(t) for t in ("1", ",")]
    gen = GreedyGenerator(tiny.model, tiny.tokenizer)
    (g,) = gen.generate([[20, 34, 21]], 8, allowed)
    assert g.text and set(g.text) <= set("1, ")


def test_stop_after_content_ignores_a_leading_newline(tiny):
    tok = tiny.tokenizer
    nl, one, river = (tok.convert_tokens_to_ids(t) for t in ("\n", "1", "river"))
    stop = StopAfterContent(tok, ["\n"], prompt_width=2)
    rows = torch.tensor([[20, 21, nl, nl], [20, 21, nl, one], [20, 21, one, nl], [20, 21, one, river]])
    assert stop(rows, torch.zeros(4, 5)).tolist() == [False, False, True, False]


def test_generation_stops_at_the_stop_string_and_counts_as_finished(tiny):
    nl = tiny.tokenizer.convert_tokens_to_ids("\n")
    digits = [tiny.tokenizer.convert_tokens_to_ids(str(d)) for d in range(4)]
    gen = GreedyGenerator(tiny.model, tiny.tokenizer, stop=("\n",))
    # only digits and the line break: whatever the random model picks, a line break after a digit ends it
    outs = gen.generate([[20, 34, 21], [13, 14, 15, 16, 20]], 30, [*digits, nl])
    for g in outs:
        assert "\n" not in g.text and set(g.text) <= set("0123 ")
        assert g.finished or len(g.text.split()) == 30
