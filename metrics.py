"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of candidate captions against references.

Given one candidate caption per image and the reference captions per image, `score_captions` returns the
numbers coco-caption's `COCOEvalCap.evaluate()` prints for the same captions, minus SPICE: that method cannot
run offline (SPICE downloads Stanford CoreNLP), so its steps are run here by hand, calling the pycocoevalcap
scorers directly: references and candidates keyed by image id, PTB-tokenized, then each scorer's
`compute_score`. Tokenizing and METEOR need `java`; without it METEOR is left out and captions are tokenized
by `ptb_tokenize`, a pure-Python port of that step (Stanford PTBTokenizer as pycocoevalcap runs it).

Imports only pycocoevalcap, tqdm (progress bars) and the standard library, not torch or the model, so that
code scoring captions away from evaluate.py (e.g. CIDEr-D rewards during training) can use it without the
rest. evaluate.py reads results, references and splits, captions splits with a model and prints the scores.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from functools import partial

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer
from tqdm.auto import tqdm

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


# ---- Tokenizing: Stanford PTBTokenizer through pycocoevalcap, or its pure-Python stand-in ----

# What Stanford's PTBTokenizer (ptb3Escaping) turns brackets into; -lowerCase makes "-LRB-" "-lrb-", which is
# not in pycocoevalcap's PUNCTUATIONS, so bracket tokens stay in the tokenized captions.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_UNICODE_PUNCTUATION = str.maketrans(
    {"“": '"', "”": '"', "„": '"', "‘": "'", "’": "'", "–": "--", "—": "--", "…": "..."}
)
_SPLIT_OFF = [  # (pattern, replacement) applied in order to the whole caption
    (re.compile(r'"|``|\'\'|`'), " "),  # double quotes become `` or '', both dropped as punctuation
    (re.compile(r"[?!]+|[()\[\]{};&$%*+=|~^]"), r" \g<0> "),  # "?!" and "!!" stay one token, as in PTB
    (re.compile(r",(?!\d)|(?<!\d),"), " , "),  # but "1,000" stays whole
    (re.compile(r":(?!\d)|(?<!\d):"), " : "),  # but "10:30" stays whole
    (re.compile(r"/(?!\w)|(?<!\w)/"), " / "),  # but "a/b" stays whole
    (
        re.compile(r"-{2,}|(?<![\w-])-(?![\d-])|-(?![\w-])"),
        r" \g<0> ",
    ),  # but "black-and-white", "-5" stay whole
    (
        re.compile(r"\.{3,}(?=[^\s.])"),
        " ... ",
    ),  # "food...with"; a final "..." is handled with the final period
]
_SPLIT_WORDS = {
    "cannot": ["can", "not"],
    "gonna": ["gon", "na"],
    "gotta": ["got", "ta"],
    "wanna": ["wan", "na"],
    "lemme": ["lem", "me"],
    "gimme": ["gim", "me"],
}
_CLITIC = re.compile(r"(.+?)('s|'m|'re|'ve|'ll|'d|n't)", re.IGNORECASE)  # man's -> man 's, don't -> do n't
_KEEPS_QUOTE = re.compile(
    r"'(?:s|m|re|ve|ll|d|\d\ds)", re.IGNORECASE
)  # 's, 'm, ... and '90s keep their quote
_ABBREVIATION = re.compile(
    r"(?:[a-z]\.)+|(?:mr|mrs|ms|dr|st|jr|sr|prof|mt|etc|vs|inc|co|corp|ltd)\.", re.IGNORECASE
)


def _split_word(word: str) -> list[str]:
    """PTB tokens of one whitespace-free word, less the quotes and periods that PUNCTUATIONS would drop."""
    if word.startswith("'") and not _KEEPS_QUOTE.fullmatch(word):
        word = word[1:]  # an opening quote: "'hello" -> "` hello"
    while word[-1:] in ("'", "."):  # closing quotes, a final period or "...": "dogs'" -> "dogs '"
        if word.endswith(".") and _ABBREVIATION.fullmatch(word.rstrip(".") + "."):
            word = word.rstrip(".") + "."  # "mr." and "u.s." keep their period, "u.s...." -> "u.s. ..."
            break
        word = word[:-1]
    if not word:
        return []
    if word.lower() in _SPLIT_WORDS:
        return _SPLIT_WORDS[word.lower()]
    clitic = _CLITIC.fullmatch(word)
    return list(clitic.groups()) if clitic else [_BRACKETS.get(word, word)]


def ptb_tokenize(caption: str) -> str:
    """One caption tokenized like pycocoevalcap's PTBTokenizer, without Java.

    pycocoevalcap runs Stanford PTBTokenizer 3.4.1 with -preserveLines -lowerCase and then drops the tokens in
    its PUNCTUATIONS list. This does the same with a few regular expressions that cover what captions contain:
    punctuation and brackets split off (brackets become -lrb- etc.), "man's" -> "man 's", "don't" -> "do n't",
    "cannot" -> "can not", a final period split off unless the word is an abbreviation ("mr.", "u.s."), and
    hyphenated words, numbers with "," "." ":" and "a/b" kept whole. Checked token for token against the Java
    tokenizer on punctuated captions; rare forms ("rock'n'roll", "'tis", "½", 5'10") can still differ, and so
    can a capital letter with a period before an uppercase word, where Java looks ahead into the next caption.
    """
    text = caption.translate(_UNICODE_PUNCTUATION)
    for pattern, replacement in _SPLIT_OFF:
        text = pattern.sub(replacement, text)
    tokens = [token.lower() for word in text.split() for token in _split_word(word)]
    return " ".join(token for token in tokens if token not in PUNCTUATIONS)


