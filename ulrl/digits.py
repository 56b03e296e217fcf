"""The moving-digits benchmark: short videos of real handwritten digits, sparsely captioned.

A video shows one or two of scikit-learn's 8×8 ``load_digits`` images (upscaled ×2 when ``big``) moving
with wrap-around on a ``canvas``×``canvas`` frame for ``min_frames..max_frames`` frames. Its ground truth is
one value per attribute family, each value with a WordNet antonym in the same family — direction
(left/right/upward/downward), speed (slow 1 px/frame, fast 3 px/frame), size (small 8 px, big 16 px),
background (black, white = inverted canvas), count (single, multiple) — plus the digits' names (zero..nine).
Train, val and test draw from disjoint digit images, so test videos are not memorisable.

Captions mention each true attribute with probability ``mention_prob`` (at least one), through synonyms
(``ATTRIBUTE_WORDS``), and carry filler drawn from ~350 scene/style words unrelated to the attributes, so the
frequency-thresholded concept bank holds hundreds of concepts of which few are attributes — the regime where
unlikelihood training matters (research/calibration.md). Filler words never use an attribute word, and no
filler word is a WordNet antonym of an attribute word (nor of "moving": no "still"/"stay"); among themselves a
few are, as in real captions: thick/thin, smooth/rough, familiar/strange, fancy/plain.

Frame features come from a fixed random CNN (seeded, :class:`FrameFeaturizer`): two conv layers, a 4×4-grid
average (position, so motion shows across frames) and a global max (identity under translation), a fixed random
projection to ``feature_dim``, standardised with the statistics of a seeded calibration set.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from ulrl.config import DigitsConfig
from ulrl.raw import RawSplit, VideoChunk

SPLITS = ("train", "val", "test")
POOL_FRACTIONS = (0.7, 0.1, 0.2)
"""Share of each digit class's images reserved for the train / val / test split."""
CHUNK_VIDEOS = 256
"""Videos per ``VideoChunk``."""
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FAMILIES = {
    "direction": ("left", "right", "upward", "downward"),
    "speed": ("slow", "fast"),
    "size": ("small", "big"),
    "background": ("black", "white"),
    "count": ("single", "multiple"),
}
"""Attribute family → canonical values (the words ``true_attributes`` and queries use)."""
STEP = {"left": (0, -1), "right": (0, 1), "upward": (-1, 0), "downward": (1, 0)}
"""Direction → (row, column) step of the content per frame, in units of the speed."""
SPEED_PX = {"slow": 1, "fast": 3}
SCALE = {"small": 1, "big": 2}
NOISE_STD = 0.02
"""Gaussian pixel noise added to every frame."""


def _weighted(spec: str) -> tuple[tuple[str, ...], np.ndarray]:
    """``"left:4|to the left:3"`` → (phrases, cumulative probabilities)."""
    pairs = [item.rsplit(":", 1) for item in spec.split("|")]
    weights = np.array([float(w) for _, w in pairs])
    return tuple(p for p, _ in pairs), np.cumsum(weights / weights.sum())


# Surface forms per canonical value; the canonical word is the most frequent so it lands in the concept bank.
DIRECTION_PHRASES = {
    "left": _weighted("left:4|to the left:3|towards the left:1|leftward:2"),
    "right": _weighted("right:4|to the right:3|towards the right:1|rightward:2"),
    "upward": _weighted("upward:5|upwards:2|up:3"),
    "downward": _weighted("downward:5|downwards:2|down:3"),
}
SPEED_ADJ = {"fast": _weighted("fast:5|quick:2|rapid:2|speedy:1"), "slow": _weighted("slow:7|sluggish:3")}
SPEED_ADV = {"fast": _weighted("fast:4|quickly:3|rapidly:2|swiftly:1|at a fast pace:1"),
             "slow": _weighted("slowly:4|slow:4|leisurely:1|at a slow pace:1")}
