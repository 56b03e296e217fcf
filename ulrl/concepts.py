"""Caption text -> word vocabulary, concept bank, video-level labels and contradicting concept pairs.

Pipeline (paper Sec. 2.1, ITV ``build_concept.py`` / IITV ``build_concept_phrase.py``):

* tokens: ``clean_str`` (lowercase, every non-alphanumeric character becomes a space), split on spaces;
* word vocabulary: raw tokens with frequency >= ``vocab_min_freq``; index 0 = ``<pad>``, 1 = ``<unk>``;
* concepts: tokens that are not stopwords, lemmatised (:func:`ulrl.wordnet.lemmatize`, all parts of
  speech as IITV does; ITV lemmatised verbs only), kept when the lemma occurs >= ``concept_min_freq``;
* labels: a video's concept set is the union over its captions (every caption trains on it);
* contradictions: WordNet antonyms inside the bank, plus optional ``concept<->a,b`` pair files.

Stopwords are a constant here (NLTK's stopword corpus is a separate download): NLTK's English list
without the apostrophe forms (``clean_str`` splits them), plus caption filler (someone, something, kind,
type, ...; not "one", a digit name). The antonym-bearing positional words up/down, over/under and
above/below are deliberately *not* stopwords although NLTK lists them: they are the contradicting pairs
the unlikelihood loss needs.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ulrl.wordnet import antonym_names, lemmatize

PAD, UNK = "<pad>", "<unk>"

_NLTK_STOPWORDS = """
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers
herself it its itself they them their theirs themselves what which who whom this that these those am is
are was were be been being have has had having do does did doing a an the and but if or because as until
while of at by for with about against between into through during before after to from in out on off
again further then once here there when where why how all any both each few more most other some such no
nor not only own same so than too very s t can will just don should now d ll m o re ve y ain aren couldn
didn doesn hadn hasn haven isn ma mightn mustn needn shan shouldn wasn weren won wouldn
"""
_CAPTION_FILLER = """
someone somebody something anyone anybody anything everyone everybody everything nobody nothing
kind kinds sort sorts type types include includes including try tries trying also another else either
neither may might must would could shall us let lot lots many much thing things
"""
STOPWORDS: frozenset[str] = frozenset((_NLTK_STOPWORDS + _CAPTION_FILLER).split())
"""Tokens never turned into concepts (the word vocabulary keeps them)."""

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


class PairFileError(ValueError):
    """A malformed contradiction pair file; the message names the file and line."""


class UnknownConceptError(PairFileError):
    """A pair names a concept that is not in the concept bank."""


def clean_str(text: str) -> str:
    """Lowercase ``text`` and turn every run of non-alphanumeric characters into one space."""
    return _NON_ALNUM.sub(" ", text.lower()).strip()


def tokenize(text: str) -> list[str]:
    """Raw caption tokens: ``clean_str(text).split()``."""
    return clean_str(text).split()


def concept_words(text: str) -> list[str]:
    """A caption's concept candidates in order: non-stopword tokens, lemmatised, lemma not a stopword."""
    lemmas = (lemmatize(token) for token in tokenize(text) if token not in STOPWORDS)
    return [lemma for lemma in lemmas if lemma not in STOPWORDS]


def index_of(items: Sequence[str]) -> dict[str, int]:
    """``{item: position}`` for a vocabulary or concept bank."""
    return {item: i for i, item in enumerate(items)}


def _frequent(counts: Counter, min_freq: int) -> list[str]:
    """Items with count >= ``min_freq``, most frequent first, ties alphabetical (deterministic)."""
    kept = [(-count, item) for item, count in counts.items() if count >= min_freq]
    return [item for _, item in sorted(kept)]


def build_concept_bank(captions: Iterable[str], min_freq: int = 5) -> list[str]:
    """Concepts: lemmas of :func:`concept_words` with corpus frequency >= ``min_freq`` (paper: 5).

    Sorted by frequency (descending), then alphabetically.
    """
    counts = Counter(word for caption in captions for word in concept_words(caption))
    return _frequent(counts, min_freq)


def caption_concepts(text: str, bank_index: Mapping[str, int]) -> list[int]:
    """Sorted, unique bank indices of the concepts a caption mentions."""
    return sorted({bank_index[word] for word in concept_words(text) if word in bank_index})


def video_labels(caption_concept_lists: Iterable[Iterable[int]]) -> list[int]:
    """A video's labels: the sorted union of its captions' concept indices."""
    return sorted({index for concepts in caption_concept_lists for index in concepts})


