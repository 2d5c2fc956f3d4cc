"""Vocabulary: id/threshold semantics, encode/decode, template pickle compatibility both ways, safe loading."""

import json
import os
import pickle
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest

from vocabulary import Vocabulary, VocabularyError, tokenize, tokenize_annotations

REPO = Path(__file__).resolve().parents[1]

# The Udacity CVND template's vocabulary.py, as the published vocab.pkl files were made with it (the only change:
# preserve_line=True, because NLTK's punkt data cannot be downloaded here; it does not affect the pickle layout).
TEMPLATE_VOCABULARY = textwrap.dedent(
    '''
    import nltk
    import pickle
    import os.path
    from pycocotools.coco import COCO
    from collections import Counter

    class Vocabulary(object):

        def __init__(self, vocab_threshold, vocab_file='./vocab.pkl', start_word="<start>", end_word="<end>",
                     unk_word="<unk>", annotations_file='../cocoapi/annotations/captions_train2014.json',
                     vocab_from_file=False):
            self.vocab_threshold = vocab_threshold
            self.vocab_file = vocab_file
            self.start_word = start_word
            self.end_word = end_word
            self.unk_word = unk_word
            self.annotations_file = annotations_file
            self.vocab_from_file = vocab_from_file
            self.get_vocab()

        def get_vocab(self):
            if os.path.exists(self.vocab_file) & self.vocab_from_file:
                with open(self.vocab_file, 'rb') as f:
                    vocab = pickle.load(f)
                    self.word2idx = vocab.word2idx
                    self.idx2word = vocab.idx2word
            else:
                self.build_vocab()
                with open(self.vocab_file, 'wb') as f:
                    pickle.dump(self, f, protocol=PROTOCOL)

        def build_vocab(self):
            self.init_vocab()
            self.add_word(self.start_word)
            self.add_word(self.end_word)
            self.add_word(self.unk_word)
            self.add_captions()

        def init_vocab(self):
            self.word2idx = {}
            self.idx2word = {}
            self.idx = 0

        def add_word(self, word):
            if not word in self.word2idx:
                self.word2idx[word] = self.idx
                self.idx2word[self.idx] = word
                self.idx += 1

        def add_captions(self):
            coco = COCO(self.annotations_file)
            counter = Counter()
            ids = coco.anns.keys()
            for i, id in enumerate(ids):
                caption = str(coco.anns[id]['caption'])
                tokens = nltk.tokenize.word_tokenize(caption.lower(), preserve_line=True)
                counter.update(tokens)
            words = [word for word, cnt in counter.items() if cnt >= self.vocab_threshold]
            for i, word in enumerate(words):
                self.add_word(word)

        def __call__(self, word):
            if not word in self.word2idx:
                return self.word2idx[self.unk_word]
            return self.word2idx[word]

        def __len__(self):
            return len(self.word2idx)
    '''
)
TEMPLATE_ATTRIBUTES = {
    "vocab_threshold", "vocab_file", "start_word", "end_word", "unk_word",
    "annotations_file", "vocab_from_file", "word2idx", "idx2word", "idx",
}


def run_template(tmp_path: Path, code: str, protocol: int = 3) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python whose `vocabulary` module is the template's."""
    template_dir = tmp_path / "template"
    template_dir.mkdir(exist_ok=True)
    (template_dir / "vocabulary.py").write_text(f"PROTOCOL = {protocol}\n" + TEMPLATE_VOCABULARY)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=template_dir, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(template_dir)},
    )


def write_captions(path: Path, captions: list[str]) -> Path:
    images = [{"id": 1, "file_name": "a.jpg", "width": 1, "height": 1}]
    anns = [{"id": 100 + i, "image_id": 1, "caption": c} for i, c in enumerate(captions)]
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


CAPTIONS = ["A dog runs.", "The dog sleeps", "A cat and a dog", "A zebra!", "the CAT runs"]


def test_ids_threshold_and_first_appearance_order(tmp_path):
    ann = write_captions(tmp_path / "c.json", CAPTIONS)
    vocab = Vocabulary(2, str(tmp_path / "vocab.pkl"), annotations_file=str(ann))
    # counts: a 3, dog 3, runs 2, . 1, the 2, sleeps 1, cat 2, and 1, zebra 1, ! 1
    assert [vocab.idx2word[i] for i in range(len(vocab))] == ["<start>", "<end>", "<unk>", "a", "dog", "runs", "the", "cat"]
    assert vocab.word2idx["<start>"] == 0 and vocab("<end>") == 1 and vocab("<unk>") == 2
    assert vocab("zebra") == 2 and vocab("never-seen") == 2
    assert len(vocab) == vocab.idx == 8
    assert len(Vocabulary(1, str(tmp_path / "v1.pkl"), annotations_file=str(ann))) == 13


