"""Tokens, lemmas, stopwords, concept bank, vocabulary, WordNet antonym pairs, pair files and matrices.

Needs the WordNet database (``make wordnet``); ``nltk.corpus.wordnet`` (the NLTK download) is not used.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import nltk
import numpy as np
import pytest

from ulrl import wordnet
from ulrl.concepts import (
    STOPWORDS,
    PairFileError,
    UnknownConceptError,
    build_concept_bank,
    build_vocab,
    caption_concepts,
    clean_str,
    concept_words,
    contradiction_matrix,
    cooccurrence_matrix,
    encode_tokens,
    index_of,
    read_pair_file,
    tokenize,
    video_labels,
    wordnet_antonym_pairs,
    write_pair_file,
)
from ulrl.wordnet import (
    LEXNAMES,
    WordNetMissingError,
    antonym_names,
    find_wordnet_dir,
    lemmatize,
    lexnames_text,
    wordnet_reader,
)

ATTRIBUTE_WORDS = (
    "left right up down over under above below big small large tiny fast slow quick "
    "black white dark light day night"
).split()

ACCEPTANCE_CAPTIONS = [
    "a man walks left in the day",
    "a woman runs right at night",
    "the ball goes up",
    "it falls down",
    "a fast car",
    "a slow turtle",
    "a big dog",
    "a small cat",
    "black cat",
    "white dog",
] * 5


# --- tokens, lemmas, stopwords -------------------------------------------------------------------------


def test_clean_str_lowercases_and_spaces_out_non_alphanumerics():
    assert clean_str("A man's DOG-walking,  2x!") == "a man s dog walking 2x"
    assert tokenize("  Hello,\tWORLD-42 ") == ["hello", "world", "42"]
    assert tokenize("?!") == []


@pytest.mark.parametrize(
    "word, lemma",
    [
        ("moving", "move"),
        ("moves", "move"),
        ("walks", "walk"),
        ("running", "run"),
        ("ran", "run"),
        ("dancing", "dance"),
        ("digits", "digit"),
        ("men", "man"),
        ("bigger", "big"),
        ("smaller", "small"),
        ("faster", "fast"),
    ],
)
def test_lemmatize_inflections(word, lemma):
    assert lemmatize(word) == lemma


@pytest.mark.parametrize("word", [*ATTRIBUTE_WORDS, "evening", "training", "morning", "digit", "zzzq", "7"])
def test_lemmatize_keeps_attribute_words_and_nouns_that_look_like_verbs(word):
    # "left" must not become "leave", "evening" not "even": the POS guess keeps their own reading.
    assert lemmatize(word) == word


def test_attribute_words_are_not_stopwords_but_function_words_and_filler_are():
    assert not STOPWORDS & set(ATTRIBUTE_WORDS)
    assert {"the", "a", "is", "of", "in", "someone", "something", "kind", "type", "don", "t"} <= STOPWORDS
    assert "one" not in STOPWORDS  # a digit name


def test_concept_words_drop_stopwords_and_lemmatise():
    text = "Someone is MOVING left over the big digits; it's a kind of dance"
    assert concept_words(text) == ["move", "left", "over", "big", "digit", "dance"]


# --- concept bank, labels, vocabulary ------------------------------------------------------------------


def test_concept_bank_threshold_and_order():
    captions = ["a dog runs", "dogs run fast", "the cat", "a cat and a dog", "cats run"]
    # lemma counts: dog 3, run 3, cat 3, fast 1
    assert build_concept_bank(captions, min_freq=3) == ["cat", "dog", "run"]
    assert build_concept_bank(captions, min_freq=1) == ["cat", "dog", "run", "fast"]
    assert build_concept_bank(captions, min_freq=4) == []
    shuffled = captions[:]
    random.Random(0).shuffle(shuffled)
    assert build_concept_bank(shuffled, min_freq=1) == build_concept_bank(captions, min_freq=1)


def test_concept_bank_orders_by_frequency_first():
    captions = ["zebra"] * 3 + ["apple"] * 2 + ["mango"] * 2
    assert build_concept_bank(captions, min_freq=2) == ["zebra", "apple", "mango"]


def test_caption_concepts_and_video_labels():
    bank = ["dog", "run", "left", "cat"]
    bank_index = index_of(bank)
    assert caption_concepts("Two dogs run left, a dog runs", bank_index) == [0, 1, 2]
    assert caption_concepts("nothing here", bank_index) == []
    assert video_labels([[2, 0], [], [3, 0]]) == [0, 2, 3]
    assert video_labels([]) == []


def test_build_vocab_and_encode_tokens():
    captions = ["the dog runs", "The dog walks", "a dog"]
    vocab = build_vocab(captions, min_freq=2)
    assert vocab == ["<pad>", "<unk>", "dog", "the"]  # dog 3, the 2; raw tokens, not lemmas
    vocab_index = index_of(vocab)
    assert encode_tokens("The dog RUNS!", vocab_index) == [3, 2, 1]
    assert encode_tokens("the dog the dog", vocab_index, max_len=3) == [3, 2, 3]
    assert encode_tokens("", vocab_index) == []


# --- WordNet ---------------------------------------------------------------------------------------------


def test_lexnames_table_matches_the_wordnet_format():
    rows = [line.split("\t") for line in lexnames_text().splitlines()]
    assert len(rows) == len(LEXNAMES) == 45
    assert [row[0] for row in rows] == [f"{i:02d}" for i in range(45)]
    assert rows[0] == ["00", "adj.all", "3"] and rows[3] == ["03", "noun.Tops", "1"]
    assert rows[43] == ["43", "verb.weather", "2"] and rows[44] == ["44", "adj.ppl", "3"]
    assert {row[2] for row in rows if row[1].startswith("adv.")} == {"4"}


@pytest.mark.parametrize(
    "synset, lexname",
    [
        ("entity.n.01", "noun.Tops"),
        ("dog.n.01", "noun.animal"),
        ("tree.n.01", "noun.plant"),
        ("circle.n.01", "noun.shape"),
        ("illness.n.01", "noun.state"),
        ("day.n.04", "noun.time"),
        ("eat.v.01", "verb.consumption"),
        ("run.v.01", "verb.motion"),
        ("rain.v.01", "verb.weather"),
        ("big.a.01", "adj.all"),
        ("quickly.r.01", "adv.all"),
    ],
)
def test_reader_maps_synsets_to_their_lexicographer_files(synset, lexname):
    assert wordnet_reader().synset(synset).lexname() == lexname
    assert wordnet_reader() is wordnet_reader()  # cached


def test_wordnet_dir_override_must_be_complete(tmp_path, monkeypatch):
    (tmp_path / "data.noun").write_text("")
    monkeypatch.setenv("ULRL_WORDNET_DIR", str(tmp_path))
    with pytest.raises(WordNetMissingError, match="apt-get install wordnet-base.*data.adj|data.adj.*apt-get"):
        find_wordnet_dir()


def test_missing_wordnet_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.delenv("ULRL_WORDNET_DIR", raising=False)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(wordnet, "SYSTEM_DIRS", (str(tmp_path / "absent"),))
    with pytest.raises(WordNetMissingError) as error:
        find_wordnet_dir()
    message = str(error.value)
    assert "\n" not in message
    assert "apt-get install wordnet-base wordnet-sense-index" in message and "make wordnet" in message


def test_symlinked_wordnet_dir_works_without_nltk_corpus_wordnet(tmp_path):
    """A fresh process reads WordNet via a folder of symlinks while ``nltk.corpus.wordnet`` is poisoned."""
    real = Path(str(find_wordnet_dir()))
    if not real.is_dir():
        pytest.skip("WordNet comes from a zipped NLTK corpus here, not a folder to link to")
    for name in os.listdir(real):
        (tmp_path / name).symlink_to(real / name)
    script = textwrap.dedent(
        """
        import nltk.corpus

        class Poisoned:
            def __getattr__(self, name):
                raise AssertionError("nltk.corpus.wordnet was used")

        nltk.corpus.wordnet = Poisoned()
        from ulrl.concepts import wordnet_antonym_pairs
        from ulrl.wordnet import lemmatize
        assert lemmatize("moving") == "move" and lemmatize("left") == "left"
        assert ("up", "down") in wordnet_antonym_pairs(["up", "down"])
        print("ok")
        """
    )
    env = {**os.environ, "ULRL_WORDNET_DIR": str(tmp_path)}
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# --- contradiction pairs -------------------------------------------------------------------------------


def test_acceptance_pairs_from_captions():
    bank = build_concept_bank(ACCEPTANCE_CAPTIONS, min_freq=5)
    assert {"left", "right", "up", "down", "fast", "slow", "big", "small", "day", "night"} <= set(bank)
    pairs = wordnet_antonym_pairs(bank)
    for a, b in [("left", "right"), ("up", "down"), ("fast", "slow"), ("big", "small"), ("day", "night"),
                 ("black", "white")]:  # fmt: skip
        assert (a, b) in pairs and (b, a) in pairs
    assert pairs == sorted(set(pairs))
    assert all(a != b for a, b in pairs)
    assert all((b, a) in pairs for a, b in pairs)
    assert not {("walk", "run"), ("cat", "dog")} & set(pairs)


def test_large_small_and_only_bank_members():
    pairs = wordnet_antonym_pairs(["small", "large", "dog"])
    assert pairs == [("large", "small"), ("small", "large")]
    assert wordnet_antonym_pairs(["big"]) == []  # "small" is an antonym, but not a concept


def _naive_pairs(bank):
    """Oracle: the paper's loop, written out with the reader directly."""
    reader = wordnet_reader()
    found = set()
    for concept in bank:
        for synset in reader.synsets(concept):
            for lemma in synset.lemmas():
                for antonym in lemma.antonyms():
                    for name in antonym.synset().lemma_names():
                        if name in bank and name != concept:
                            found |= {(concept, name), (name, concept)}
    return sorted(found)