def build_vocab(captions: Iterable[str], min_freq: int = 5) -> list[str]:
    """Word vocabulary over raw tokens (stopwords included, no lemmas): ``[<pad>, <unk>, frequent...]``."""
    counts = Counter(token for caption in captions for token in tokenize(caption))
    return [PAD, UNK, *_frequent(counts, min_freq)]


def encode_tokens(text: str, vocab_index: Mapping[str, int], max_len: int | None = None) -> list[int]:
    """Token ids of a caption, unknown words -> 1, cut to ``max_len`` tokens (no padding)."""
    unk = vocab_index[UNK]
    ids = [vocab_index.get(token, unk) for token in tokenize(text)]
    return ids if max_len is None else ids[:max_len]


def wordnet_antonym_pairs(bank: Sequence[str], indirect: bool = False) -> list[tuple[str, str]]:
    """Contradicting concept pairs ``(a, b)`` from WordNet antonyms, both within ``bank``.

    For each concept, :func:`ulrl.wordnet.antonym_names` (ITV's rule; ``indirect`` adds satellite-head
    antonyms for antonym-less words); kept only when the antonym is a concept too. The result is
    symmetric (``(a, b)`` implies ``(b, a)``), has no self pairs and is sorted.
    """
    known = set(bank)
    pairs = set()
    for concept in bank:
        for antonym in antonym_names(concept, indirect) & (known - {concept}):
            pairs |= {(concept, antonym), (antonym, concept)}
    return sorted(pairs)


def _parse_pair_line(line: str, where: str) -> tuple[str, list[str]]:
    """``concept<->a,b`` -> ``("concept", ["a", "b"])``; anything else is a :class:`PairFileError`."""
    head, sep, tail = line.partition("<->")
    concept, antonyms = head.strip(), [name.strip() for name in tail.split(",") if name.strip()]
    if not sep or not concept or not antonyms:
        raise PairFileError(f"{where}: expected 'concept<->a,b', got {line!r}")
    if concept in antonyms:
        raise PairFileError(f"{where}: {concept!r} is listed as contradicting itself")
    return concept, antonyms


def read_pair_file(path: str | os.PathLike, bank: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs from a ``concept<->a,b`` file (the paper's format) as written: ``(concept, a), (concept, b)``.

    Blank lines and lines containing ``//`` (manual curation) are skipped. Pairs are directed, deduplicated
    and sorted; a concept outside ``bank`` raises :class:`UnknownConceptError` naming file, line and concept.
    """
    known, pairs = set(bank), set()
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or "//" in line:
            continue
        where = f"{path}:{number}"
        concept, antonyms = _parse_pair_line(line, where)
        for name in (concept, *antonyms):
            if name not in known:
                raise UnknownConceptError(f"{where}: concept {name!r} is not in the concept bank")
        pairs.update((concept, antonym) for antonym in antonyms)
    return sorted(pairs)


def write_pair_file(path: str | os.PathLike, pairs: Iterable[tuple[str, str]]) -> None:
    """Write pairs as ``concept<->a,b`` lines (sorted), atomically: a reader never sees half a file."""
    grouped: dict[str, set[str]] = defaultdict(set)
    for concept, antonym in pairs:
        grouped[concept].add(antonym)
    text = "".join(f"{concept}<->{','.join(sorted(grouped[concept]))}\n" for concept in sorted(grouped))
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def contradiction_matrix(pairs: Iterable[tuple[str, str]], bank: Sequence[str]) -> np.ndarray:
    """C (K, K) float32 with C[a, b] = 1 iff ``(a, b)`` is a pair: b contradicts a (paper Sec. 3.3)."""
    bank_index = index_of(bank)
    matrix = np.zeros((len(bank), len(bank)), dtype=np.float32)  # (K, K)
    for concept, antonym in pairs:
        for name in (concept, antonym):
            if name not in bank_index:
                message = f"pair ({concept!r}, {antonym!r}): {name!r} is not in the concept bank"
                raise UnknownConceptError(message)
        matrix[bank_index[concept], bank_index[antonym]] = 1.0
    return matrix


def cooccurrence_matrix(label_lists: Iterable[Sequence[int]], num_concepts: int) -> np.ndarray:
    """O (K, K) bool: O[i, j] iff concepts i and j label one video together (O[i, i]: i labels any video).

    Built from training videos for "exclusive" negative sampling (concepts never seen with a positive).
    """
    matrix = np.zeros((num_concepts, num_concepts), dtype=bool)  # (K, K)
    for row, labels in enumerate(label_lists):
        labels = np.asarray(labels, dtype=np.int64)  # (L,)
        if labels.size and (labels.min() < 0 or labels.max() >= num_concepts):
            raise ValueError(f"label list {row}: concept index outside [0, {num_concepts})")
        matrix[np.ix_(labels, labels)] = True
    return matrix
