import json
from collections import defaultdict

from pipelines.synth import SynthConfig, generate, synth


def test_same_seed_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synth(SynthConfig(out=str(a), entities=12, seed=5))
    synth(SynthConfig(out=str(b), entities=12, seed=5))
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    synth(SynthConfig(out=str(b), entities=12, seed=6))
    assert (a / "corpus.jsonl").read_bytes() != (b / "corpus.jsonl").read_bytes()


def test_grades_follow_from_construction():
    docs, queries, qrels = generate(SynthConfig(out="unused", entities=30, seed=1))
    text = {d["_id"]: d["text"] for d in docs}
    title = {d["_id"]: d["title"] for d in docs}
    qtext = {q["_id"]: q["text"] for q in queries}
    by_q = defaultdict(dict)
    for q, d, g in qrels:
        by_q[q][d] = g
    for qid, grades in by_q.items():
        entity, _aspect_idx = qid.split("-q")
        assert max(grades.values()) == 3, "every query has an answer"
        for d, g in grades.items():
            if g >= 1:  # relevant or related passages are about the query's entity (or name it)
                assert d.startswith(entity + "-"), (qid, d, g)
            if g == 0 and d.endswith("-lookalike"):
                assert title[d] != title[f"{entity}-overview"].removeprefix("About ")
        # the answering passage names the entity the query asks about
        answer = next(d for d, g in grades.items() if g == 3 and "mixed" not in d)
        name = title[answer]
        assert name in text[answer] and name in qtext[qid]


def test_grade_mix_has_every_grade_and_enough_pairs():
    _docs, queries, qrels = generate(SynthConfig(out="unused"))
    assert len(queries) == 200 and len(qrels) > 4000
    counts = defaultdict(int)
    for *_, g in qrels:
        counts[g] += 1
    assert all(counts[g] > 100 for g in range(4))
    assert counts[0] > counts[3]  # irrelevant pairs dominate, as in TREC pools


def test_answer_is_the_fact_every_stating_passage_words(tmp_path):
    """The gold answer is the asked fact, verbatim in every grade-3 passage (and every grade-2 passage, which
    states the fact in passing); queries.jsonl carries it where `augrel data prepare beir` reads it."""
    cfg = SynthConfig(out=str(tmp_path), entities=30, seed=1)
    docs, queries, qrels = generate(cfg)
    text = {d["_id"]: d["text"] for d in docs}
    answer = {q["_id"]: q["metadata"]["answers"] for q in queries}
    assert all(len(a) == 1 and a[0].strip() for a in answer.values())
    by_grade = defaultdict(lambda: defaultdict(list))
    for q, d, g in qrels:
        by_grade[q][g].append(d)
    aspects_seen = set()
    for qid, grades in by_grade.items():
        assert grades[3], qid
        for d in grades[3] + grades[2]:
            assert answer[qid][0] in text[d], (qid, answer[qid], d, text[d])
        entity, aspect = qid.split("-q")
        aspects_seen.add((int(entity.removeprefix("e")) % 3, aspect))  # entities cycle over the three kinds
    assert len(aspects_seen) == 15  # every aspect of every kind is exercised
    # the answer names this entity's fact, not the aspect: the same-aspect distractors (grade 0) mostly state
    # another value (a shared one, e.g. two towns on one river, is a coincidence of the small vocabularies)
    zero_hits = [answer[q][0] in text[d] for q, gs in by_grade.items() for d in gs[0]]
    assert sum(zero_hits) < 0.2 * len(zero_hits)
    synth(cfg)
    written = [json.loads(line) for line in (tmp_path / "queries.jsonl").read_text().splitlines()]
    assert {q["_id"]: q["metadata"]["answers"] for q in written} == answer