def test_antonym_pairs_match_a_naive_oracle():
    bank = "left right leave arrive come go open close stand sit man woman light dark heavy wrong".split()
    assert wordnet_antonym_pairs(bank) == _naive_pairs(bank)
    assert ("left", "arrive") in _naive_pairs(bank)  # synsets() morphs "left" to "leave", as in the paper


def test_indirect_antonyms_only_for_words_without_direct_ones():
    bank = ["tiny", "large", "big", "small", "light"]
    assert ("tiny", "large") not in wordnet_antonym_pairs(bank)
    pairs = wordnet_antonym_pairs(bank, indirect=True)
    assert {("tiny", "large"), ("tiny", "big"), ("large", "tiny")} <= set(pairs)
    assert ("big", "light") not in pairs  # big has direct antonyms, so no satellite-chain noise
    assert antonym_names("quick") == set() and "slow" in antonym_names("quick", indirect=True)


# --- pair files and matrices ---------------------------------------------------------------------------


def test_read_pair_file_skips_blank_and_commented_lines(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("up<->down\n\n// curated out\nleft<->right, up\nbig<->small // x<->y\nleft<->right\n")
    assert read_pair_file(path, ["up", "down", "left", "right"]) == [
        ("left", "right"), ("left", "up"), ("up", "down")
    ]  # fmt: skip


def test_read_pair_file_unknown_concept_names_file_line_and_concept(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("up<->down\n\nleft<->right,sideways\n")
    with pytest.raises(UnknownConceptError, match=r"pairs\.txt:3: concept 'sideways'"):
        read_pair_file(path, ["up", "down", "left", "right"])


@pytest.mark.parametrize("line", ["up down", "<->down", "up<->", "up<->up"])
def test_read_pair_file_malformed_line(tmp_path, line):
    path = tmp_path / "bad.txt"
    path.write_text(f"{line}\n")
    with pytest.raises(PairFileError, match=r"bad\.txt:1"):
        read_pair_file(path, ["up", "down"])


def test_write_pair_file_round_trip(tmp_path):
    pairs = [("up", "down"), ("down", "up"), ("left", "right"), ("left", "up")]
    path = tmp_path / "pairs.txt"
    path.write_text("old content\n")
    write_pair_file(path, pairs)
    assert path.read_text() == "down<->up\nleft<->right,up\nup<->down\n"
    assert read_pair_file(path, ["up", "down", "left", "right"]) == sorted(pairs)
    assert os.listdir(tmp_path) == ["pairs.txt"]  # no temporary file left behind


def test_contradiction_matrix_is_directed_zero_one():
    bank = ["up", "down", "left", "right"]
    matrix = contradiction_matrix([("up", "down"), ("down", "up"), ("left", "right")], bank)
    expected = np.zeros((4, 4), dtype=np.float32)
    expected[0, 1] = expected[1, 0] = expected[2, 3] = 1.0
    assert matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix, expected)
    with pytest.raises(UnknownConceptError, match="'sideways'"):
        contradiction_matrix([("up", "sideways")], bank)


def test_cooccurrence_matrix_matches_naive_oracle():
    label_lists = [[0, 2], [1], [], [2, 3, 0], [4]]
    matrix = cooccurrence_matrix(label_lists, 6)
    expected = np.zeros((6, 6), dtype=bool)
    for labels in label_lists:
        for i, j in itertools.product(labels, labels):
            expected[i, j] = True
    assert matrix.dtype == bool
    np.testing.assert_array_equal(matrix, expected)
    assert not matrix[5].any() and not matrix[1, 0]


def test_cooccurrence_matrix_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="label list 1"):
        cooccurrence_matrix([[0], [0, 3]], 3)
