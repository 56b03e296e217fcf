"""WordNet 3.0 read through NLTK from the Debian package (or NLTK data), lemmatisation and antonyms.

Debian's ``wordnet-base`` installs the database under ``/usr/share/wordnet`` (``data.*``, ``index.*``,
``*.exc``, ``cntlist.rev``) but not the ``lexnames`` file that NLTK's :class:`WordNetCorpusReader` reads
first. Rather than copying 36 MB into a cache folder, :class:`_WordNetReader` serves ``lexnames`` from the
fixed table of lexnames(5WN) (:data:`LEXNAMES`) and reads every other file in place.
``nltk.corpus.wordnet`` (the downloadable corpus) is never used: NLTK's ``WordNetLemmatizer`` is bound to
it, so :func:`lemmatize` applies the same rule (shortest ``_morphy`` lemma) to our reader.

Search order (:func:`find_wordnet_dir`): ``$ULRL_WORDNET_DIR``, then ``corpora/wordnet`` in the NLTK data
path, then ``/usr/share/wordnet``. The reader is built once per process (``lru_cache``); NLTK readers keep
shared file handles, so use it from one thread.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from pathlib import Path

import nltk
from nltk.corpus.reader.wordnet import ADJ, ADJ_SAT, ADV, NOUN, VERB, WordNetCorpusReader

SYSTEM_DIRS: tuple[str, ...] = ("/usr/share/wordnet",)
"""Where distribution packages install the WordNet database (Debian/Ubuntu ``wordnet-base``)."""

REQUIRED_FILES: tuple[str, ...] = tuple(
    [f"{kind}.{pos}" for kind in ("data", "index") for pos in ("adj", "adv", "noun", "verb")]
    + [f"{pos}.exc" for pos in ("adj", "adv", "noun", "verb")]
    + ["cntlist.rev"]
)
"""Files a WordNet directory must hold (``cntlist.rev`` gives the sense counts used by :func:`lemmatize`)."""

INSTALL_HINT = "apt-get install wordnet-base wordnet-sense-index (or `make wordnet`), or set ULRL_WORDNET_DIR"

# The 45 lexicographer files of WordNet 3.0, numbered 00-44 in this order (lexnames(5WN)).
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip
_SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

# Regular verb inflections: only words of this shape may trade a noun/adjective reading for a verb lemma.
_VERB_SUFFIXES = ("ing", "ed", "s")


class WordNetMissingError(RuntimeError):
    """No usable WordNet database was found; the message says how to install one."""


def lexnames_text() -> str:
    """The ``lexnames`` file: ``NN<TAB>name<TAB>category`` per line, category 1-4 = noun/verb/adj/adv."""
    rows = (f"{i:02d}\t{name}\t{_SYNTACTIC_CATEGORY[name.split('.')[0]]}" for i, name in enumerate(LEXNAMES))
    return "\n".join(rows) + "\n"


class _WordNetReader(WordNetCorpusReader):
    """NLTK's reader with ``lexnames`` served from :data:`LEXNAMES` and no cross-version synset map."""

    def open(self, file):
        if file == "lexnames":
            return io.StringIO(lexnames_text())
        return super().open(file)

    def map_wn(self, version="wordnet"):
        # The base class maps synset ids from NLTK's downloadable "wordnet" corpus onto this one; that needs
        # the download, and the Debian database *is* WordNet 3.0, the version NLTK's corpus holds.
        return None


def _missing_files(folder: Path) -> list[str]:
    return [name for name in REQUIRED_FILES if not (folder / name).is_file()]


def _nltk_wordnet():
    """``corpora/wordnet`` (folder or zip) in NLTK's data path, or None."""
    try:
        return nltk.data.find("corpora/wordnet")
    except LookupError:
        return None


def find_wordnet_dir():
    """The WordNet root to read: a :class:`~pathlib.Path`, or an NLTK path pointer for NLTK data.

    ``$ULRL_WORDNET_DIR`` wins and must be complete (a wrong setting is an error, not a silent fallback).
    """
    override = os.environ.get("ULRL_WORDNET_DIR")
    if override:
        missing = _missing_files(Path(override))
        if missing:
            message = f"ULRL_WORDNET_DIR={override} lacks {', '.join(missing)}: {INSTALL_HINT}"
            raise WordNetMissingError(message)
        return Path(override)
    found = _nltk_wordnet()
    if found is not None:
        return found
    for folder in map(Path, SYSTEM_DIRS):
        if not _missing_files(folder):
            return folder
    raise WordNetMissingError(f"WordNet not found (NLTK data path, {', '.join(SYSTEM_DIRS)}): {INSTALL_HINT}")


def _real_root(folder: Path) -> Path:
    """The one folder the database files really live in (a folder of symlinks resolves to its target)."""
    parents = {(folder / name).resolve().parent for name in REQUIRED_FILES}
    if len(parents) != 1:
        message = f"{folder}: WordNet files must resolve into one folder, not {sorted(map(str, parents))}"
        raise WordNetMissingError(message)
    return parents.pop()