SIZE_ADJ = {"big": _weighted("big:6|large:3|huge:1"), "small": _weighted("small:6|little:2|tiny:2")}
BACKGROUND_ADJ = {"black": _weighted("black:7|dark:3"), "white": _weighted("white:6|bright:2|light:2")}
COUNT_DET = {"single": _weighted("a single:6|a lone:2|a solitary:2"), "multiple": _weighted("multiple:6|a pair of:4")}
_GLUE = {"to", "the", "towards", "at", "a", "of", "pace"}


def _attribute_words() -> dict[str, frozenset[str]]:
    words: dict[str, set[str]] = {name: {name} for name in NAMES}
    for table in (DIRECTION_PHRASES, SPEED_ADJ, SPEED_ADV, SIZE_ADJ, BACKGROUND_ADJ, COUNT_DET):
        for value, (phrases, _) in table.items():
            words.setdefault(value, set()).update(w for p in phrases for w in p.split() if w not in _GLUE)
    return {value: frozenset(ws) for value, ws in words.items()}


ATTRIBUTE_WORDS = _attribute_words()
"""Canonical value → every caption word that expresses it (a caption never holds a false value's words)."""

NOUNS = _weighted("digit:5|number:3|numeral:2|figure:1|character:1")
VERBS = _weighted("moving:8|sliding:3|drifting:3|travelling:2|traveling:1|going:2|gliding:2|shifting:2|"
                  "heading:2|scrolling:1|floating:2|passing:1|cruising:1|wandering:1")
BACKGROUND_FORMS = _weighted("on a {} background:6|against a {} backdrop:2|over a {} background:1|"
                             "with a {} background:1|in front of a {} backdrop:1|on {}:1")

# Filler pools, ranked: a word's weight is 1/(rank + 3), a mild Zipf law like real caption vocabularies.
_POOLS = {
    "opener": "a clip of|a video of|footage of|an animation of|a recording of|this clip shows|the video shows|"
              "we see|there is|a scene with|an example of|a screen capture of|a synthetic clip of|a demo showing|"
              "a cartoon with|an image sequence of|a looping gif of|a glimpse of",
    "style": "handwritten scribbled sketched inked penciled blurry fuzzy grainy pixelated jagged wobbly shaky "
             "crooked slanted tilted rounded curly curvy messy neat tidy sloppy bold faint thick thin smudged "
             "clumsy elegant childish scrawled crisp ragged uneven lopsided skewed chunky spindly scratchy "
             "familiar ordinary odd strange plain simple cute pretty lovely quirky funky stylish fancy humble",
    "scene_adj": "noisy retro vintage digital synthetic animated looping repeating brief silent calm empty "
                 "minimal modern classic amateur homemade cheap flickering shimmering glitchy abstract geometric "
                 "mathematical educational experimental artificial generated procedural endless seamless "
                 "polished blocky hazy",
    "media": "clip video footage recording sequence loop film movie scene shot animation cartoon montage reel "
             "broadcast stream tape demo tutorial lesson lecture presentation slideshow experiment simulation "
             "test dataset sample snippet segment",
    "device": "screen monitor display television laptop computer tablet phone projector terminal console "
              "scoreboard billboard notebook chalkboard panel dashboard calculator oscilloscope",
    "agent": "teacher student child kid viewer audience narrator robot program algorithm machine player artist "
             "designer painter writer reader observer person crowd family baby dog cat",
    "agent_verb": "watches explains counts waits listens laughs smiles points claps writes draws reads learns "
                  "studies observes records narrates sings talks speaks comments guesses cheers nods sketches "
                  "traces copies notices admires plays types clicks",
    "texture": "soft smooth rough inky chalky dotted dashed feathery wispy scratchy sharp blotchy",
    "stroke": "strokes lines edges curves loops pixels dots marks outlines contours ink pencil chalk crayon "
              "marker shading",
    "thing": "bird ghost leaf cloud boat balloon feather ship kite fish bubble snowflake spaceship comet insect "
             "bee butterfly planet puppet toy marble coin ant",
    "topic": "math arithmetic counting handwriting reading spelling school homework science coding",
    "task": "lesson class exercise quiz puzzle game project assignment contest",
    "place": "across the screen|inside the frame|within the window|through the scene|along a track|"
             "past the border|within the panel|inside the box|over the grid|across the canvas",
    "manner": "smoothly steadily calmly quietly silently gracefully evenly continuously constantly repeatedly "
              "endlessly aimlessly casually happily cheerfully proudly boldly nervously shyly awkwardly "
              "clumsily neatly playfully mysteriously randomly freely naturally regularly mechanically "
              "automatically precisely carefully cleanly softly seamlessly uniformly patiently confidently",
}


