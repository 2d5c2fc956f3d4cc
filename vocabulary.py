"""Vocabulary: NLTK tokenizing, count threshold, <start>/<end>/<unk>, safe pickle I/O.

The pickle layout is the one the Udacity CVND template wrote (`pickle.dump(self, f)` with exactly the attributes
set in `__init__`/`build_vocab`), so published `vocab.pkl` files load here and ours load there.
"""

from __future__ import annotations

import _compat_pickle
import hashlib
import io
import json
import os
import pickle
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

from nltk.tokenize import NLTKWordTokenizer, word_tokenize
from tqdm.auto import tqdm

from fileio import atomic_write

CACHE_DIR = Path(os.environ.get("CAPTION_CACHE_DIR", Path(__file__).resolve().parent / ".cache"))
TOKENS_CACHE_VERSION = 1


# Most COCO captions are lowercase words, digits and spaces with at most a final full stop. NLTK's rules leave such
# a caption whole except for splitting at spaces, splitting off the full stop and its contraction rules ("cannot"
# -> "can not"), so those are tokenized with str.split and everything else by NLTK itself: tests/test_vocabulary.py
# checks both give the same tokens.
_PLAIN_CAPTION = re.compile(r"[a-z0-9 ]*[a-z0-9] *\.? *")
_NLTK_CONTRACTIONS = NLTKWordTokenizer.CONTRACTIONS2 + NLTKWordTokenizer.CONTRACTIONS3


@lru_cache(maxsize=1 << 16)
def _splits_as_contraction(word: str) -> bool:
    """Whether an NLTK contraction rule splits this word of letters and digits; each rule matches within a word."""
    return any(rule.search(f" {word} ") for rule in _NLTK_CONTRACTIONS)


def tokenize(caption: str) -> list[str]:
    """Lowercase word tokens of one caption, as NLTK's `word_tokenize` gives them.

    `preserve_line=True` skips NLTK's sentence splitter, which needs the downloadable `punkt_tab` data; a COCO
    caption is one sentence, so the tokens are the same and no NLTK data has to be installed.
    """
    text = str(caption).lower()
    if _PLAIN_CAPTION.fullmatch(text):
        body = text.rstrip()
        words = body[:-1].split() + ["."] if body.endswith(".") else body.split()
        if not any(map(_splits_as_contraction, words)):
            return words
    return word_tokenize(text, preserve_line=True)


class VocabularyError(ValueError):
    """A vocabulary file that cannot or must not be loaded."""