def _authorise(root: Path) -> None:
    # NLTK >= 3.9 refuses to open corpus files outside its data path, and confines a reader to its root
    # after resolving symlinks; adding the real folder is NLTK's documented opt-in
    # ("Authorize via: nltk.data.path.append(...)").
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))


@functools.lru_cache(maxsize=None)
def wordnet_reader() -> WordNetCorpusReader:
    """The process-wide WordNet reader (about a second to build); raises :class:`WordNetMissingError`."""
    root = find_wordnet_dir()
    if isinstance(root, Path):
        root = _real_root(root)
        _authorise(root)
        root = str(root)
    with warnings.catch_warnings():
        # "multilingual functions are not available": we never ask for Open Multilingual WordNet.
        warnings.simplefilter("ignore", UserWarning)
        return _WordNetReader(root, None)


def _shortest(word: str, lemmas: list[str]) -> str | None:
    """NLTK's pick (the shortest candidate); a tie goes to the one that differs from ``word`` (men -> man)."""
    return min(lemmas, key=lambda lemma: (len(lemma), lemma == word)) if lemmas else None


def _sense_count(reader: WordNetCorpusReader, word: str, pos: str) -> int:
    """SemCor tag count of ``word`` as a lemma (exact name) of part of speech ``pos``."""
    return sum(lemma.count() for lemma in reader.lemmas(word, pos))


def _is_base_form(reader: WordNetCorpusReader, word: str) -> bool:
    """``word`` is itself a noun, adjective or adverb lemma (``left``, ``glasses``, ``evening``)."""
    return any(reader.lemmas(word, pos) for pos in (NOUN, ADJ, ADV))


def _prefers_verb(reader: WordNetCorpusReader, word: str, verb: str) -> bool:
    """Whether ``word`` reads as an inflection of ``verb`` rather than as a noun/adjective of its own."""
    if not _is_base_form(reader, word):
        return True  # walks, moves, ran, went: no other reading
    if not word.endswith(_VERB_SUFFIXES):
        return False  # left, felt, found, saw: irregular forms that are words in their own right
    own = max(_sense_count(reader, word, pos) for pos in (NOUN, ADJ, ADV))
    return _sense_count(reader, verb, VERB) >= own  # dancing -> dance, but evening and training stay


@functools.lru_cache(maxsize=None)
def lemmatize(word: str) -> str:
    """Lemma of a lowercase token, with a part-of-speech guess that needs no tagger data.

    ``nltk.pos_tag`` needs a downloaded model, and a concept bank that changed with what is installed
    would not be reproducible, so the guess is always this rule. Each step takes NLTK's
    ``WordNetLemmatizer`` choice for its POS (the shortest ``_morphy`` candidate), as IITV does after
    ``pos_tag``:

    1. verb, when the verb lemma differs from the word and either the word is no noun/adjective/adverb
       lemma (``walks``, ``moves``, ``ran``) or it has a regular ``-ing``/``-ed``/``-s`` shape and the verb's
       SemCor count is at least the word's own (``moving``, ``dancing``; not ``evening``, ``training``,
       and never the irregular ``left`` -> ``leave``);
    2. noun, when the word has a noun reading (``digits`` -> ``digit``, ``men`` -> ``man``, ``left``);
    3. adjective/adverb (``bigger`` -> ``big``, ``faster`` -> ``fast``); else the word itself.
    """
    reader = wordnet_reader()
    verb = _shortest(word, reader._morphy(word, VERB))
    if verb and verb != word and _prefers_verb(reader, word, verb):
        return verb
    noun = _shortest(word, reader._morphy(word, NOUN))
    if noun:
        return noun
    return _shortest(word, reader._morphy(word, ADJ) + reader._morphy(word, ADV)) or word


def _antonym_names(synsets) -> set[str]:
    """All lemma names of the synset of every antonym of every lemma of ``synsets``."""
    return {
        name.lower()
        for synset in synsets
        for lemma in synset.lemmas()
        for antonym in lemma.antonyms()
        for name in antonym.synset().lemma_names()
    }


def antonym_names(word: str, indirect: bool = False) -> set[str]:
    """WordNet antonyms of ``word`` as in ITV's ``getAntonyms_Stanford_ACL2018_wordnet``.

    For every synset of ``word`` (``synsets`` applies morphy, so ``left`` also reaches ``leave``), every
    lemma with antonyms contributes all lemma names of the antonym's synset. ``indirect`` adds WordNet's
    indirect-antonym rule for words with no direct antonym at all: an adjective satellite (``tiny``)
    borrows the antonyms of its head adjectives (``similar_tos``: ``small`` -> ``large``, ``big``). The
    paper uses direct antonyms only; the rule is limited to antonym-less words because a polysemous word
    like ``big`` would otherwise pick up ``light`` (via ``heavy``) and ``stingy`` (via ``generous``).
    """
    synsets = wordnet_reader().synsets(word)
    names = _antonym_names(synsets)
    if indirect and not names:
        heads = [head for synset in synsets if synset.pos() == ADJ_SAT for head in synset.similar_tos()]
        names = _antonym_names(heads)
    return names