def tokenize_captions(captions: dict[int, list[str]], use_java: bool) -> dict[int, list[str]]:
    """PTB-tokenized captions per image id, by pycocoevalcap's Java PTBTokenizer or by `ptb_tokenize`."""
    # The Java tokenizer reads one caption per line and pycocoevalcap only replaces "\n" in them, so a "\r"
    # would shift every later caption onto the wrong image: all line breaks become spaces (same tokens).
    captions = {
        image_id: [" ".join(c.splitlines()) for c in image_captions]
        for image_id, image_captions in captions.items()
    }
    if use_java:
        return PTBTokenizer().tokenize({i: [{"caption": c} for c in caps] for i, caps in captions.items()})
    return {
        image_id: [ptb_tokenize(c) for c in image_captions]
        for image_id, image_captions in tqdm(
            captions.items(), desc="tokenizing", disable=len(captions) < 5000
        )
    }


def java_available() -> bool:
    """True when a `java` executable is on PATH (needed by the PTB tokenizer and METEOR jars)."""
    return shutil.which("java") is not None


# ---- Scoring ----


def check_results(
    results: list[dict],
    references: dict[int, list[str]],
    results_name: str = "results",
    references_name: str = "the references",
) -> None:
    """Raise ValueError if an image id has several captions or no references (the scorers assume neither)."""
    ids = [result["image_id"] for result in results]
    if not ids:
        raise ValueError(f"{results_name}: no captions to score")
    repeated = sorted(image_id for image_id, count in Counter(ids).items() if count > 1)
    if repeated:
        raise ValueError(
            f"{results_name}: {len(repeated)} image ids have several captions (e.g. {repeated[:3]}); "
            "keep one per image (--first-caption-per-image keeps the first)"
        )
    unknown = [i for i in ids if not references.get(i)]
    if unknown:
        raise ValueError(
            f"{results_name}: {len(unknown)} image ids have no references in {references_name} "
            f"(e.g. {unknown[:3]})"
        )


def score_captions(
    results: list[dict],
    references: dict[int, list[str]],
    use_java: bool | None = None,
    per_image: bool = False,
) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) of one caption per image, exactly as coco-caption has them.

    Only the images in `results` are scored, as COCOEvalCap does with `params['image_id'] =
    cocoRes.getImgIds()`, in the order of `references`. `use_java=None` uses Java when it is on PATH; without
    Java, METEOR is left out (never reported as 0) and `ptb_tokenize` replaces the Java tokenizer. With
    `per_image=True` the result also has 'per_image': {image_id: {metric: score}}, e.g. for the best/worst.
    """
    check_results(results, references)
    use_java = _resolve_java(use_java)
    # METEOR's JVM takes ~10 s to load its paraphrase table: start it now, it loads while we tokenize.
    meteor = Meteor() if use_java else None
    candidate = {result["image_id"]: result["caption"] for result in results}
    image_ids = [image_id for image_id in references if image_id in candidate]
    gts = tokenize_captions({i: references[i] for i in image_ids}, use_java)
    res = tokenize_captions({i: [candidate[i]] for i in image_ids}, use_java)
    scores, image_scores = _compute_scores(_scorers(meteor), gts, res)
    scores = metrics_only(scores)
    if per_image:
        scores["per_image"] = {
            image_id: {metric: float(values[k]) for metric, values in image_scores.items()}
            for k, image_id in enumerate(image_ids)
        }
    return scores


def _resolve_java(use_java: bool | None) -> bool:
    """Whether to use Java: None means "if it is on PATH" (with a note when not); True without it is an error."""
    if use_java is None:
        use_java = java_available()
        if not use_java:
            print(
                "note: no `java` on PATH: METEOR skipped, captions tokenized by the Python PTB tokenizer",
                file=sys.stderr,
            )
    elif use_java and not java_available():
        raise RuntimeError("use_java=True but no `java` on PATH")
    return use_java


def _scorers(meteor: Meteor | None) -> list[tuple[tuple[str, ...], Callable]]:
    """(metric names, compute_score) of each pycocoevalcap scorer, in coco-caption's order; METEOR only if given."""
    scorers = [
        (METRICS[:4], partial(Bleu(4).compute_score, verbose=0)),  # verbose would print to stdout
        (("ROUGE-L",), Rouge().compute_score),
        (("CIDEr",), Cider().compute_score),
    ]
    if meteor is not None:
        scorers.insert(1, (("METEOR",), meteor.compute_score))
    return scorers


def _compute_scores(
    scorers: list[tuple[tuple[str, ...], Callable]], gts: dict[int, list[str]], res: dict[int, list[str]]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each metric's corpus score and per-image scores (in `gts` order), from tokenized references and candidates."""
    scores: dict[str, float] = {}
    image_scores: dict[str, list[float]] = {}
    for names, compute_score in tqdm(scorers, desc="scoring", unit="metric", disable=len(gts) < 1000):
        score, per_image_scores = compute_score(gts, res)
        if len(names) == 1:
            score, per_image_scores = [score], [per_image_scores]
        for name, value, values in zip(names, score, per_image_scores, strict=True):
            scores[name], image_scores[name] = float(value), values
    return scores, image_scores


def metrics_only(scores: dict) -> dict[str, float]:
    """The metrics of a scores dict in METRICS order, without 'per_image' or other keys."""
    return {metric: scores[metric] for metric in METRICS if metric in scores}