def test_word_ids_follow_first_appearance_not_frequency(tmp_path):
    ann = write_captions(tmp_path / "c.json", ["a cat", "the dog", "the dog sleeps", "the dog"])
    vocab = Vocabulary(1, str(tmp_path / "vocab.pkl"), annotations_file=str(ann))
    assert [vocab.idx2word[i] for i in range(3, len(vocab))] == ["a", "cat", "the", "dog", "sleeps"]


def test_encode_decode_round_trip(tmp_path):
    ann = write_captions(tmp_path / "c.json", CAPTIONS)
    vocab = Vocabulary(1, str(tmp_path / "vocab.pkl"), annotations_file=str(ann))
    ids = vocab.encode("A cat and a dog.")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert vocab.decode(ids) == "a cat and a dog ."
    assert vocab.decode(ids + [vocab("dog"), vocab("runs")]) == "a cat and a dog ."  # stops at <end>
    assert vocab.decode([vocab("a"), vocab("unicorn")]) == "a <unk>"
    assert vocab.decode([vocab("a"), 999]) == "a <unk>"  # an id beyond the table
    import torch

    assert vocab.decode(torch.tensor(ids)) == vocab.decode(ids)  # a tensor row, as decoders hold them
    expected = [vocab.start_id, vocab("a"), vocab("cat"), vocab("<unk>"), vocab.end_id]
    assert vocab.encode(["a", "cat", "unicorn"]) == expected  # tokens already split are not split again
    assert tokenize("Two men, one dog.") == ["two", "men", ",", "one", "dog", "."]


def test_tokenize_gives_nltks_tokens_on_plain_and_tricky_captions():
    """tokenize() splits plain captions itself: on random mixes of words, digits, full stops, contractions NLTK
    splits ("cannot", "wanna."), quotes and other punctuation it must give exactly NLTK's tokens."""
    import random

    from nltk.tokenize import word_tokenize

    pieces = ["a", "Dog", "2", "10", "3.5", "cannot", "CanNot.", "can", "not", "gonna", "wanna", "wanna.", "gimme",
              "lemme", "gotta", "more", "tis", "'t", "'s", "man's", "it's", "d'ye", ".", "...", ",", ":", ";", "!",
              "?", "(", ")", '"', "'", "-", "--", "&", "\t", "é", "x9"]
    rng = random.Random(0)
    captions = ["A man riding a wave on top of a surfboard.", "two dogs  playing . ", "wanna", "cannot.", " a 2"]
    captions += ["".join(rng.choice(pieces) + rng.choice(["", " ", "  "]) for _ in range(rng.randint(1, 9)))
                 for _ in range(20000)]
    for caption in captions:
        assert tokenize(caption) == word_tokenize(caption.lower(), preserve_line=True), caption
    assert tokenize("wanna.") == ["wan", "na", "."] and tokenize("A cat.") == ["a", "cat", "."]


def test_tokenized_once_and_cached(tmp_path):
    ann = write_captions(tmp_path / "c.json", CAPTIONS)
    first = tokenize_annotations(ann)
    assert first[100] == ["a", "dog", "runs", "."]
    assert tokenize_annotations(ann) is first  # same object: not tokenized again
    os.utime(ann, ns=(1, 1))
    assert tokenize_annotations(ann) is not first  # a changed file is re-tokenized


def test_tokens_cached_on_disk_serve_a_new_process_and_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    import vocabulary

    monkeypatch.setattr(vocabulary, "CACHE_DIR", tmp_path / "cache")
    ann = write_captions(tmp_path / "c.json", CAPTIONS)
    first = tokenize_annotations(ann)
    [cache_file] = (tmp_path / "cache").iterdir()
    vocabulary.forget_tokens_in_memory()  # as a new process

    def no_tokenizing(caption):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as patch:
        patch.setattr(vocabulary, "tokenize", no_tokenizing)
        assert tokenize_annotations(ann) == first and 100 in first  # ids are ints again, not JSON's strings
    cache_file.write_text('{"100": ["a", "do')  # torn
    vocabulary.forget_tokens_in_memory()
    assert tokenize_annotations(ann) == first
    assert json.loads(cache_file.read_text())["100"] == first[100]