def _zipf(pool: str) -> tuple[tuple[str, ...], np.ndarray]:
    words = pool.split("|") if "|" in pool else pool.split()
    return _weighted("|".join(f"{word}:{1.0 / (rank + 3)}" for rank, word in enumerate(words)))


FILLER = {name: _zipf(pool) for name, pool in _POOLS.items()}
"""Pool name → (phrases, cumulative probabilities) of caption filler unrelated to the attributes."""


class DigitsError(ValueError):
    """A moving-digits setting that cannot produce a benchmark; the message names the key."""


@dataclass(frozen=True)
class VideoSpec:
    """Ground truth and rendering parameters of one video."""

    video_id: str
    image_ids: tuple[int, ...]
    """Rows of ``load_digits().images``, one per digit."""
    labels: tuple[int, ...]
    """Digit classes, distinct within a video."""
    direction: str
    speed: str
    size: str
    background: str
    num_frames: int
    origins: tuple[tuple[int, int], ...]
    """Top-left (row, column) of each digit in frame 0."""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(NAMES[c] for c in self.labels)

    @property
    def count(self) -> str:
        return "single" if len(self.labels) == 1 else "multiple"

    def facts(self) -> dict[str, str]:
        """Attribute slot → canonical value; names fill slots ``name0`` (and ``name1``)."""
        out = {"direction": self.direction, "speed": self.speed, "size": self.size,
               "background": self.background, "count": self.count}
        out.update({f"name{i}": name for i, name in enumerate(self.names)})
        return out

    def true_attributes(self) -> list[str]:
        return list(self.facts().values())


@lru_cache(maxsize=1)
def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: (1797, 8, 8) float32 in [0, 1] and (1797,) int64 classes."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def image_pools(seed: int) -> dict[str, list[np.ndarray]]:
    """Split → per class the image rows it may use; the three splits' images are disjoint."""
    _, labels = digit_images()
    rng = np.random.default_rng([seed, 1])
    pools: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for cls in range(10):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        cuts = np.round(np.cumsum(POOL_FRACTIONS)[:-1] * len(rows)).astype(int)
        for split, part in zip(SPLITS, np.split(rows, cuts)):
            pools[split].append(part)
    return pools