class Vocabulary:
    """Word <-> id mapping built from a COCO caption file, compatible with the template's `vocab.pkl`."""

    # Class-level defaults: unpickling skips __init__, so anything added later must have one here.
    vocab_threshold = None
    vocab_file = "./vocab.pkl"
    start_word = "<start>"
    end_word = "<end>"
    unk_word = "<unk>"
    annotations_file = None
    vocab_from_file = False

    def __init__(
        self,
        vocab_threshold: int | None,
        vocab_file: str = "./vocab.pkl",
        start_word: str = "<start>",
        end_word: str = "<end>",
        unk_word: str = "<unk>",
        annotations_file: str = "../cocoapi/annotations/captions_train2014.json",
        vocab_from_file: bool = False,
    ):
        self.vocab_threshold = vocab_threshold
        self.vocab_file = vocab_file
        self.start_word = start_word
        self.end_word = end_word
        self.unk_word = unk_word
        self.annotations_file = annotations_file
        self.vocab_from_file = vocab_from_file
        self.get_vocab()

    def get_vocab(self) -> None:
        """Load the vocabulary from `vocab_file` if asked to and it exists, else build it and save it there."""
        if self.vocab_from_file and os.path.exists(self.vocab_file):
            loaded = Vocabulary.load(self.vocab_file)
            self.word2idx, self.idx2word, self.idx = loaded.word2idx, loaded.idx2word, loaded.idx
            for name in ("start_word", "end_word", "unk_word"):
                setattr(self, name, getattr(loaded, name))
            print(f"Vocabulary successfully loaded from {self.vocab_file} ({len(self)} words).")
        else:
            if self.vocab_threshold is None:
                raise VocabularyError(
                    f"{self.vocab_file}: no vocabulary file to load; pass vocab_threshold to build one"
                )
            self.build_vocab()
            self.save(self.vocab_file)

    def build_vocab(self) -> None:
        """Ids 0, 1, 2 are the start, end and unknown words; then words with count >= threshold."""
        self.init_vocab()
        self.add_word(self.start_word)
        self.add_word(self.end_word)
        self.add_word(self.unk_word)
        self.add_captions()

    def init_vocab(self) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: dict[int, str] = {}
        self.idx = 0

    def add_word(self, word: str) -> None:
        if word not in self.word2idx:
            self.word2idx[word] = self.idx
            self.idx2word[self.idx] = word
            self.idx += 1

    def add_captions(self) -> None:
        """Add every word seen at least `vocab_threshold` times, in order of first appearance."""
        counter: Counter[str] = Counter()
        for tokens in tokenize_annotations(self.annotations_file).values():
            counter.update(tokens)
        for word, count in counter.items():
            if count >= self.vocab_threshold:
                self.add_word(word)

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, self.word2idx[self.unk_word])

    def __len__(self) -> int:
        return len(self.word2idx)

    @property
    def start_id(self) -> int:
        return self.word2idx[self.start_word]

    @property
    def end_id(self) -> int:
        return self.word2idx[self.end_word]

    def encode(self, caption: str | list[str]) -> list[int]:
        """Token ids of a caption (a string, or tokens already split) framed by <start> and <end>."""
        tokens = tokenize(caption) if isinstance(caption, str) else caption
        return [self.start_id, *(self(t) for t in tokens), self.end_id]

    def decode(self, ids) -> str:
        """Words of an id sequence: skips <start>, stops at <end>."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i != self.start_id:
                words.append(self.idx2word.get(i, self.unk_word))
        return " ".join(words)

    def fingerprint(self) -> str:
        """Short hash of the id -> word table: two vocabularies with the same one are interchangeable."""
        table = json.dumps([self.idx2word[i] for i in range(len(self.idx2word))])
        return hashlib.sha256(table.encode()).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        """Pickle to `path` atomically (temp file + rename), loadable by plain `pickle.load`."""
        with atomic_write(path) as f:
            pickle.dump(self, f, protocol=4)

    @staticmethod
    def load(path: str | os.PathLike) -> Vocabulary:
        """Load a `vocab.pkl` (ours or the template's) without running any code the file asks for."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise VocabularyError(f"{path}: cannot read vocabulary file ({e.strerror})") from None
        if data.startswith(b"version https://git-lfs"):
            raise VocabularyError(f"{path}: this is a Git LFS pointer, not the vocabulary; run `git lfs pull`")
        try:
            vocab = _SafeUnpickler(io.BytesIO(data)).load()
        except pickle.UnpicklingError as e:
            raise VocabularyError(f"{path}: {e}") from None
        except Exception as e:
            raise VocabularyError(f"{path}: not a readable vocabulary pickle ({type(e).__name__}: {e})") from None
        if type(vocab) is not _PickledVocabulary or not isinstance(getattr(vocab, "word2idx", None), dict):
            raise VocabularyError(f"{path}: the pickle does not hold a Vocabulary with word2idx/idx2word")
        if not isinstance(getattr(vocab, "idx2word", None), dict) or len(vocab.idx2word) != len(vocab.word2idx):
            raise VocabularyError(f"{path}: word2idx and idx2word disagree")
        vocab.__class__ = Vocabulary
        return vocab


class _PickledVocabulary(Vocabulary):
    """What a vocab.pkl's `Vocabulary` resolves to: rebuilt from its attributes the way `pickle.dump(self, f)`
    stored it (`__new__`, then its `__dict__`), never constructed: `__init__` reads and writes files it is told to."""

    def __init__(self, *args, **kwargs):
        raise pickle.UnpicklingError(
            "refused to load: the pickle calls Vocabulary(...), which reads an annotation file and writes a "
            "vocabulary file; a saved vocabulary only stores its attributes"
        )


# What a vocab.pkl may reference: the vocabulary class (under the module names it has been saved from) and
# plain containers. Anything else -- os.system, builtins.eval, subprocess.Popen -- is refused before it runs.
_ALLOWED_GLOBALS = {
    ("vocabulary", "Vocabulary"),
    ("__main__", "Vocabulary"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "str"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "bool"),
    ("collections", "Counter"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # Protocols 0-2 name Python 2's modules (copy_reg, __builtin__); map them as pickle itself does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to load: the pickle references {module}.{name}, which a vocabulary never needs "
                "(only the Vocabulary class and plain containers are allowed)"
            )
        if name == "Vocabulary":
            return _PickledVocabulary
        return super().find_class(module, name)


def tokenize_annotations(annotations_file: str | os.PathLike) -> dict[int, list[str]]:
    """Tokens of every caption of a COCO caption file, keyed by annotation id; tokenized once, then cached.

    The cache (JSON under CACHE_DIR) is keyed by the file's path, size and mtime, so an edited file is re-tokenized.
    """
    path = Path(annotations_file).resolve()
    try:
        st = path.stat()
    except OSError:
        raise FileNotFoundError(f"{annotations_file}: annotation file not found") from None
    return _tokenize_annotations_cached(str(path), st.st_size, st.st_mtime_ns)


def forget_tokens_in_memory() -> None:
    """Drop the tokens held in memory, so the next call reads the disk cache as a new process would."""
    _tokenize_annotations_cached.cache_clear()


@lru_cache(maxsize=8)
def _tokenize_annotations_cached(path: str, size: int, mtime_ns: int) -> dict[int, list[str]]:
    key = hashlib.sha256(f"{TOKENS_CACHE_VERSION}|{path}|{size}|{mtime_ns}".encode()).hexdigest()[:20]
    cache_file = CACHE_DIR / f"tokens-{Path(path).stem}-{key}.json"
    if cache_file.exists():
        try:
            return {int(k): v for k, v in json.loads(cache_file.read_text()).items()}
        except (OSError, ValueError):
            pass  # a damaged cache file is simply rebuilt
    annotations = read_caption_annotations(path)
    tokens = {
        ann["id"]: tokenize(ann["caption"])
        for ann in tqdm(annotations, desc=f"tokenizing {Path(path).name}", unit="caption", mininterval=1.0)
    }
    try:
        with atomic_write(cache_file, "w") as f:
            json.dump(tokens, f)
    except OSError:
        pass  # a read-only cache dir only costs speed
    return tokens


def read_caption_annotations(annotations_file: str | os.PathLike) -> list[dict]:
    """The `annotations` list of a COCO caption file, with a clear error when the file is not one."""
    try:
        with open(annotations_file) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{annotations_file}: annotation file not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{annotations_file}: not a COCO caption file (invalid JSON: {e})") from None
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list) or not all(
        isinstance(a, dict) and {"id", "image_id", "caption"} <= a.keys() and isinstance(a["caption"], str)
        for a in anns
    ):
        raise ValueError(
            f"{annotations_file}: not a COCO caption file (needs an 'annotations' list of {{id, image_id, caption}}"
            " with str captions)"
        )
    return anns
