"""Retrieval-augmented answer generation with a causal LM (paper 2's RAG setting, ../shared/papers.md
section 2: top-k passages to a generator, short answers scored by exact match and F1). No Ray here.

A question and its ranked passages (titles shown, each cut to ``passage_tokens`` tokens) become one prompt;
greedy generation with a bound on new tokens, batched across questions (``models.utility.GreedyGenerator``);
the answer is extracted from the first line of the reply. An empty passage list is closed book.

The prompt always fits the model's positions with room for the answer: the lowest-ranked passages are
dropped until it does (counted), and a question too long on its own is cut from the left (recorded). A prompt
whose fixed text cannot fit at all is refused when the generator is built, naming the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from models.loading import DEFAULT_JUDGE, load_causal_lm
from models.utility import ChatRenderer, GreedyGenerator

log = logging.getLogger("augrel")

#: tokenizers without a known limit report a huge sentinel (transformers' VERY_LARGE_INTEGER, 1e30)
_SANE_POSITIONS = 10_000_000


@dataclass(frozen=True)
class RagPrompt:
    """Every string and limit that shapes the generator's input; ``version`` hashes them all.

    The wording follows paper 2's answer-evaluation prompt (Trustworthy-Information-Access/
    Utility-Focused-LLM-Annotation, answer-evalution/dataset.py, ``generate_answer_prompt_passages``): a
    "faithful question and answer assistant" turn, its acknowledgement, then the passages and the question
    ending in "Answer:". Its short-answer variant ("with one or few words") is the one used here: EM / F1
    reward a short span, and a sentence scores near zero EM however right it is. Passages are shown numbered
    with their titles (HotpotQA paragraphs lean on their titles: the entity is often named only there).
    """

    name: str = "rag-v1"
    passage_tokens: int = 300
    max_new_tokens: int = 32
    # One line per answer: a base model (no chat template) goes on to write the next "User:" turn otherwise,
    # and would always run to the token bound.
    stop: tuple[str, ...] = ("\n",)
    role: str = (
        "You are a faithful question and answer assistant. Answer the question with one or few words, "
        "without the source and without explanation."
    )
    role_ack: str = "Yes, I am the faithful question and answer assistant."
    passage: str = "[{i}] Title: {title}\n{text}"
    passage_untitled: str = "[{i}] {text}"
    passage_separator: str = "\n"
    request: str = (
        "Given the information: \n{passages}\n Answer the following question based on the given information "
        "with one or few words, no explanation.\n Question: {question}\n\n Answer:"
    )
    closed_book_request: str = (
        "Answer the following question with one or few words, no explanation.\n"
        " Question: {question}\n\n Answer:"
    )
    # written as the start of the model's reply (empty: the reply starts free)
    answer_cue: str = ""

    def __post_init__(self) -> None:
        for name in ("passage_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        needs = {
            "passage": ("{i}", "{title}", "{text}"),
            "passage_untitled": ("{i}", "{text}"),
            "request": ("{passages}", "{question}"),
            "closed_book_request": ("{question}",),
        }
        for name, fields in needs.items():
            missing = [f for f in fields if f not in getattr(self, name)]
            if missing:
                raise ValueError(f"{name}: the template needs {', '.join(missing)}")

    @property
    def version(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return f"{self.name}@{hashlib.sha256(blob).hexdigest()[:8]}"

    def messages(self, question: str, passages: Sequence[tuple[str | None, str]]) -> list[dict[str, str]]:
        """The chat for ``question`` and its (title, text) passages, already cut; none: closed book."""
        if passages:
            shown = self.passage_separator.join(
                self.passage.format(i=i, title=title, text=text)
                if title
                else self.passage_untitled.format(i=i, text=text)
                for i, (title, text) in enumerate(passages, 1)
            )
            request = self.request.format(passages=shown, question=question)
        else:
            request = self.closed_book_request.format(question=question)
        return [
            {"role": "user", "content": self.role},
            {"role": "assistant", "content": self.role_ack},
            {"role": "user", "content": request},
        ]


@dataclass
class Passage:
    docid: str
    text: str
    title: str | None = None


@dataclass
class RagAnswer:
    answer: str  # extracted from ``raw``
    raw: str  # the generation, cut at the first stop string
    finished: bool  # ended by an end-of-sequence token or a stop string within the bound (else: truncated)
    prompt_tokens: int
    truncated_passages: int  # passages cut to ``passage_tokens``
    dropped_passages: int  # the lowest-ranked passages left out so the prompt fits the model's positions
    question_cut: bool = False  # the question alone did not fit: its beginning was cut off


@dataclass
class EncodedPrompt:
    ids: list[int]
    truncated_passages: int
    dropped_passages: int
    question_cut: bool


# ------------------------------------------------------------------------------------------ answers

_PREFIX = re.compile(r"^(?:answer\s*:|a\s*:|the\s+answer\s+is\b\s*:?)", re.IGNORECASE)
# A small model echoes the prompt's passage format before the answer ("[1] Title: Shirley Temple"), opens a
# list ("1. The city of New York"), or, as a base model on plain chat lines, starts the next turn ("User:"):
# the marker is format, not answer. A list marker needs its space, so "1945." and "3.5 million" stay whole.
_MARKER = re.compile(
    r"^(?:\[\d+\]\s*|\d{1,2}\.\s+(?=\D)|(?:title|user|assistant|system)\s*:\s*)", re.IGNORECASE
)
_QUESTION_LABEL = re.compile(r"^(?:question|q)\s*:\s*", re.IGNORECASE)
_QUOTE_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "`": "`"}
_EMPHASIS = "*_"


def _norm_space(text: str) -> str:
    return " ".join(text.split())


def _drop_restated_question(line: str, question: str) -> str:
    """``line`` without a leading copy of the question (with or without "Question:" and its question mark)."""
    q = _norm_space(question).lower()
    if not q:
        return line
    body = _norm_space(_QUESTION_LABEL.sub("", line))
    for form in dict.fromkeys((q, q.rstrip("?").rstrip())):
        if form and body.lower().startswith(form):
            rest = body[len(form) :]
            # the question's own words, not a longer word that starts the same way
            if not rest or not rest[0].isalnum():
                return rest.lstrip(" ?:-–—")
    return line


def _strip_trailing_period(text: str) -> str:
    """One trailing full stop off, unless it ends an abbreviation such as "U.S." or "D.C."."""
    if not text.endswith(".") or text.endswith(".."):
        return text
    last = text.split()[-1]
    return text if "." in last[:-1] else text[:-1]


def _clean_line(line: str, question: str) -> str:
    while True:
        before = line
        line = line.strip().strip(_EMPHASIS).strip()
        line = _PREFIX.sub("", line, count=1).strip()
        line = _MARKER.sub("", line, count=1).strip()
        line = _drop_restated_question(line, question).strip()
        if len(line) >= 2 and _QUOTE_PAIRS.get(line[0]) == line[-1]:
            line = line[1:-1]
        line = _strip_trailing_period(line)
        if line == before:
            return line


def extract_answer(raw: str, question: str) -> str:
    """The short answer in a generation: its first line that still says something once stripped of a leading
    "Answer:" / "A:" / "The answer is", of an echoed passage marker ("[1]", "Title:"), role label ("User:")
    or list number ("1. "), of a restated question, of surrounding quotes or asterisks, and of a trailing full
    stop. "" when nothing is left (an empty generation is an empty answer, never an error)."""
    for line in raw.splitlines():
        answer = _clean_line(line, question)
        if answer:
            return answer
    return ""


# ---------------------------------------------------------------------------------------- generator


def context_limit(model, tokenizer) -> int | None:
    """The positions the model can attend over: the smallest sane one of its config's
    ``max_position_embeddings`` and its tokenizer's ``model_max_length`` (None when neither is known)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    found = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    sane = [int(v) for v in found if isinstance(v, int) and 0 < v < _SANE_POSITIONS]
    return min(sane) if sane else None


