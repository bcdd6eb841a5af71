"""Utility annotation with a causal LM (paper 2, ../shared/papers.md section 2). No Ray here.

Listwise stages, over windows of at most ``window`` passages numbered ``[1]..[W]``:

- **RelSel**: select the passages relevant to the question (``My selection:[[i],[j],...]``);
- **pseudo answer**: a short answer written from the passages RelSel kept;
- **UtilSel**: select, among the passages RelSel kept, those useful for producing that answer;
- **UtilRank**: rank the passages RelSel kept by that usefulness (``[i] > [j] > ...``, RankGPT's sliding window
  when they do not fit one window); the top ``top_fraction`` of the ranking, at least one, are positives.

and one pointwise signal, **answer likelihood**: utility(q, p) = log P(answer | q, p) - log P(answer | q), the
answer teacher-forced in one forward pass per pair (no generation), from the gold answer when the data has one
and the pseudo answer otherwise.

Generation is greedy with a bound on new tokens, batched with left padding. A window's passages are shown in an
order shuffled with a seed derived from (seed, qid, stage, window) and recorded with the window, so any prompt
can be rebuilt. Passages are cut to ``passage_tokens`` tokens (the paper cuts to 300 words); the cut is recorded.

Parsing follows the paper's code: every ``[n]`` in the output, 1-based, out-of-range and repeated indices dropped,
reasoning (``<think>...</think>``) stripped first. Failures are counted per kind and never raise: an output with
no bracket at all leaves its window's passages unselected with the reason recorded; a generation cut by the
token bound is parsed for what it holds and counted; an empty pseudo answer is counted (UtilSel then sees the
question alone). An empty selection (``[]``) is a valid answer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from models.judge import length_buckets, pad_left

MODES = ("relsel", "utility-sel", "utility-rank", "answer-likelihood")

_UTILITY_DEFINITION = (
    "The requirements for judging whether a passage has utility in answering the question are: the passage "
    "has utility in answering the question, meaning that the passage not only is relevant to the question, "
    "but also is useful in generating a correct, reasonable and complete answer to the question."
)


@dataclass(frozen=True)
class UtilityPrompts:
    """Every string and limit that shapes the annotator's input; ``version`` hashes them all.

    The wording follows paper 2's public prompts (RankGPT-style chats: one user turn per passage, each
    acknowledged). ``*_cue`` is written as the start of the model's reply, so its continuation is the
    selection itself: a small model that would otherwise open with prose starts inside the format.
    """

    name: str = "utility-v1"
    window: int = 16
    passage_tokens: int = 400  # about the paper's 300 words
    answer_passages: int = 16  # passages the pseudo-answer writer sees (the first RelSel kept)
    max_selection_tokens: int = 48
    max_ranking_tokens: int = 96
    max_answer_tokens: int = 48
    top_fraction: float = 0.1  # UtilRank's positives: the top 10%, at least one
    # Every reply is one line: a base model (no chat template) goes on to write the next "User:" turn, and
    # would always run to the token bound otherwise. A reply ending here is finished, not truncated.
    stop: tuple[str, ...] = ("\n",)
    # Selections and rankings are decoded over the tokens their format uses (digits, brackets, commas, ">",
    # spaces, a full stop) and the end of the reply. Unconstrained, Gemma 3 270M (a base model) copies the
    # format's placeholder "[i],[j],...]." into every window: no index at all. A large annotator writes within
    # the format anyway, and the constraint changes nothing for it.
    constrain_listwise: bool = True
    listwise_charset: str = "0123456789[],>. "
    relsel_role: str = (
        "You are the relevance judger, an intelligent assistant that can select the passages that are "
        "relevant to the question."
    )
    relsel_role_ack: str = "Yes, I am the relevance judger."
    relsel_intro: str = (
        "I will provide you with {num} passages, each indicated by a number identifier []. \n"
        "Select the passages that are relevant to the question: {query}."
    )
    relsel_instruction: str = (
        "Question: {query}.\n\nDirectly output the passages you selected that are relevant to the question. "
        "The format of the output is: 'My selection:[[i],[j],...].'. Only respond with the selection results, "
        "do not say any word or explain."
    )
    utilsel_role: str = (
        "You are the utility judger, an intelligent assistant that can select the passages that have utility "
        "in answering the question."
    )
    utilsel_role_ack: str = "Yes, I am the utility judger."
    utilsel_intro: str = (
        "I will provide you with {num} passages, each indicated by a number identifier []. \n"
        "I will also provide you with a reference answer to the question. \n"
        "Select the passages that have utility in generating the reference answer to the following question "
        "from the {num} passages: {query}."
    )
    utilsel_instruction: str = (
        "Question: {query}. \nReference answer: {answer}. \n\n" + _UTILITY_DEFINITION + " \n"
        "Directly output the passages you selected that have utility in generating the reference answer to "
        "the question. The format of the output is: 'My selection:[[i],[j],...].'. Only respond with the "
        "selection results, do not say any word or explain."
    )
    utilrank_role: str = (
        "You are the utility judger, an intelligent assistant that can rank passages by their utility in "
        "answering the question."
    )
    utilrank_intro: str = (
        "I will provide you with {num} passages, each indicated by a number identifier []. \n"
        "I will also provide you with a reference answer to the question. \n"
        "Rank the {num} passages by their utility in generating the reference answer to the following "
        "question: {query}."
    )
    utilrank_instruction: str = (
        "Question: {query}. \nReference answer: {answer}. \n\n" + _UTILITY_DEFINITION + " \n"
        "Rank the {num} passages above by their utility in descending order, using their identifiers. The "
        "output format is [] > [], e.g., [2] > [1]. Only respond with the ranking results, do not say any "
        "word or explain."
    )
    ack_intro: str = "Okay, please provide the passages."
    ack_intro_reference: str = "Okay, please provide the passages and the reference answer."
    passage: str = "[{i}] {text}"
    passage_ack: str = "Received passage [{i}]."
    selection_cue: str = "My selection:["
    ranking_cue: str = "["
    answer_role: str = (
        "You are a faithful question and answer assistant. Answer the question based on the given information "
        "with one or few sentences without the source."
    )
    answer_role_ack: str = "Yes, I am the faithful question and answer assistant."
    answer_request: str = (
        "Given the information: \n{passages}\n Answer the following question based on the given information "
        "with one or few sentences without the source.\n Question: {query}\n\n Answer:"
    )
    # answer likelihood: the same request with one passage, and without any (the closed-book baseline)
    closed_book_request: str = (
        "Answer the following question with one or few sentences.\n Question: {query}\n\n Answer:"
    )

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window: need at least 1 passage per window, got {self.window}")
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"top_fraction: must be in (0, 1], got {self.top_fraction}")
        for name in ("passage_tokens", "answer_passages", "max_selection_tokens", "max_ranking_tokens",
                     "max_answer_tokens"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")

    @property
    def version(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return f"{self.name}@{hashlib.sha256(blob).hexdigest()[:10]}"


# ------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Parsed:
    """What a listwise output says: 0-based indices in output order, and what was dropped on the way."""

    indices: tuple[int, ...]
    no_bracket: bool = False  # not one bracketed number, and no empty list: garbage
    out_of_range: int = 0
    duplicates: int = 0


_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)
_INDEX = re.compile(r"\[\s*(\d+)\s*\]")
_EMPTY_LIST = re.compile(r"\[\s*\]")


def parse_indices(text: str, n: int) -> Parsed:
    """Every ``[k]`` of ``text`` (reasoning stripped), 1-based in ``1..n``, as 0-based indices in order of first
    mention. ``[]`` alone is a valid empty answer; text with neither is ``no_bracket``."""
    text = _THINK.sub("", text)
    found = [int(m) for m in _INDEX.findall(text)]
    if not found:
        return Parsed((), no_bracket=_EMPTY_LIST.search(text) is None)
    seen: dict[int, None] = {}
    out_of_range = duplicates = 0
    for k in found:
        if not 1 <= k <= n:
            out_of_range += 1
        elif k - 1 in seen:
            duplicates += 1
        else:
            seen[k - 1] = None
    return Parsed(tuple(seen), out_of_range=out_of_range, duplicates=duplicates)


def complete_ranking(parsed: Sequence[int], n: int) -> list[int]:
    """A full ranking of ``n`` items: the parsed order, then the unmentioned items in their shown order
    (RankGPT's rule: a passage the model left out keeps its place after the ones it ranked)."""
    mentioned = dict.fromkeys(parsed)
    return [*mentioned, *(i for i in range(n) if i not in mentioned)]


def top_count(n: int, fraction: float) -> int:
    """UtilRank's positives among ``n`` ranked passages: the top ``floor(fraction * n)``, at least one."""
    return 0 if n == 0 else max(1, math.floor(fraction * n + 1e-9))


# ------------------------------------------------------------------------------------------ windows


def window_slices(n: int, size: int) -> list[range]:
    """``n`` passages cut into consecutive windows of at most ``size``, as even as possible (17 passages in
    windows of 16 are 8 + 9, not 16 + 1: a window of one passage asks the model nothing)."""
    if n == 0:
        return []
    k = -(-n // size)
    bounds = np.linspace(0, n, k + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def window_seed(seed: int, qid: str, stage: str, window: int) -> int:
    """The shuffle seed of one window: stable across runs, machines and Python's hash randomisation."""
    digest = hashlib.blake2b(f"{seed}\x1f{qid}\x1f{stage}\x1f{window}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def sliding_windows(n: int, size: int, step: int) -> list[range]:
    """RankGPT's passes for a ranking longer than a window: windows of ``size`` from the back to the front,
    ``step`` apart, so strong passages bubble up to the top window."""
    if n <= size:
        return [range(0, n)] if n else []
    out, end = [], n
    while True:
        start = max(0, end - size)
        out.append(range(start, end))
        if start == 0:
            return out
        end -= step


# ----------------------------------------------------------------------------------------- generation


@dataclass
class Generation:
    text: str
    finished: bool  # ended with an end-of-sequence token within the bound (else: truncated)
    prompt_tokens: int


class ChatRenderer:
    """Messages -> prompt token ids: the model's chat template when it has one, otherwise plain ``User:`` /
    ``Assistant:`` lines (a base model). ``cue`` is appended as the start of the assistant's reply."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def text(self, messages: Sequence[dict[str, str]], cue: str = "") -> str:
        if self.has_template:
            return (
                self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
                + cue
            )
        names = {"user": "User", "assistant": "Assistant", "system": "System"}
        lines = [f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant: " + cue

    def ids(self, messages: Sequence[dict[str, str]], cue: str = "") -> list[int]:
        # a chat template writes its own <bos>; a plain prompt gets the tokenizer's special tokens
        return self.tokenizer(self.text(messages, cue), add_special_tokens=not self.has_template)["input_ids"]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list | tuple) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    # chat models end a turn with their own token (Gemma: <end_of_turn>)
    for t in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(t) if t in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(tid)
    return ids


def charset_token_ids(tokenizer, charset: str) -> list[int]:
    """The ids of the tokens whose text is made only of ``charset`` characters (and is not empty)."""
    allowed = set(charset)
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=True)
    return [i for i, t in enumerate(texts) if t and set(t) <= allowed]


class AllowedTokens:
    """A logits processor keeping only ``ids`` (every other logit set to -inf): constrained greedy decoding."""

    def __init__(self, ids: Sequence[int], vocab_size: int):
        self.mask = torch.ones(vocab_size, dtype=torch.bool)
        self.mask[torch.tensor(sorted(set(ids)), dtype=torch.long)] = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(scores.device)
        if scores.shape[-1] != mask.shape[0]:  # a head padded beyond the tokenizer's vocabulary
            mask = torch.nn.functional.pad(mask, (0, scores.shape[-1] - mask.shape[0]), value=True)
        return scores.masked_fill(mask, float("-inf"))


class StopAfterContent:
    """Stops a row once its reply, leading whitespace aside, holds a stop string: a base model often opens its
    reply with a line break, which must not end it before it starts."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int):
        self.tokenizer, self.stops, self.width = tokenizer, tuple(stops), prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width :], skip_special_tokens=True)
        done = [any(s in t.lstrip() for s in self.stops) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class GreedyGenerator:
    """Greedy generation for many prompts: batches of similar length, left padding, at most ``max_new_tokens``."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_batch_tokens: int | None = None,
                 stop: Sequence[str] = ()):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.stop = tuple(s for s in stop if s)
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.eos = _eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 allowed: Sequence[int] | None = None) -> list[Generation]:  # fmt: skip
        """Greedy continuations of ``prompts`` (token ids); ``allowed``: decode only these tokens (the
        end-of-sequence tokens are always allowed)."""
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        processors = None
        if allowed is not None:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            processors = LogitsProcessorList([AllowedTokens([*allowed, *self.eos], vocab)])

        out: list[Generation | None] = [None] * len(prompts)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=sorted(self.eos), pad_token_id=self.pad_id)  # fmt: skip
        lengths = [len(p) + max_new_tokens for p in prompts]
        for idx in length_buckets(lengths, self.batch_size, self.max_batch_tokens):
            ids, mask = pad_left([prompts[i] for i in idx], self.pad_id)
            stopping = (
                StoppingCriteriaList([StopAfterContent(self.tokenizer, self.stop, ids.shape[1])])
                if self.stop
                else None
            )
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      generation_config=config, logits_processor=processors,
                                      stopping_criteria=stopping)  # fmt: skip
            new = gen[:, ids.shape[1] :].cpu().tolist()
            for row, i in zip(new, idx, strict=True):
                stop = next((k for k, t in enumerate(row) if t in self.eos), None)
                kept = row if stop is None else row[:stop]
                text = self.tokenizer.decode(kept, skip_special_tokens=True).lstrip()
                cuts = [text.find(s) for s in self.stop if s in text]
                if cuts:
                    text = text[: min(cuts)]
                out[i] = Generation(text, stop is not None or bool(cuts), len(prompts[i]))
        return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ annotator


@dataclass
class Candidate:
    docid: str
    text: str
    title: str | None = None


@dataclass
class Question:
    """One question and all its candidates (a query is never split: windows and merging need them all)."""

    qid: str
    query: str
    candidates: list[Candidate]
    answer: str | None = None  # the gold answer, when the data has one


@dataclass
class PassageResult:
    selected: bool = False
    relevant: bool | None = None
    rank: int | None = None
    utility: float | None = None
    truncated: bool = False
    windows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class QuestionResult:
    qid: str
    passages: list[PassageResult]
    pseudo_answer: str | None = None


@dataclass
class StageStats:
    """Per stage: windows (or answers) run, and how many showed each kind of failure."""

    counts: dict[str, Counter] = field(default_factory=dict)

    def add(self, stage: str, kind: str, n: int = 1) -> None:
        self.counts.setdefault(stage, Counter())[kind] += n

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {s: dict(c) for s, c in self.counts.items()}


@dataclass
class _Window:
    question: int  # index into the batch of questions
    stage: str
    number: int
    seed: int
    shown: list[int]  # candidate indices in the order shown as [1]..[k]


class UtilityAnnotator:
    """Runs one mode's stages over a batch of questions: each stage over every question's windows at once
    (generation batches across questions), the stages of a question in order.

    Args:
        model, tokenizer: a causal LM (``models.loading.load_causal_lm``).
        prompts: ``UtilityPrompts`` (their ``version`` goes into every output row).
        batch_size: prompts per generate / forward call.
        seed: base of the per-window shuffle seeds.
        min_utility: answer-likelihood selects, among its top ``likelihood_top_fraction`` by utility (at least
            one, as UtilRank keeps its top 10%), the passages whose utility exceeds this (nats): a passage that
            does not make the answer more likely than the question alone does is never a positive.
        likelihood_top_fraction: see ``min_utility``; default ``prompts.top_fraction``.
        answer_source: answer-likelihood's answer: ``auto`` (gold when the question has one, else pseudo),
            ``gold`` or ``pseudo``.
    """

    def __init__(self, model, tokenizer, prompts: UtilityPrompts | None = None, batch_size: int = 8,
                 max_batch_tokens: int | None = None, seed: int = 0, min_utility: float = 0.0,
                 answer_source: str = "auto", likelihood_top_fraction: float | None = None):  # fmt: skip
        if answer_source not in ("auto", "gold", "pseudo"):
            raise ValueError(f"answer_source: auto, gold or pseudo, got {answer_source!r}")
        self.model, self.tokenizer = model, tokenizer
        self.prompts = prompts or UtilityPrompts()
        self.seed, self.min_utility, self.answer_source = seed, min_utility, answer_source
        self.likelihood_top_fraction = (
            self.prompts.top_fraction if likelihood_top_fraction is None else likelihood_top_fraction
        )
        if not 0 < self.likelihood_top_fraction <= 1:
            raise ValueError(f"likelihood_top_fraction: must be in (0, 1], got {likelihood_top_fraction}")
        self.renderer = ChatRenderer(tokenizer)
        self.generator = GreedyGenerator(model, tokenizer, batch_size, max_batch_tokens, self.prompts.stop)
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.stats = StageStats()
        self._listwise_ids: list[int] | None = None

    @property
    def listwise_ids(self) -> list[int] | None:
        """The tokens a selection or ranking is decoded over (None: unconstrained), plus the stop tokens."""
        if not self.prompts.constrain_listwise:
            return None
        if self._listwise_ids is None:
            ids = charset_token_ids(self.tokenizer, self.prompts.listwise_charset)
            ids += charset_token_ids(self.tokenizer, "".join(dict.fromkeys("".join(self.prompts.stop))))
            self._listwise_ids = sorted(set(ids))
        return self._listwise_ids

    @property
    def prompt_version(self) -> str:
        return self.prompts.version

    # -------------------------------------------------------------------------------- text pieces

    def _tok(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def cut(self, text: str) -> tuple[str, bool]:
        """A passage cut to ``passage_tokens`` tokens, and whether it was cut."""
        ids = self._tok(text or "")
        if len(ids) <= self.prompts.passage_tokens:
            return text or "", False
        return self.tokenizer.decode(ids[: self.prompts.passage_tokens], skip_special_tokens=True), True

    def listwise_messages(self, stage: str, query: str, passages: Sequence[str], answer: str | None = None):
        """The chat of one window (passages already cut, in the order shown)."""
        p, num = self.prompts, len(passages)
        if stage == "relsel":
            role, ack, intro, ack_intro, instruction = (p.relsel_role, p.relsel_role_ack, p.relsel_intro,
                                                        p.ack_intro, p.relsel_instruction)  # fmt: skip
        elif stage == "utilsel":
            role, ack, intro, ack_intro, instruction = (p.utilsel_role, p.utilsel_role_ack, p.utilsel_intro,
                                                        p.ack_intro_reference, p.utilsel_instruction)  # fmt: skip
        elif stage == "utilrank":
            role, ack, intro, ack_intro, instruction = (p.utilrank_role, p.utilsel_role_ack, p.utilrank_intro,
                                                        p.ack_intro_reference, p.utilrank_instruction)  # fmt: skip
        else:
            raise ValueError(f"unknown listwise stage {stage!r}")
        fill = {"num": num, "query": query, "answer": answer or ""}
        messages = [{"role": "user", "content": role}, {"role": "assistant", "content": ack},
                    {"role": "user", "content": intro.format(**fill)},
                    {"role": "assistant", "content": ack_intro}]  # fmt: skip
        for i, text in enumerate(passages, 1):
            messages.append({"role": "user", "content": p.passage.format(i=i, text=text)})
            messages.append({"role": "assistant", "content": p.passage_ack.format(i=i)})
        messages.append({"role": "user", "content": instruction.format(**fill)})
        return messages

    def answer_messages(self, query: str, passages: Sequence[str]):
        p = self.prompts
        info = "\n".join(p.passage.format(i=i, text=t) for i, t in enumerate(passages, 1))
        return [{"role": "user", "content": p.answer_role}, {"role": "assistant", "content": p.answer_role_ack},
                {"role": "user", "content": p.answer_request.format(passages=info, query=query)}]  # fmt: skip

    def closed_book_messages(self, query: str):
        p = self.prompts
        return [{"role": "user", "content": p.answer_role}, {"role": "assistant", "content": p.answer_role_ack},
                {"role": "user", "content": p.closed_book_request.format(query=query)}]  # fmt: skip

    # ------------------------------------------------------------------------------------ stages

    def annotate(self, questions: Sequence[Question], mode: str) -> list[QuestionResult]:
        """Annotate ``questions`` in ``mode``; results in input order, one ``PassageResult`` per candidate."""
        if mode not in MODES:
            raise ValueError(f"mode: one of {', '.join(MODES)}, got {mode!r}")
        # a title is part of the passage (HotpotQA paragraphs lean on theirs), as the relevance judge shows it
        cut = [
            [self.cut(f"{c.title}. {c.text}" if c.title else c.text) for c in q.candidates] for q in questions
        ]
        texts = [[t for t, _ in qc] for qc in cut]
        results = [QuestionResult(q.qid, [PassageResult(truncated=tr) for _, tr in qc])
                   for q, qc in zip(questions, cut, strict=True)]  # fmt: skip
        if mode == "answer-likelihood":
            if self.answer_source == "gold":
                missing = [q.qid for q in questions if not q.answer]
                if missing:
                    raise ValueError(f"answer_source gold: question {missing[0]!r} has no gold answer")
            # RelSel and the pseudo answer only for the questions that have no gold answer to score
            need = [qi for qi, q in enumerate(questions) if self.answer_source == "pseudo" or not q.answer]
            if need:
                sub = [questions[qi] for qi in need]
                self._relsel_and_answer(sub, [texts[qi] for qi in need], [results[qi] for qi in need])
            self._answer_likelihood(questions, texts, results)
            return results
        kept = self._relsel_and_answer(questions, texts, results, answer=mode != "relsel")
        if mode == "utility-sel":
            chosen = self._select(questions, texts, "utilsel", [sorted(k) for k in kept], results)
            for res, c in zip(results, chosen, strict=True):
                for i in c:
                    res.passages[i].selected = True
        elif mode == "utility-rank":
            self._rank(questions, texts, kept, results)
        return results

    def _relsel_and_answer(self, questions, texts, results, answer: bool = True) -> list[set[int]]:
        """RelSel over all candidates (``relevant``; ``selected`` too when RelSel is the mode), then the pseudo
        answer from what it kept. Returns the kept candidate indices per question."""
        kept = self._select(questions, texts, "relsel", [list(range(len(q.candidates))) for q in questions],
                            results)  # fmt: skip
        for res, k in zip(results, kept, strict=True):
            for i, r in enumerate(res.passages):
                r.relevant = i in k
                r.selected = r.relevant and not answer
        if answer:
            self._pseudo_answers(questions, texts, kept, results)
        return kept

    def _select(self, questions, texts, stage, pools, results) -> list[set[int]]:
        """One listwise selection stage over each question's ``pools`` (candidate indices): the selected indices."""
        windows: list[_Window] = []
        for qi, (q, pool) in enumerate(zip(questions, pools, strict=True)):
            for w, sl in enumerate(window_slices(len(pool), self.prompts.window)):
                seed = window_seed(self.seed, q.qid, stage, w)
                shown = [pool[j] for j in sl]
                np.random.default_rng(seed).shuffle(shown)
                windows.append(_Window(qi, stage, w, seed, shown))
        answers = {qi: results[qi].pseudo_answer for qi in range(len(questions))}
        prompts = [self.renderer.ids(self.listwise_messages(stage, questions[w.question].query,
                                                            [texts[w.question][i] for i in w.shown],
                                                            answers[w.question]),
                                     self.prompts.selection_cue) for w in windows]  # fmt: skip
        gens = (
            self.generator.generate(prompts, self.prompts.max_selection_tokens, self.listwise_ids)
            if prompts
            else []
        )
        chosen: list[set[int]] = [set() for _ in questions]
        for w, g in zip(windows, gens, strict=True):
            parsed = parse_indices(self.prompts.selection_cue + g.text, len(w.shown))
            status = self._record(stage, parsed, g)
            res = results[w.question]
            for pos, i in enumerate(w.shown, 1):
                entry = {"stage": stage, "window": w.number, "seed": w.seed, "position": pos, **status}
                if parsed.no_bracket:
                    entry["output"] = g.text[:300]
                    res.passages[i].notes.append(
                        f"{stage}: no bracketed index in the output; left unselected"
                    )
                res.passages[i].windows.append(entry)
            chosen[w.question].update(w.shown[k] for k in parsed.indices)
        return chosen

    def _record(self, stage: str, parsed: Parsed, g: Generation) -> dict:
        self.stats.add(stage, "windows")
        status = {}
        for kind, hit in (("no_bracket", parsed.no_bracket), ("truncated", not g.finished),
                          ("out_of_range", parsed.out_of_range), ("duplicates", parsed.duplicates)):  # fmt: skip
            if hit:
                self.stats.add(stage, kind)
                status[kind] = hit if isinstance(hit, bool) else int(hit)
        if not parsed.no_bracket and not parsed.indices:
            self.stats.add(stage, "empty_selection")
        return status

    def _pseudo_answers(self, questions, texts, kept, results) -> None:
        """A short answer per question from the passages RelSel kept (in candidate order, at most
        ``answer_passages``); a question with none kept gets none (nothing to select from after)."""
        todo = [qi for qi, k in enumerate(kept) if k]
        prompts = [self.renderer.ids(self.answer_messages(
            questions[qi].query, [texts[qi][i] for i in sorted(kept[qi])[: self.prompts.answer_passages]]))
            for qi in todo]  # fmt: skip
        gens = self.generator.generate(prompts, self.prompts.max_answer_tokens) if prompts else []
        for qi, g in zip(todo, gens, strict=True):
            answer = g.text.strip()
            self.stats.add("answer", "answers")
            if not g.finished:
                self.stats.add("answer", "truncated")
            if not answer:
                self.stats.add("answer", "empty")
                for r in results[qi].passages:
                    r.notes.append("answer: the pseudo answer is empty")
            entry = {"stage": "answer", "window": 0, **({"truncated": True} if not g.finished else {}),
                     **({"empty": True} if not answer else {})}  # fmt: skip
            for r in results[qi].passages:
                r.windows.append(entry)
            results[qi].pseudo_answer = answer

    def _rank(self, questions, texts, kept, results) -> None:
        """UtilRank over the passages RelSel kept: RankGPT's sliding windows (size ``window``, step half of
        it) in rounds across questions; the top ``top_fraction`` (at least one) are positives."""
        size = self.prompts.window
        order = [sorted(k) for k in kept]
        passes = [sliding_windows(len(o), size, max(1, size // 2)) for o in order]
        for rnd in range(max((len(p) for p in passes), default=0)):
            windows = []
            for qi, p in enumerate(passes):
                if rnd < len(p):
                    sl = p[rnd]
                    seed = window_seed(self.seed, questions[qi].qid, "utilrank", rnd)
                    perm = list(range(len(sl)))
                    np.random.default_rng(seed).shuffle(perm)
                    windows.append((_Window(qi, "utilrank", rnd, seed, [order[qi][sl[j]] for j in perm]), sl))
            prompts = [self.renderer.ids(self.listwise_messages("utilrank", questions[w.question].query,
                                                                [texts[w.question][i] for i in w.shown],
                                                                results[w.question].pseudo_answer),
                                         self.prompts.ranking_cue) for w, _ in windows]  # fmt: skip
            gens = (self.generator.generate(prompts, self.prompts.max_ranking_tokens, self.listwise_ids)
                    if prompts else [])  # fmt: skip
            for (w, sl), g in zip(windows, gens, strict=True):
                parsed = parse_indices(self.prompts.ranking_cue + g.text, len(w.shown))
                status = self._record("utilrank", parsed, g)
                res = results[w.question]
                for pos, i in enumerate(w.shown, 1):
                    entry = {
                        "stage": "utilrank",
                        "window": w.number,
                        "seed": w.seed,
                        "position": pos,
                        **status,
                    }
                    if parsed.no_bracket:
                        entry["output"] = g.text[:300]
                        res.passages[i].notes.append("utilrank: no bracketed index in the output; the window "
                                                     "keeps its previous order")  # fmt: skip
                    res.passages[i].windows.append(entry)
                if parsed.no_bracket:
                    continue
                # the window's slots of the current order, refilled best first; unranked ones keep the
                # previous order among themselves after the ranked ones
                previous = [order[w.question][j] for j in sl]
                ranked = [w.shown[k] for k in parsed.indices]
                rest = [i for i in previous if i not in set(ranked)]
                for j, i in zip(sl, ranked + rest, strict=True):
                    order[w.question][j] = i
        for qi, o in enumerate(order):
            top = top_count(len(o), self.prompts.top_fraction)
            for r, i in enumerate(o, 1):
                results[qi].passages[i].rank = r
                results[qi].passages[i].selected = r <= top

    # ------------------------------------------------------------------------------ answer likelihood

    def _answer_likelihood(self, questions, texts, results) -> None:
        """utility = log P(answer | q, p) - log P(answer | q) per candidate, ranked within the question; the top
        ``likelihood_top_fraction`` (at least one) whose utility exceeds ``min_utility`` are selected."""
        rows: list[tuple[list[int], list[int]]] = []  # (prompt ids, answer ids)
        where: list[tuple[int, int]] = []  # (question, candidate) or (question, -1) for the closed-book row
        for qi, q in enumerate(questions):
            gold = self.answer_source != "pseudo" and bool(q.answer)
            answer = q.answer if gold else results[qi].pseudo_answer
            if not answer or not q.candidates:
                for r in results[qi].passages:
                    r.notes.append("answer-likelihood: no answer to score (no gold answer, and RelSel kept no "
                                   "passage or the pseudo answer is empty)")  # fmt: skip
                continue
            a_ids = self._tok(" " + answer.strip())
            if not a_ids:
                continue
            rows.append((self.renderer.ids(self.closed_book_messages(q.query)), a_ids))
            where.append((qi, -1))
            for ci, text in enumerate(texts[qi]):
                rows.append((self.renderer.ids(self.answer_messages(q.query, [text])), a_ids))
                where.append((qi, ci))
        logp = answer_log_likelihood(self.model, [p for p, _ in rows], [a for _, a in rows], self.pad_id,
                                     self.batch_size, self.max_batch_tokens)  # fmt: skip
        base = {qi: lp for (qi, ci), lp in zip(where, logp, strict=True) if ci == -1}
        for (qi, ci), lp in zip(where, logp, strict=True):
            if ci >= 0:
                results[qi].passages[ci].utility = float(lp - base[qi])
        for res in results:
            scored = [(r.utility, i) for i, r in enumerate(res.passages) if r.utility is not None]
            top = top_count(len(scored), self.likelihood_top_fraction)
            for rank, (u, i) in enumerate(sorted(scored, key=lambda x: (-x[0], x[1])), 1):
                res.passages[i].rank = rank
                res.passages[i].selected = rank <= top and u > self.min_utility
        self.stats.add("answer-likelihood", "pairs", sum(1 for _, ci in where if ci >= 0))

    @property
    def pad_id(self) -> int:
        return self.generator.pad_id


@torch.inference_mode()
def answer_log_likelihood(model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int,
                          batch_size: int = 8, max_batch_tokens: int | None = None,
                          head_chunk: int = 512) -> np.ndarray:  # fmt: skip
    """log P(answer | prompt) for each row, teacher-forced: one forward pass over prompt + answer, the log-softmax
    of the next-token logits at the answer's positions summed over its tokens.

    Only the answer positions go through the LM head (Gemma's head is 262k wide: the whole sequence's logits
    would be most of the memory), with the model's final logit soft-capping when it has one.
    """
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    out = np.zeros(len(prompts), dtype=np.float64)
    seqs = [list(p) + list(a) for p, a in zip(prompts, answers, strict=True)]
    for idx in length_buckets([len(s) for s in seqs], batch_size, max_batch_tokens):
        ids, mask = pad_left([seqs[i] for i in idx], pad_id)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                         position_ids=positions.to(device)).last_hidden_state  # fmt: skip
        width = max(len(answers[i]) for i in idx)
        # left padding: every row ends at the last column, so answer token t of a row of answer length A sits
        # at column -A + t and is predicted by the hidden state one column before it
        # each row's own answer positions only (not rows x width), through the head in chunks: a GPU batch of
        # 200 rows x 48 answer tokens x 262k logits in fp32 is tens of GB
        rows, cols, targets, owner = [], [], [], []
        for r, i in enumerate(idx):
            a = answers[i]
            rows += [r] * len(a)
            cols += [width - len(a) + t for t in range(len(a))]
            targets += list(a)
            owner += [i] * len(a)
        h = hidden[:, -width - 1 : -1, :][
            torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)
        ]
        target = torch.tensor(targets, device=hidden.device)
        logp = np.empty(len(targets), dtype=np.float64)
        for c in range(0, len(targets), head_chunk):
            logits = head(h[c : c + head_chunk]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            picked = logits.gather(1, target[c : c + head_chunk, None]).squeeze(1) - torch.logsumexp(
                logits, dim=-1
            )
            logp[c : c + head_chunk] = picked.double().cpu().numpy()
        np.add.at(out, np.asarray(owner, dtype=np.int64), logp)
    return out
