"""Self-instruct's ROUGE-L dedup: the pool of seed and kept instructions, scored in parallel worker processes.
Kept free of torch/transformers/trl imports, so that a spawned scoring worker starts in a fraction of a second."""

import re
import unicodedata
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from rouge_score import rouge_scorer


def _is_cjk(char: str) -> bool:
    return unicodedata.east_asian_width(char) in ("W", "F")


class RougeTokenizer:
    """Lower-cased alphanumeric words, as rouge-score's default tokenizer splits ASCII text (which drops every
    non-ASCII letter: Chinese text would have no tokens at all); letters of other scripts are kept, and each CJK
    character is its own token, as words are not spaced there."""

    _WORD_RE = re.compile(r"[^\W_]+")

    def tokenize(self, text: str) -> list[str]:
        tokens = []
        for word in self._WORD_RE.findall(text.lower()):
            if word.isascii() or not any(_is_cjk(char) for char in word):
                tokens.append(word)
            else:
                run = ""
                for char in word:
                    if _is_cjk(char):
                        tokens += [run, char] if run else [char]
                        run = ""
                    else:
                        run += char
                if run:
                    tokens.append(run)
        return tokens


def new_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=RougeTokenizer())


def _best_matches(candidates: list[str], pool: list[str], offset: int) -> list[tuple[float, int]]:
    """Each candidate's highest ROUGE-L F-measure against `pool` and the pool index (+ offset) it was reached at."""
    scorer = new_scorer()
    best = []
    for candidate in candidates:
        score, index = -1.0, -1
        for position, text in enumerate(pool):
            value = scorer.score(text, candidate)["rougeL"].fmeasure
            if value > score:
                score, index = value, position + offset
        best.append((max(score, 0.0), index))
    return best


class RougeDeduplicator:
    """The pool of seed and kept instructions. A candidate is kept when its ROUGE-L F-measure against every pool
    instruction is at most `threshold`, and joins the pool at once, so that the next candidate, of the same batch
    too, is compared with it. Scoring against the pool runs in `num_workers` processes once a batch is large enough
    to pay for them (Alpaca's pool grows to 52K instructions); the candidates of one batch are then compared with
    each other in order."""

    def __init__(self, pool: list[str], threshold: float, num_workers: int = 1, min_pairs_per_worker: int = 20_000):
        self.pool = list(pool)
        self.threshold = threshold
        self.num_workers = max(1, num_workers)
        self.min_pairs_per_worker = min_pairs_per_worker
        self._scorer = new_scorer()
        self._executor = None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def _best_against_pool(self, candidates: list[str]) -> list[tuple[float, int]]:
        workers = min(self.num_workers, len(candidates) * len(self.pool) // self.min_pairs_per_worker)
        if workers <= 1:
            return _best_matches(candidates, self.pool, 0)
        if self._executor is None:
            # spawn, not fork: a forked copy of a process that holds torch's thread pools can hang
            self._executor = ProcessPoolExecutor(self.num_workers, mp_context=get_context("spawn"))
        size = -(-len(self.pool) // workers)
        chunks = [(candidates, self.pool[start:start + size], start) for start in range(0, len(self.pool), size)]
        results = list(self._executor.map(_best_matches, *zip(*chunks)))
        # the first best match, as serial scoring finds it
        return [max(per_chunk, key=lambda match: (match[0], -match[1])) for per_chunk in zip(*results)]

    def admit(self, candidates: list[str]) -> list[tuple[bool, float, str]]:
        """For each candidate in order: kept or not, its highest ROUGE-L against the pool, the instruction that
        score was reached at. Kept candidates are added to the pool."""
        if not candidates:
            return []
        pool_size = len(self.pool)
        decisions = []
        for candidate, (score, index) in zip(candidates, self._best_against_pool(candidates)):
            for position in range(pool_size, len(self.pool)):  # kept earlier in this batch
                value = self._scorer.score(self.pool[position], candidate)["rougeL"].fmeasure
                if value > score:
                    score, index = value, position
            nearest = self.pool[index] if index >= 0 else ""
            kept = score <= self.threshold
            if kept:
                self.pool.append(candidate)
            decisions.append((kept, score, nearest))
        return decisions