class RagGenerator:
    """Answers questions from their ranked passages, all questions batched together.

    Args:
        model, tokenizer: a causal LM (``models.loading.load_causal_lm``); its chat template when it has one,
            plain ``User:`` / ``Assistant:`` lines otherwise (a base model).
        prompt: ``RagPrompt`` (its ``version`` belongs in every output row).
        batch_size: prompts per generate call.
        max_batch_tokens: optional cap on batch size x (longest prompt + new tokens), a memory bound.
    """

    def __init__(self, model, tokenizer, prompt: RagPrompt = RagPrompt(), batch_size: int = 8,
                 max_batch_tokens: int | None = None):  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
        self.model, self.tokenizer, self.prompt = model, tokenizer, prompt
        self.renderer = ChatRenderer(tokenizer)
        self.generator = GreedyGenerator(model, tokenizer, batch_size, max_batch_tokens, prompt.stop)
        positions = context_limit(model, tokenizer)
        if positions is None:
            log.warning("the model states no maximum length: prompts are not cut to fit it")
            self.max_prompt_tokens = None
        else:
            self.max_prompt_tokens = positions - prompt.max_new_tokens
            fixed = len(self._ids("", []))
            if fixed > self.max_prompt_tokens:
                raise ValueError(
                    f"max_new_tokens: {prompt.max_new_tokens} new tokens leave {self.max_prompt_tokens} of "
                    f"the model's {positions} positions, and the prompt's fixed text alone takes {fixed} "
                    "tokens"
                )

    @property
    def prompt_version(self) -> str:
        return self.prompt.version

    def _tok(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _ids(self, question: str, passages: Sequence[tuple[str | None, str]]) -> list[int]:
        return self.renderer.ids(self.prompt.messages(question, passages), self.prompt.answer_cue)

    def cut(self, text: str) -> tuple[str, bool]:
        """A passage's text cut to ``passage_tokens`` tokens, and whether it was cut."""
        ids = self._tok(text or "")
        if len(ids) <= self.prompt.passage_tokens:
            return text or "", False
        return self.tokenizer.decode(ids[: self.prompt.passage_tokens], skip_special_tokens=True), True

    def _fits(self, ids: Sequence[int]) -> bool:
        return self.max_prompt_tokens is None or len(ids) <= self.max_prompt_tokens

    def encode(self, question: str, passages: Sequence[Passage]) -> EncodedPrompt:
        """The prompt ids of one question: passages cut, the lowest-ranked dropped until it fits; with none
        left, the closed-book prompt, the question cut from the left if it alone does not fit."""
        cut = [(p.title, *self.cut(p.text)) for p in passages]
        shown = [(title, text) for title, text, _ in cut]
        truncated = sum(was_cut for _, _, was_cut in cut)
        ids = self._ids(question, shown)
        k = len(shown)
        if not self._fits(ids):
            # the largest k whose prompt fits: the prompt grows with every passage added
            lo, hi, best = 1, k - 1, None
            while lo <= hi:
                mid = (lo + hi) // 2
                mid_ids = self._ids(question, shown[:mid])
                if self._fits(mid_ids):
                    lo, best = mid + 1, (mid, mid_ids)
                else:
                    hi = mid - 1
            k, ids = best if best else (0, self._ids(question, []))
        question_cut = False
        if k == 0 and not self._fits(ids):
            ids, question_cut = self._cut_question(question), True
        return EncodedPrompt(ids, truncated, len(passages) - k, question_cut)

    def _cut_question(self, question: str) -> list[int]:
        """The closed-book prompt with the question's beginning cut off until it fits (the constructor checked
        that it fits with no question at all)."""
        q_ids = self._tok(question)
        keep = len(q_ids) - (len(self._ids(question, [])) - self.max_prompt_tokens)
        while True:
            text = (
                self.tokenizer.decode(q_ids[len(q_ids) - keep :], skip_special_tokens=True)
                if keep > 0
                else ""
            )
            ids = self._ids(text, [])
            if self._fits(ids):
                return ids
            keep = min(keep - 1, keep - (len(ids) - self.max_prompt_tokens))

    def generate(self, questions: Sequence[str], contexts: Sequence[Sequence[Passage]]) -> list[RagAnswer]:
        """One ``RagAnswer`` per question, in order; ``contexts[i]`` are question i's passages best first
        (empty: closed book). Every prompt goes through one batched generation."""
        if len(questions) != len(contexts):
            raise ValueError(f"contexts: {len(contexts)} passage lists for {len(questions)} questions")
        encoded = [self.encode(q, c) for q, c in zip(questions, contexts, strict=True)]
        gens = (
            self.generator.generate([e.ids for e in encoded], self.prompt.max_new_tokens) if encoded else []
        )
        return [
            RagAnswer(
                answer=extract_answer(g.text, q),
                raw=g.text,
                finished=g.finished,
                prompt_tokens=g.prompt_tokens,
                truncated_passages=e.truncated_passages,
                dropped_passages=e.dropped_passages,
                question_cut=e.question_cut,
            )
            for q, e, g in zip(questions, encoded, gens, strict=True)
        ]


def load_generator(name_or_path: str = DEFAULT_JUDGE, *, prompt: RagPrompt = RagPrompt(), dtype: str = "auto",
                   device: str = "auto", batch_size: int = 8,
                   max_batch_tokens: int | None = None) -> RagGenerator:  # fmt: skip
    """A ``RagGenerator`` over any causal LM by hub id or local path (default: the packaged Gemma 3 270M).
    Call it where the model runs (a worker or actor): the offline default resolves into that node's cache."""
    lm = load_causal_lm(name_or_path, dtype=dtype, device=device)
    return RagGenerator(lm.model, lm.tokenizer, prompt, batch_size, max_batch_tokens)