def _origins(rng: np.random.Generator, count: int, side: int, canvas: int, direction: str):
    """Digits start anywhere along the motion axis (it wraps) and stacked in halves across it."""
    lanes = [(0, canvas - side)] if count == 1 else [(0, canvas // 2 - side), (canvas // 2, canvas - side)]
    out = []
    for lo, hi in lanes:
        across = int(rng.integers(lo, max(lo, hi) + 1))
        along = int(rng.integers(canvas))
        out.append((along, across) if STEP[direction][0] else (across, along))
    return tuple(out)


def sample_specs(cfg: DigitsConfig, split: str, n: int, pool: list[np.ndarray], tag: int = 0) -> list[VideoSpec]:
    """``n`` random videos of ``split`` whose digits come from ``pool`` (per class image rows)."""
    rng = np.random.default_rng([cfg.seed, 2, SPLITS.index(split), tag])
    specs = []
    for i in range(n):
        count = 2 if rng.random() < cfg.two_digit_prob else 1
        labels = tuple(int(c) for c in rng.choice(10, size=count, replace=False))
        direction, speed, size, background = (FAMILIES[f][int(rng.integers(len(FAMILIES[f])))]
                                              for f in ("direction", "speed", "size", "background"))
        specs.append(VideoSpec(
            video_id=f"digits-{split}-{i:05d}" if tag == 0 else f"calib-{i:05d}",
            image_ids=tuple(int(pool[c][rng.integers(len(pool[c]))]) for c in labels), labels=labels,
            direction=direction, speed=speed, size=size, background=background,
            num_frames=int(rng.integers(cfg.min_frames, cfg.max_frames + 1)),
            origins=_origins(rng, count, 8 * SCALE[size], cfg.canvas, direction)))
    return specs


def render_video(spec: VideoSpec, canvas: int, noise_rng: np.random.Generator | None = None) -> np.ndarray:
    """(T, canvas, canvas) float32 frames; frame t shows frame 0 shifted by t·speed·step, wrapping around."""
    images, _ = digit_images()
    scale = SCALE[spec.size]
    base = np.zeros((canvas, canvas), np.float32)
    for row, (top, left) in zip(spec.image_ids, spec.origins):
        glyph = np.kron(images[row], np.ones((scale, scale), np.float32))  # (s, s)
        rows, cols = np.ix_((top + np.arange(len(glyph))) % canvas, (left + np.arange(len(glyph))) % canvas)
        base[rows, cols] = np.maximum(base[rows, cols], glyph)
    step = np.arange(spec.num_frames)[:, None] * SPEED_PX[spec.speed]  # (T, 1)
    src_rows = (np.arange(canvas)[None, :] - STEP[spec.direction][0] * step) % canvas  # (T, H)
    src_cols = (np.arange(canvas)[None, :] - STEP[spec.direction][1] * step) % canvas  # (T, W)
    frames = base[src_rows[:, :, None], src_cols[:, None, :]]  # (T, H, W)
    if spec.background == "white":
        frames = 1.0 - frames
    if noise_rng is not None:
        frames = frames + noise_rng.normal(0.0, NOISE_STD, frames.shape).astype(np.float32)
    return frames.astype(np.float32)


def _floored_std(x: torch.Tensor) -> torch.Tensor:
    """Per-column std of (N, D) ``x``, at least a tenth of the mean std, so a column that is (nearly) dead
    on the calibration set cannot blow up on other frames."""
    std = x.std(0)
    return std.clamp_min(0.1 * float(std.mean()) + 1e-6)


class FrameFeaturizer:
    """A fixed, seeded random CNN that maps frames (N, H, W) to standardised features (N, feature_dim).

    conv5×5 stride 2 (1→16) + ReLU → conv3×3 (16→128) + ReLU, then two poolings: the 4×4-grid average of 16
    channels says where the ink is (so motion shows across frames), the global max of all 128 says which
    strokes occur anywhere (so the digit's identity survives translation). Both blocks are standardised, mixed
    by a fixed random projection (384 → F) and standardised again, with statistics of a calibration set.
    """

    GRID_CHANNELS = 16

    def __init__(self, feature_dim: int, seed: int):
        rng = np.random.default_rng([seed, 3])

        def normal(std: float, *shape: int) -> torch.Tensor:
            return torch.from_numpy(rng.normal(0.0, std, shape).astype(np.float32))

        # Scale 1/√fan_in keeps activations O(1) through both layers; small biases break symmetry.
        self.conv1, self.bias1 = normal(1 / 5, 16, 1, 5, 5), normal(0.1, 16)
        self.conv2, self.bias2 = normal(1 / 12, 128, 16, 3, 3), normal(0.1, 128)
        pooled_dim = self.GRID_CHANNELS * 16 + 128
        self.projection = normal(1 / np.sqrt(pooled_dim), pooled_dim, feature_dim)  # (384, F)
        self.pooled_stats = (torch.zeros(pooled_dim), torch.ones(pooled_dim))
        self.stats = (torch.zeros(feature_dim), torch.ones(feature_dim))

    @torch.inference_mode()
    def pooled(self, frames: np.ndarray, batch: int = 1024) -> torch.Tensor:
        """Grid and peak features (N, 384) of frames (N, H, W), in slices of ``batch`` frames."""
        out = []
        for start in range(0, len(frames), batch):
            x = torch.from_numpy(frames[start:start + batch])[:, None]  # (n, 1, H, W)
            # Stride 2 rather than conv + max-pool: half the CPU time, the full-size map never exists.
            x = F.relu_(F.conv2d(x, self.conv1, self.bias1, stride=2, padding=2))  # (n, 16, H/2, W/2)
            x = F.relu_(F.conv2d(x, self.conv2, self.bias2, padding=1))  # (n, 128, H/2, W/2)
            grid = F.adaptive_avg_pool2d(x[:, :self.GRID_CHANNELS], 4).flatten(1)  # (n, 256)
            out.append(torch.cat([grid, x.amax(dim=(2, 3))], dim=1))  # (n, 384)
        return torch.cat(out) if out else torch.zeros(0, len(self.projection))

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        mean, std = self.pooled_stats
        return ((pooled - mean) / std) @ self.projection  # (N, F)

    def calibrate(self, frames: np.ndarray) -> None:
        """Fix both standardisations to the per-dimension mean and std over ``frames``."""
        pooled = self.pooled(frames)
        self.pooled_stats = (pooled.mean(0), _floored_std(pooled))
        projected = self._project(pooled)
        self.stats = (projected.mean(0), _floored_std(projected))

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        mean, std = self.stats
        return ((self._project(self.pooled(frames)) - mean) / std).numpy()  # (N, F)


def _pick(rng: np.random.Generator, table: tuple[tuple[str, ...], np.ndarray]) -> str:
    """A phrase drawn by weight (inverse-CDF: ``rng.choice(p=...)`` costs ~50× more per draw)."""
    phrases, cumulative = table
    return phrases[min(int(np.searchsorted(cumulative, rng.random(), side="right")), len(phrases) - 1)]


def _with_articles(text: str) -> str:
    """``a eight`` → ``an eight``; collapses doubled spaces."""
    words = text.split()
    for i, word in enumerate(words[:-1]):
        if word == "a" and words[i + 1][0] in "aeiou":
            words[i] = "an"
    return " ".join(words)


def _subject(rng: np.random.Generator, spec: VideoSpec, said: set[str], speed_adj: bool) -> str:
    """Determiner, adjectives and head noun of a caption, mentioning only the slots in ``said``."""
    plural = len(spec.labels) == 2
    det = _pick(rng, COUNT_DET[spec.count]) if "count" in said else ("the" if plural else "a")
    adjs = [_pick(rng, SPEED_ADJ[spec.speed])] if speed_adj else []
    adjs += [_pick(rng, SIZE_ADJ[spec.size])] if "size" in said else []
    adjs += [_pick(rng, FILLER["style"])] if rng.random() < 0.35 else []
    named = [spec.facts()[s] for s in ("name0", "name1") if s in said]
    noun = _pick(rng, NOUNS) + ("s" if plural else "")
    if not plural and named:
        noun = named[0] if rng.random() < 0.7 else f"{noun} {named[0]}"
    elif named:
        noun += " including " + " and ".join(f"a {name}" for name in named)
    return " ".join([det, *adjs, noun])


def _closer(rng: np.random.Generator) -> str:
    """One filler phrase about the scene, the medium or an onlooker."""
    kind = int(rng.integers(6))
    word = lambda pool: _pick(rng, FILLER[pool])  # noqa: E731
    return [
        lambda: f"in a {word('scene_adj')} {word('media')}",
        lambda: f"on a {word('device')}",
        lambda: f"while a {word('agent')} {word('agent_verb')}",
        lambda: f"with {word('texture')} {word('stroke')}",
        lambda: f"like a {word('thing')}",
        lambda: f"for a {word('topic')} {word('task')}",
    ][kind]()


def caption(rng: np.random.Generator, spec: VideoSpec, mention_prob: float) -> str:
    """One English caption that mentions each true attribute slot with probability ``mention_prob``
    (at least one) and nothing false; filler words are drawn independently of the video."""
    slots = list(spec.facts())
    said = {s for s in slots if rng.random() < mention_prob} or {slots[int(rng.integers(len(slots)))]}
    speed_adj = "speed" in said and rng.random() < 0.4
    opener = [_pick(rng, FILLER["opener"])] if rng.random() < 0.45 else []
    verb = _pick(rng, VERBS)
    if not opener and rng.random() < 0.4:  # "a seven is moving", but "a clip of a seven moving"
        verb = ("are " if len(spec.labels) == 2 else "is ") + verb
    motion = [verb]
    motion += [_pick(rng, DIRECTION_PHRASES[spec.direction])] if "direction" in said else []
    motion += [_pick(rng, SPEED_ADV[spec.speed])] if "speed" in said and not speed_adj else []
    motion += [_pick(rng, FILLER["manner"])] if rng.random() < 0.3 else []
    parts = [*opener, _subject(rng, spec, said, speed_adj), *motion]
    parts += [_pick(rng, FILLER["place"])] if rng.random() < 0.3 else []
    parts += [_pick(rng, BACKGROUND_FORMS).format(_pick(rng, BACKGROUND_ADJ[spec.background]))] \
        if "background" in said else []
    parts += [_closer(rng) for _ in range(int(rng.random() < 0.85) + int(rng.random() < 0.35))]
    return _with_articles(" ".join(parts))


def query_text(wanted: dict[str, str]) -> str:
    """English for a query over canonical values, e.g. ``a big digit moving left on a white background``."""
    name = wanted.get("name")
    count = wanted.get("count")
    det = {"single": "a single", "multiple": "multiple", None: "a"}[count]
    noun = "digits" if count == "multiple" else "digit"
    if name and count == "multiple":
        noun += f" including a {name}"
    elif name:
        noun = name
    words = [det, wanted.get("speed", ""), wanted.get("size", ""), noun]
    if "direction" in wanted:
        words += ["moving", wanted["direction"]]
    if "background" in wanted:
        words += ["on a", wanted["background"], "background"]
    return _with_articles(" ".join(words))


def _query_facts(spec: VideoSpec) -> set[tuple[str, str]]:
    """(family, value) pairs a query may ask for; both names count as family ``name``."""
    facts = {(slot, value) for slot, value in spec.facts().items() if not slot.startswith("name")}
    return facts | {("name", name) for name in spec.names}


def make_queries(specs: list[VideoSpec], num_queries: int, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """AVS-style queries of 2–3 attributes, each taken from a random video; qrels list every video that
    has all of a query's attributes (relevance 1). Duplicate attribute sets are skipped."""
    rng = np.random.default_rng([seed, 4])
    facts = [_query_facts(spec) for spec in specs]
    seen: set[frozenset[tuple[str, str]]] = set()
    queries, qrels = [], []
    for _ in range(50 * num_queries if specs else 0):
        if len(queries) == num_queries:
            break
        options = sorted(facts[int(rng.integers(len(specs)))])
        families = sorted({family for family, _ in options})
        chosen = rng.choice(families, size=int(rng.integers(2, 4)), replace=False)
        wanted = {f: str(rng.choice([v for fam, v in options if fam == f])) for f in chosen}
        key = frozenset(wanted.items())
        relevant = [spec.video_id for spec, have in zip(specs, facts) if key <= have]
        if key in seen or not relevant:
            continue
        seen.add(key)
        query_id = f"q{len(queries) + 1:03d}"
        queries.append((query_id, query_text(wanted)))
        qrels += [(query_id, video_id) for video_id in relevant]
    return (pl.DataFrame(queries, schema={"query_id": pl.String, "text": pl.String}, orient="row"),
            pl.DataFrame(qrels, schema={"query_id": pl.String, "video_id": pl.String}, orient="row")
            .with_columns(relevance=pl.lit(1, dtype=pl.Int32)))


def make_captions(specs: list[VideoSpec], cfg: DigitsConfig, split: str) -> pl.DataFrame:
    """``captions_per_video`` captions per video: caption_id ``<video_id>#<k>``, video_id, text."""
    rng = np.random.default_rng([cfg.seed, 5, SPLITS.index(split)])
    rows = [(f"{spec.video_id}#{k}", spec.video_id, caption(rng, spec, cfg.mention_prob))
            for spec in specs for k in range(cfg.captions_per_video)]
    return pl.DataFrame(rows, schema={name: pl.String for name in ("caption_id", "video_id", "text")}, orient="row")


def _chunks(specs: list[VideoSpec], cfg: DigitsConfig, split: str,
            featurizer: FrameFeaturizer) -> Iterator[VideoChunk]:
    """Render and featurise ``CHUNK_VIDEOS`` videos at a time; a video's noise is seeded by its index."""
    for start in range(0, len(specs), CHUNK_VIDEOS):
        part = specs[start:start + CHUNK_VIDEOS]
        clips = [render_video(spec, cfg.canvas, np.random.default_rng([cfg.seed, 6, SPLITS.index(split), start + i]))
                 for i, spec in enumerate(part)]
        feats = featurizer(np.concatenate(clips))  # (sum T_i, F), every frame of the chunk at once
        bounds = np.cumsum([len(clip) for clip in clips])[:-1]
        yield VideoChunk(video_ids=[spec.video_id for spec in part], frames=np.split(feats, bounds),
                         true_attributes=[spec.true_attributes() for spec in part])


def check_config(cfg: DigitsConfig) -> None:
    """Raise :class:`DigitsError` naming the first ``data.digits`` key that cannot work."""
    problems = {
        "canvas": cfg.canvas < 16 and "must be at least 16 (a big digit is 16 px)",
        "min_frames": not 1 <= cfg.min_frames <= cfg.max_frames and "must satisfy 1 <= min_frames <= max_frames",
        "feature_dim": cfg.feature_dim < 1 and "must be positive",
        "captions_per_video": cfg.captions_per_video < 1 and "must be positive",
        "mention_prob": not 0.0 <= cfg.mention_prob <= 1.0 and "must lie in [0, 1]",
        "two_digit_prob": not 0.0 <= cfg.two_digit_prob <= 1.0 and "must lie in [0, 1]",
        "num_queries": cfg.num_queries < 0 and "must not be negative",
    }
    for split in SPLITS:
        problems[f"{split}_videos"] = getattr(cfg, f"{split}_videos") < 0 and "must not be negative"
    for key, problem in problems.items():
        if problem:
            raise DigitsError(f"data.digits.{key}: {problem}")


def moving_digits(cfg: DigitsConfig) -> dict[str, RawSplit]:
    """The benchmark as raw splits ``train``/``val``/``test`` (queries and qrels on ``test``).

    Specs, captions and queries are built now; frames are rendered and featurised afresh, deterministically,
    each time a split's ``video_chunks()`` is iterated, so memory stays at one chunk.
    """
    check_config(cfg)
    pools = image_pools(cfg.seed)
    featurizer = FrameFeaturizer(cfg.feature_dim, cfg.seed)
    calibration = sample_specs(cfg, "train", 128, pools["train"], tag=1)
    noise = np.random.default_rng([cfg.seed, 7])
    featurizer.calibrate(np.concatenate([render_video(spec, cfg.canvas, noise) for spec in calibration]))
    splits = {}
    for split in SPLITS:
        specs = sample_specs(cfg, split, getattr(cfg, f"{split}_videos"), pools[split])
        queries, qrels = make_queries(specs, cfg.num_queries, cfg.seed) if split == "test" else (None, None)
        splits[split] = RawSplit(
            name=split,
            video_chunks=lambda specs=specs, split=split: _chunks(specs, cfg, split, featurizer),
            captions=make_captions(specs, cfg, split), queries=queries, qrels=qrels)
    return splits