@pytest.mark.parametrize("protocol", [3, 4])
def test_template_pickles_load(tmp_path, protocol):
    ann = write_captions(tmp_path / "c.json", CAPTIONS)
    pkl = tmp_path / "vocab.pkl"
    run_template(tmp_path, f"from vocabulary import Vocabulary; Vocabulary(2, {str(pkl)!r}, annotations_file={str(ann)!r})",
                 protocol)
    assert pkl.read_bytes()[:2] == bytes([0x80, protocol])
    vocab = Vocabulary.load(pkl)
    assert set(vars(vocab)) == TEMPLATE_ATTRIBUTES
    assert vocab.word2idx == Vocabulary(2, str(tmp_path / "ours.pkl"), annotations_file=str(ann)).word2idx
    assert vocab.decode(vocab.encode("the dog runs")) == "the dog runs"  # methods work on a template object
    # The template's way of loading through the constructor works too.
    again = Vocabulary(None, str(pkl), vocab_from_file=True)
    assert again.idx2word == vocab.idx2word and again.idx == vocab.idx


def test_loading_through_the_constructor_keeps_the_files_special_words(tmp_path):
    ann = write_captions(tmp_path / "c.json", CAPTIONS)
    pkl = tmp_path / "vocab.pkl"
    built = Vocabulary(1, str(pkl), "<s>", "</s>", "<?>", str(ann))
    # the constructor's defaults are <start> <end> <unk>: the file's words must win
    loaded = Vocabulary(None, str(pkl), vocab_from_file=True)
    assert (loaded.start_word, loaded.end_word, loaded.unk_word) == ("<s>", "</s>", "<?>")
    assert set(vars(loaded)) == TEMPLATE_ATTRIBUTES and loaded.idx == built.idx == len(built)
    assert loaded.decode(loaded.encode("a unicorn")) == "a <?>"


def test_our_pickle_loads_with_plain_pickle_and_in_the_template(tmp_path):
    ann = write_captions(tmp_path / "c.json", CAPTIONS)
    pkl = tmp_path / "vocab.pkl"
    ours = Vocabulary(1, str(pkl), annotations_file=str(ann))
    assert set(vars(ours)) == TEMPLATE_ATTRIBUTES
    plain = subprocess.run(
        [sys.executable, "-c", f"import pickle; v = pickle.load(open({str(pkl)!r}, 'rb')); print(len(v), v('dog'))"],
        cwd=REPO, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert plain.stdout.split() == [str(len(ours)), str(ours("dog"))]
    assert pkl.read_bytes()[:2] == b"\x80\x04"  # protocol 4, as the template's readers expect
    template = run_template(
        tmp_path, f"import pickle; v = pickle.load(open({str(pkl)!r}, 'rb')); print(type(v).__module__, len(v), v('cat'))"
    )
    assert template.stdout.split() == ["vocabulary", str(len(ours)), str(ours("cat"))]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "vocab.pkl"
    evil.write_bytes(pickle.dumps({"word2idx": _Exploit(marker)}, protocol=4))
    with pytest.raises(VocabularyError, match=r"vocab\.pkl.*(posix|os)\.system"):
        Vocabulary.load(evil)
    assert not marker.exists()
    pickle.loads(evil.read_bytes())  # the same bytes really do run a command when unpickled naively
    assert marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [("builtins", "eval"), ("builtins", "exec"),
     ("__builtin__", "eval"),  # Python 2's name, which protocols 0-2 use
     ("builtins", "getattr"), ("builtins", "__import__"), ("builtins", "open"), ("subprocess", "Popen"),
     ("vocabulary", "tokenize_annotations")],
)
def test_pickles_naming_anything_but_the_vocabulary_and_containers_are_refused(tmp_path, module, name):
    marker = tmp_path / "the-pickle-ran-code"
    argument = f"open({str(marker)!r}, 'w')" if name in ("eval", "exec") else str(marker)
    evil = tmp_path / "vocab.pkl"
    call = b"\x80\x02c" + f"{module}\n{name}\n".encode() + pickle.dumps((argument,), 2)[2:-1] + b"R."
    evil.write_bytes(call)  # module.name(argument)
    shown = "builtins" if module == "__builtin__" else module
    refused = rf"vocab\.pkl: refused to load: the pickle references {shown}\.{name},"
    with pytest.raises(VocabularyError, match=refused):
        Vocabulary.load(evil)
    assert not marker.exists()


