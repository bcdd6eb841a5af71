"""``augrel data synth``: a synthetic graded-relevance collection whose labels follow from how it was made.

The world is a set of fictional entities (towns, companies, species), each with facts on a few aspects
(when a town was founded, who runs a company, what a species eats). A query asks for one fact of one entity.
Every passage is generated from known facts, so its grade for every query is known by construction:

====  ===========================================================================================
3     a passage about the query's entity that is *about* the asked aspect and states the fact,
      or a near-duplicate of one (reordered, boilerplate added)
2     a passage of the entity that states the fact among other facts (an overview, or a passage
      focused on another aspect that mentions it in passing)
1     a passage about the same entity on another aspect (or an overview without the fact), or a
      passage about another entity that names the query's entity only in comparison
0     the same aspect of another entity of the same kind (a lexical distractor, sometimes with a
      look-alike name), or a passage about something else entirely
====  ===========================================================================================

Written in the BEIR layout (``corpus.jsonl``, ``queries.jsonl``, ``qrels/test.tsv`` with every candidate
pair and its grade, including zeros), so ``augrel data prepare beir`` reads it like any public dataset. Each
query carries its gold answer as those passages word it (``"metadata": {"answers": ["1987"]}``), for
answer-likelihood utility and RAG evaluation.
The same seed and sizes give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field

from pipelines.stage import StageConfig, StageResult, Timer, write_stage_files


class SynthConfig(StageConfig):
    """``augrel data synth``: how big a world to generate, and the seed that fixes it."""

    out: str = Field(description="output directory (BEIR layout)")
    entities: int = Field(100, ge=4, description="fictional entities (split over towns, companies, species)")
    queries_per_entity: int = Field(2, ge=1, le=5, description="aspects asked about per entity")
    distractors: int = Field(
        6, ge=0, description="same-aspect passages of other entities per query (grade 0)"
    )
    random_negatives: int = Field(4, ge=0, description="passages of other kinds per query (grade 0)")
    unjudged: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of queries written without qrels: queries nobody labelled, as in a real query log",
    )
    seed: int = 7


_SYL_A = [
    "mar",
    "vel",
    "tor",
    "brin",
    "cal",
    "dun",
    "fen",
    "gar",
    "hal",
    "kel",
    "lor",
    "mel",
    "nor",
    "ost",
    "pel",
    "quin",
    "ros",
    "sal",
    "tam",
    "ul",
    "var",
    "wen",
    "yar",
    "zel",
    "ash",
    "bel",
    "cor",
    "dra",
]
_SYL_B = ["a", "e", "i", "o", "ai", "ou", "ea", "ie"]
_SYL_C = ["dene", "wick", "ford", "mere", "holt", "stead", "ton", "ridge", "vale", "brook", "moor", "burgh"]
_FIRST = [
    "Ada",
    "Bruno",
    "Celia",
    "Darius",
    "Elena",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Luca",
    "Mira",
    "Nils",
    "Olga",
    "Pavel",
    "Rosa",
    "Soren",
    "Tara",
    "Viktor",
    "Wanda",
    "Yusuf",
]
_LAST = [
    "Albright",
    "Brandt",
    "Castell",
    "Drummond",
    "Eckhart",
    "Falk",
    "Grieve",
    "Halloran",
    "Ivers",
    "Jarrow",
    "Kessler",
    "Lindqvist",
    "Marsh",
    "Novak",
    "Orsini",
    "Prentice",
    "Quill",
    "Rourke",
]
_RIVERS = ["Ashwater", "Blackreed", "Coldspring", "Dimmock", "Elderflow", "Greyling", "Hollins", "Silvermere"]
_INDUSTRY = [
    "shipbuilding",
    "wool weaving",
    "copper mining",
    "glassmaking",
    "salmon fishing",
    "paper milling",
    "clockmaking",
    "tea blending",
    "stone quarrying",
    "cider pressing",
]
_FESTIVAL = [
    "Lantern Festival",
    "Harvest Fair",
    "Kite Week",
    "River Regatta",
    "Winter Market",
    "Bell Ringing Day",
    "Cheese Rolling",
    "Midsummer Parade",
]
_MONTHS = ["March", "April", "May", "June", "July", "August", "September", "October"]
_PRODUCTS = [
    "industrial pumps",
    "bicycle frames",
    "hearing aids",
    "solar inverters",
    "garden tools",
    "accounting software",
    "ceramic tiles",
    "electric ferries",
    "water filters",
    "drone cameras",
]
_HABITAT = [
    "cold mountain streams",
    "salt marshes",
    "dry pine forests",
    "coral reefs",
    "high meadows",
    "mangrove swamps",
    "limestone caves",
    "river deltas",
]
_FOOD = [
    "beetles and their larvae",
    "fallen fruit",
    "small fish",
    "seeds and grasses",
    "snails",
    "nectar from night-blooming flowers",
    "algae scraped from rocks",
    "mosquito larvae",
]
_COLORS = ["olive green", "rust red", "slate grey", "pale yellow", "deep blue", "sandy brown"]
_PATTERNS = ["black spots", "white stripes along its back", "an orange throat", "speckled wings"]
_FILLER = [
    "Local historians have collected records about it for many decades.",
    "Visitors often describe it as a quiet but interesting subject to learn about.",
    "Several short documentaries have been made about it over the years.",
    "Its name appears in a number of regional guidebooks and encyclopedias.",
    "Researchers continue to publish new observations every few years.",
]
_BOILER = [
    "This article is part of our regional reference series.",
    "Last updated by the editorial team.",
    "Share this page with friends who might find it useful.",
]


@dataclass(frozen=True)
class Aspect:
    name: str
    query: str  # query template over {e}
    focused: tuple[str, ...]  # templates of a passage about this aspect (sentence per template)
    fact: str  # one-sentence statement for overviews, over {e} and the facts
    comparison: str  # a sentence about entity {o} that names {e} without giving {e}'s fact
    # the asked fact as the first focused sentence and the fact sentence word it, so every passage that states
    # the fact (grades 3 and 2) contains the answer string verbatim
    answer: str


KINDS: dict[str, list[Aspect]] = {
    "town": [
        Aspect(
            "founded",
            "when was {e} founded",
            (
                "{e} was founded in {year} by settlers who came up the valley from the coast.",
                "The founding of {e} in {year} is remembered every spring with a small ceremony in the old square.",
            ),
            "{e} was founded in {year}.",
            "Like its neighbour {e}, {o} began as a small farming settlement.",
            "{year}",
        ),
        Aspect(
            "population",
            "what is the population of {e}",
            (
                "{e} has a population of about {pop:,} people, according to the most recent census.",
                "The number of residents in {e} has grown slowly, reaching roughly {pop:,} today.",
            ),
            "About {pop:,} people live in {e}.",
            "{o} has grown faster than nearby {e} over the past decade.",
            "{pop:,}",
        ),
        Aspect(
            "river",
            "which river flows through {e}",
            (
                "The {river} River flows through {e}, dividing the old town from the newer districts.",
                "Three stone bridges cross the {river} River in the centre of {e}.",
            ),
            "The {river} River runs through {e}.",
            "Unlike {e}, {o} lies on a river that floods almost every winter.",
            "{river} River",
        ),
        Aspect(
            "industry",
            "what is the main industry in {e}",
            (
                "The economy of {e} depends mainly on {industry}, which employs most of its workers.",
                "For over a century {industry} has been the main source of jobs in {e}.",
            ),
            "{e} is known for {industry}.",
            "{o} once competed with {e} for the same trade, before turning to tourism.",
            "{industry}",
        ),
        Aspect(
            "festival",
            "what festival is {e} known for",
            (
                "{e} is known for its annual {festival}, held each {month}.",
                "Thousands of visitors come to {e} every {month} for the {festival}.",
            ),
            "{e} holds the {festival} every {month}.",
            "Visitors to the festivals of {e} often stay overnight in nearby {o}.",
            "{festival}",
        ),
    ],
    "company": [
        Aspect(
            "founded",
            "when was {e} founded",
            (
                "{e} was founded in {year} by two engineers working out of a rented garage.",
                "Since its founding in {year}, {e} has been owned by the same family.",
            ),
            "{e} was founded in {year}.",
            "{o} was started by former employees of {e}.",
            "{year}",
        ),
        Aspect(
            "ceo",
            "who is the ceo of {e}",
            (
                "{person} has served as chief executive officer of {e} since {year2}.",
                "As CEO, {person} has led {e} through two large acquisitions.",
            ),
            "{e} is run by chief executive {person}.",
            "The chief executive of {o} used to sit on the board of {e}.",
            "{person}",
        ),
        Aspect(
            "product",
            "what does {e} make",
            (
                "{e} makes {product}, which it sells in more than {n} countries.",
                "Most of the revenue of {e} comes from its line of {product}.",
            ),
            "{e} manufactures {product}.",
            "{o} is a supplier to {e} but sells under its own brand as well.",
            "{product}",
        ),
        Aspect(
            "headquarters",
            "where is {e} headquartered",
            (
                "{e} is headquartered in {city}, where it occupies a campus of {n} buildings.",
                "The head office of {e} moved to {city} in {year2}.",
            ),
            "{e} has its headquarters in {city}.",
            "{o} opened an office across the street from {e}.",
            "{city}",
        ),
        Aspect(
            "employees",
            "how many employees does {e} have",
            (
                "{e} employs roughly {staff:,} people worldwide.",
                "The workforce of {e} has grown to about {staff:,} employees.",
            ),
            "{e} has about {staff:,} employees.",
            "{o} hired several hundred people who had left {e}.",
            "{staff:,}",
        ),
    ],
    "species": [
        Aspect(
            "habitat",
            "where does the {e} live",
            (
                "The {e} lives in {habitat}, where it shelters under stones during the day.",
                "Field surveys find the {e} almost only in {habitat}.",
            ),
            "The {e} is found in {habitat}.",
            "The {o} is often mistaken for the {e} by casual observers.",
            "{habitat}",
        ),
        Aspect(
            "diet",
            "what does the {e} eat",
            (
                "The {e} feeds mainly on {food}.",
                "Studies of its stomach contents show that the {e} eats {food} for most of the year.",
            ),
            "Its diet consists of {food}.",
            "The {o} competes with the {e} for food in some areas.",
            "{food}",
        ),
        Aspect(
            "lifespan",
            "how long does the {e} live",
            (
                "The {e} typically lives {life} to {life2} years in the wild.",
                "In captivity a {e} can live a few years longer than its usual {life} to {life2} years.",
            ),
            "The {e} lives for {life} to {life2} years.",
            "The {o} lives far longer than the {e}, according to one study.",
            "{life} to {life2} years",
        ),
        Aspect(
            "size",
            "how big does the {e} get",
            (
                "Adult {e} individuals grow to about {size} centimetres in length.",
                "At about {size} centimetres long, the {e} is small for its family.",
            ),
            "Adults reach about {size} centimetres.",
            "The {o} is roughly twice the size of the {e}.",
            "{size} centimetres",
        ),
        Aspect(
            "color",
            "what color is the {e}",
            (
                "The {e} is {color} with {pattern}.",
                "Its {color} colouring and {pattern} make the {e} easy to recognise.",
            ),
            "The {e} is {color} with {pattern}.",
            "The {o} and the {e} differ mostly in their markings.",
            "{color} with {pattern}",
        ),
    ],
}
_SPECIES_SUFFIX = ["warbler", "newt", "beetle", "minnow", "orchid", "shrew", "moth", "lizard"]
_COMPANY_SUFFIX = ["Systems", "Industries", "Works", "Labs", "Group", "Manufacturing"]


def _url(kind: str, title: str, doc_id: str) -> str:
    # Opaque: the docid names the passage's construction (-dup, -lookalike, -cmp-), which would leak its grade.
    slug = "-".join(title.lower().split())
    return f"https://example.org/{kind}/{slug}-{hashlib.sha1(doc_id.encode()).hexdigest()[:8]}"


def _name(rng: np.random.Generator, kind: str, taken: set[str]) -> str:
    while True:
        base = (rng.choice(_SYL_A) + rng.choice(_SYL_B) + rng.choice(_SYL_C)).capitalize()
        name = {
            "town": base,
            "company": f"{base} {rng.choice(_COMPANY_SUFFIX)}",
            "species": f"{base.lower()} {rng.choice(_SPECIES_SUFFIX)}",
        }[kind]
        if name not in taken:
            taken.add(name)
            return name


def _lookalike(name: str) -> str:
    """A name one letter away (Marrowdene -> Marrowdenne): the near-duplicate a lexical matcher falls for."""
    i = max(1, len(name.split()[0]) // 2)
    return name[:i] + name[i] + name[i:]


def _facts(rng: np.random.Generator) -> dict[str, object]:
    return {
        "year": int(rng.integers(1150, 1990)),
        "year2": int(rng.integers(1995, 2024)),
        "pop": int(rng.integers(800, 400_000)),
        "river": rng.choice(_RIVERS),
        "industry": rng.choice(_INDUSTRY),
        "festival": rng.choice(_FESTIVAL),
        "month": rng.choice(_MONTHS),
        "person": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
        "product": rng.choice(_PRODUCTS),
        "n": int(rng.integers(3, 60)),
        "city": _name(rng, "town", set()),
        "staff": int(rng.integers(40, 90_000)),
        "habitat": rng.choice(_HABITAT),
        "food": rng.choice(_FOOD),
        "life": int(rng.integers(2, 9)),
        "size": int(rng.integers(2, 60)),
        "color": rng.choice(_COLORS),
        "pattern": rng.choice(_PATTERNS),
    }


def generate(cfg: SynthConfig) -> tuple[list[dict], list[dict], list[tuple[str, str, int]]]:
    """Return (corpus rows, query rows, qrels (qid, docid, grade)) for ``cfg``; deterministic for the seed."""
    rng = np.random.default_rng(cfg.seed)
    kinds = list(KINDS)
    taken: set[str] = set()
    entities = []
    for i in range(cfg.entities):
        kind = kinds[i % len(kinds)]
        facts = _facts(rng)
        facts["life2"] = facts["life"] + int(rng.integers(2, 6))
        entities.append({"id": f"e{i:04d}", "kind": kind, "name": _name(rng, kind, taken), "facts": facts})

    docs: list[dict] = []
    # (entity index, aspect) -> docids stating that fact in a focused passage (grade 3 for that query)
    focused: dict[tuple[int, str], list[str]] = {}
    overview: dict[int, tuple[str, set[str]]] = {}
    comparisons: dict[int, list[tuple[str, str]]] = {}  # entity -> (docid, aspect) of passages naming it
    mixed: dict[int, list[tuple[str, str, str]]] = {}  # entity -> (docid, main aspect, side aspect)

    def add(doc_id: str, title: str, text: str, kind: str) -> str:
        docs.append({"_id": doc_id, "title": title, "text": text, "url": _url(kind, title, doc_id)})
        return doc_id

    by_kind: dict[str, list[int]] = {k: [i for i, e in enumerate(entities) if e["kind"] == k] for k in kinds}
    for i, ent in enumerate(entities):
        aspects = KINDS[ent["kind"]]
        fmt = {**ent["facts"], "e": ent["name"]}
        for a in aspects:
            sentences = [t.format(**fmt) for t in a.focused]
            text = " ".join([*sentences, str(rng.choice(_FILLER))])
            ids = [add(f"{ent['id']}-{a.name}", ent["name"], text, ent["kind"])]
            if rng.random() < 0.5:  # near-duplicate: reordered, boilerplate added; still states the fact
                dup = " ".join([*reversed(sentences), str(rng.choice(_BOILER))])
                ids.append(add(f"{ent['id']}-{a.name}-dup", ent["name"], dup, ent["kind"]))
            focused[(i, a.name)] = ids
        # Two passages focused on one aspect that also state another fact in passing: 3 for the main aspect,
        # 2 for the side one.
        for k in range(2):
            main, side = rng.choice(len(aspects), size=2, replace=False).tolist()
            a_main, a_side = aspects[main], aspects[side]
            text = " ".join(
                [a_main.focused[0].format(**fmt), a_side.fact.format(**fmt), str(rng.choice(_FILLER))]
            )
            mixed.setdefault(i, []).append(
                (add(f"{ent['id']}-mixed{k}", ent["name"], text, ent["kind"]), a_main.name, a_side.name)
            )
        mentioned = sorted(rng.choice([a.name for a in aspects], size=3, replace=False).tolist())
        body = [a.fact.format(**fmt) for a in aspects if a.name in mentioned]
        body += [str(x) for x in rng.choice(_FILLER, size=2, replace=False)]
        overview[i] = (
            add(f"{ent['id']}-overview", f"About {ent['name']}", " ".join(body), ent["kind"]),
            set(mentioned),
        )
        # A passage about a sibling entity that names this one in passing: related, not an answer.
        others = [j for j in by_kind[ent["kind"]] if j != i]
        o = entities[int(rng.choice(others))]
        a = aspects[int(rng.integers(len(aspects)))]
        other_fmt = {**o["facts"], "e": o["name"]}
        text = " ".join([a.comparison.format(e=ent["name"], o=o["name"]), a.focused[0].format(**other_fmt)])
        comparisons.setdefault(i, []).append(
            (add(f"{ent['id']}-cmp-{a.name}", o["name"], text, ent["kind"]), a.name)
        )

    queries: list[dict] = []
    qrels: list[tuple[str, str, int]] = []
    all_docids = [d["_id"] for d in docs]
    kind_of = {d["_id"]: d["url"].split("/")[3] for d in docs}
    for i, ent in enumerate(entities):
        aspects = KINDS[ent["kind"]]
        asked = rng.choice(len(aspects), size=min(cfg.queries_per_entity, len(aspects)), replace=False)
        for ai in sorted(asked.tolist()):
            a = aspects[ai]
            qid = f"{ent['id']}-q{ai}"
            answer = a.answer.format(**ent["facts"])
            queries.append(
                {"_id": qid, "text": a.query.format(e=ent["name"]), "metadata": {"answers": [answer]}}
            )
            grades: dict[str, int] = {}
            for b in aspects:
                for d in focused[(i, b.name)]:
                    grades[d] = 3 if b.name == a.name else 1
            ov, mentioned = overview[i]
            grades[ov] = 2 if a.name in mentioned else 1
            for d, _ in comparisons.get(i, []):
                grades[d] = 1
            for d, main, side in mixed.get(i, []):
                grades[d] = 3 if main == a.name else 2 if side == a.name else 1
            siblings = [j for j in by_kind[ent["kind"]] if j != i]
            for j in rng.choice(siblings, size=min(cfg.distractors, len(siblings)), replace=False).tolist():
                grades.setdefault(focused[(j, a.name)][0], 0)
            # a look-alike name stating another entity's fact on the same aspect: lexically close, wrong entity
            j = int(rng.choice(siblings))
            fake = _lookalike(ent["name"])
            fmt = {**entities[j]["facts"], "e": fake}
            lookalike_id = f"{ent['id']}-q{ai}-lookalike"
            docs.append(
                {
                    "_id": lookalike_id,
                    "title": fake,
                    "text": " ".join(t.format(**fmt) for t in a.focused),
                    "url": _url(ent["kind"], fake, lookalike_id),
                }
            )
            grades[lookalike_id] = 0
            other_kind = [d for d in all_docids if kind_of[d] != ent["kind"]]
            for d in rng.choice(
                other_kind, size=min(cfg.random_negatives, len(other_kind)), replace=False
            ).tolist():
                grades.setdefault(d, 0)
            qrels.extend((qid, d, g) for d, g in sorted(grades.items()))
    return docs, queries, qrels


def synth(cfg: SynthConfig) -> StageResult:
    out = Path(cfg.out)
    with Timer() as timer:
        docs, queries, qrels = generate(cfg)
        if cfg.unjudged:
            # drawn after generation with a generator of its own, so the corpus is the same as at unjudged=0
            rng = np.random.default_rng(cfg.seed + 1)
            qids = [q["_id"] for q in queries]
            hidden = set(rng.choice(qids, size=round(cfg.unjudged * len(qids)), replace=False).tolist())
            qrels = [r for r in qrels if r[0] not in hidden]
        (out / "qrels").mkdir(parents=True, exist_ok=True)
        with open(out / "corpus.jsonl", "w") as fh:
            fh.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
        with open(out / "queries.jsonl", "w") as fh:
            fh.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in queries)
        with open(out / "qrels" / "test.tsv", "w") as fh:
            fh.write("query-id\tcorpus-id\tscore\n")
            fh.writelines(f"{q}\t{d}\t{g}\n" for q, d, g in qrels)
    hist = {str(g): sum(1 for *_, x in qrels if x == g) for g in range(4)}
    counts = {"docs": len(docs), "queries": len(queries), "pairs": len(qrels),
              "judged_queries": len({q for q, _, _ in qrels})}  # fmt: skip
    return write_stage_files(
        out, "data.synth", cfg, counts, [], timer.seconds, {"grades": hist, "layout": "beir"}
    )