def test_fingerprint_tells_id_tables_apart(tmp_path):
    ann = write_captions(tmp_path / "c.json", CAPTIONS)
    pkl = tmp_path / "vocab.pkl"
    vocab = Vocabulary(1, str(pkl), annotations_file=str(ann))
    assert Vocabulary.load(pkl).fingerprint() == vocab.fingerprint()
    assert len(vocab.fingerprint()) == 16 and int(vocab.fingerprint(), 16) >= 0
    swapped = Vocabulary.load(pkl)  # the same words, two of them with each other's ids
    first, second = swapped.idx2word[3], swapped.idx2word[4]
    swapped.idx2word[3], swapped.idx2word[4] = second, first
    swapped.word2idx[first], swapped.word2idx[second] = 4, 3
    assert swapped.fingerprint() != vocab.fingerprint()


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(VocabularyError, match="missing.pkl.*cannot read"):
        Vocabulary.load(tmp_path / "missing.pkl")
    lfs = tmp_path / "lfs.pkl"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(VocabularyError, match="git lfs pull"):
        Vocabulary.load(lfs)
    torn = tmp_path / "torn.pkl"
    ann = write_captions(tmp_path / "c.json", CAPTIONS)
    Vocabulary(1, str(torn), annotations_file=str(ann))
    torn.write_bytes(torn.read_bytes()[:40])
    with pytest.raises(VocabularyError, match="torn.pkl"):
        Vocabulary.load(torn)
    not_vocab = tmp_path / "list.pkl"
    not_vocab.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(VocabularyError, match="does not hold a Vocabulary"):
        Vocabulary.load(not_vocab)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not a COCO caption file"):
        Vocabulary(1, str(tmp_path / "x.pkl"), annotations_file=str(bad_json))
    null_caption = tmp_path / "null.json"
    null_caption.write_text(json.dumps({"images": [], "annotations": [{"id": 1, "image_id": 1, "caption": None}]}))
    with pytest.raises(ValueError, match="null.json.*with str captions"):  # not tokenized as the word "none"
        Vocabulary(1, str(tmp_path / "x.pkl"), annotations_file=str(null_caption))
    for name, annotation in [("no_caption", {"id": 1, "image_id": 1, "text": "a dog"}),
                             ("no_id", {"image_id": 1, "caption": "a dog"})]:
        (tmp_path / f"{name}.json").write_text(json.dumps({"images": [], "annotations": [annotation]}))
        with pytest.raises(ValueError, match=f"{name}.json: not a COCO caption file"):
            Vocabulary(1, str(tmp_path / "x.pkl"), annotations_file=str(tmp_path / f"{name}.json"))
    instances = tmp_path / "instances.json"  # a COCO file without captions, e.g. the Karpathy split's
    instances.write_text(json.dumps({"images": [{"id": 1}]}))
    with pytest.raises(ValueError, match="instances.json: not a COCO caption file"):
        Vocabulary(1, str(tmp_path / "x.pkl"), annotations_file=str(instances))
    with pytest.raises(VocabularyError, match="nothing.pkl: no vocabulary file to load"):
        Vocabulary(None, str(tmp_path / "nothing.pkl"), vocab_from_file=True)
    disagreeing = Vocabulary(1, str(tmp_path / "disagreeing.pkl"), annotations_file=str(ann))
    del disagreeing.idx2word[3]
    disagreeing.save(tmp_path / "disagreeing.pkl")
    with pytest.raises(VocabularyError, match="disagreeing.pkl: word2idx and idx2word disagree"):
        Vocabulary.load(tmp_path / "disagreeing.pkl")
    impostor = OrderedDict()  # an allowed container that carries the attributes, but no Vocabulary
    impostor.word2idx, impostor.idx2word = {"<start>": 0}, {0: "<start>"}
    (tmp_path / "impostor.pkl").write_bytes(pickle.dumps(impostor, protocol=4))
    with pytest.raises(VocabularyError, match="impostor.pkl: the pickle does not hold a Vocabulary"):
        Vocabulary.load(tmp_path / "impostor.pkl")


def test_save_is_atomic(tmp_path, monkeypatch):
    ann = write_captions(tmp_path / "c.json", CAPTIONS)
    pkl = tmp_path / "vocab.pkl"
    vocab = Vocabulary(1, str(pkl), annotations_file=str(ann))
    before = pkl.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # dies mid-write

    monkeypatch.setattr(pickle, "dump", crash)
    vocab.word2idx["extra"] = 99
    with pytest.raises(KeyboardInterrupt):
        vocab.save(pkl)
    assert pkl.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "vocab.pkl"]  # no temp file left


def test_pickles_of_every_protocol_load_ours_and_the_templates(tmp_path):
    """pickle.dump(self, f) at protocols 0-5: 0 and 1 rebuild the object through copyreg._reconstructor and name
    Python 2's modules (copy_reg, __builtin__), 2-5 through NEWOBJ; all come back as a working Vocabulary."""
    ann = write_captions(tmp_path / "c.json", CAPTIONS)
    ours = Vocabulary(2, str(tmp_path / "ours.pkl"), annotations_file=str(ann))
    run_template(tmp_path, textwrap.dedent(f"""
        import pickle
        from vocabulary import Vocabulary
        vocab = Vocabulary(2, {str(tmp_path / "template.pkl")!r}, annotations_file={str(ann)!r})
        for protocol in range(6):
            with open({str(tmp_path)!r} + f"/template-{{protocol}}.pkl", "wb") as f:
                pickle.dump(vocab, f, protocol=protocol)
    """))
    for protocol in range(6):
        with open(tmp_path / f"ours-{protocol}.pkl", "wb") as f:
            pickle.dump(ours, f, protocol=protocol)
        for maker in ("ours", "template"):
            vocab = Vocabulary.load(tmp_path / f"{maker}-{protocol}.pkl")
            assert type(vocab) is Vocabulary and set(vars(vocab)) == TEMPLATE_ATTRIBUTES, (maker, protocol)
            assert vocab.idx2word == ours.idx2word and vocab.decode(vocab.encode("the dog runs")) == "the dog runs"


def _calls_vocabulary(args: tuple, through_reconstructor: bool = False) -> bytes:
    """A hand-made pickle whose only globals are ones a vocab.pkl may name, but which calls Vocabulary(*args), or
    copyreg._reconstructor(Vocabulary, Vocabulary, args[0]) (which calls Vocabulary.__init__(obj, args[0]))."""
    vocabulary = b"cvocabulary\nVocabulary\n"
    if through_reconstructor:
        body = b"ccopyreg\n_reconstructor\n" + vocabulary + vocabulary + pickle.dumps(args[0], 2)[2:-1] + b"\x87"
    else:
        body = vocabulary + pickle.dumps(args, protocol=2)[2:-1]  # the tuple without PROTO and STOP
    return b"\x80\x02" + body + b"R."


def test_pickles_that_construct_a_vocabulary_are_refused_and_write_nothing(tmp_path, monkeypatch):
    """Vocabulary.__init__ reads the annotation file it is given and saves to the vocab_file it is given: a pickle
    that calls it could overwrite any file the user can write. Loading refuses it before anything is read or written."""
    ann = write_captions(tmp_path / "c.json", CAPTIONS)
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file\n")
    evil = tmp_path / "vocab.pkl"
    evil.write_bytes(_calls_vocabulary((1, str(victim), "<start>", "<end>", "<unk>", str(ann), False)))
    with pytest.raises(VocabularyError, match=r"vocab\.pkl: refused to load: the pickle calls Vocabulary"):
        Vocabulary.load(evil)
    assert victim.read_text() == "the user's file\n"
    with pytest.raises(VocabularyError, match="refused to load"):
        Vocabulary(None, str(evil), vocab_from_file=True)  # the template's way of loading goes through load()
    assert victim.read_text() == "the user's file\n"
    pickle.loads(evil.read_bytes())  # the same bytes, unpickled naively, do overwrite the file
    assert victim.read_bytes().startswith(b"\x80")  # now a vocabulary pickle

    # Vocabulary.__init__(obj, 1): threshold 1, the defaults ./vocab.pkl and ../cocoapi/annotations/..., which is
    # the template's own layout, so the user's ./vocab.pkl would be rebuilt from whatever that file holds.
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "cocoapi/annotations").mkdir(parents=True)
    write_captions(tmp_path / "cocoapi/annotations/captions_train2014.json", CAPTIONS)
    monkeypatch.chdir(work)
    evil.write_bytes(_calls_vocabulary((1,), through_reconstructor=True))
    with pytest.raises(VocabularyError, match="refused to load"):
        Vocabulary.load(evil)
    assert not (work / "vocab.pkl").exists()
    pickle.loads(evil.read_bytes())  # unpickled naively, they do build and write ./vocab.pkl
    assert (work / "vocab.pkl").exists()
