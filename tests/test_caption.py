"""caption.py: the CLI on a real folder of images (one corrupt), and the library functions it is built on."""

import contextlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_vocab
from PIL import Image

import caption
from image_io import build_transform
from model import DecoderRNN, EncoderCNN, load_pretrained

REPO = Path(__file__).resolve().parents[1]
EMBED, HIDDEN, VOCAB = 16, 24, 30
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 102510437\n".format("0" * 64)


pytestmark = pytest.mark.usefixtures("one_thread")



@contextlib.contextmanager
def file_size_limit(size: int):
    """Writes past `size` bytes fail with OSError (EFBIG, "File too large"), as on a full disk: a real failure."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))  # Python ignores SIGXFSZ, so write() raises
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def noise_image(seed: int, mode: str = "RGB", size=(80, 60)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Random small-embedding weights with a train_config.json (64 px crops), and a folder of test images."""
    root = tmp_path_factory.mktemp("caption")
    models = root / "models"
    models.mkdir()
    torch.manual_seed(0)
    torch.save(EncoderCNN(EMBED, pretrained=False).state_dict(), models / "encoder-1.pkl")
    decoder = DecoderRNN(EMBED, HIDDEN, VOCAB)
    with torch.no_grad():
        decoder.fc.weight.mul_(5)  # peaked distributions: captions of a few words rather than empty ones
    torch.save(decoder.state_dict(), models / "decoder-1.pkl")
    config = {"image_size": 64, "embed_size": EMBED, "hidden_size": HIDDEN, "num_layers": 1}
    (models / "train_config.json").write_text(json.dumps(config))
    make_vocab(root / "vocab.pkl", VOCAB)
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    noise_image(1).save(photos / "COCO_val2014_000000391895.jpg", quality=90)
    noise_image(2).save(photos / "b.png")
    noise_image(3, "L").save(photos / "gray.jpg", quality=90)
    noise_image(4, size=(40, 90)).save(photos / "sub" / "val_000000000123.JPG", quality=90)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" * 20)
    (photos / "notes.txt").write_text("not an image, and not named like one")
    return {
        "root": root,
        "encoder": models / "encoder-1.pkl",
        "decoder": models / "decoder-1.pkl",
        "vocab": root / "vocab.pkl",
        "photos": photos,
        "good": [
            photos / "COCO_val2014_000000391895.jpg",
            photos / "b.png",
            photos / "gray.jpg",
            photos / "sub" / "val_000000000123.JPG",
        ],
    }


@pytest.fixture(scope="module")
def loaded(setup):
    return load_pretrained(setup["encoder"], setup["decoder"], setup["vocab"])


def test_cli_captions_a_folder_and_reports_the_corrupt_file(setup, loaded, tmp_path):
    out = tmp_path / "results" / "captions.json"
    weights = [
        "--encoder",
        str(setup["encoder"]),
        "--decoder",
        str(setup["decoder"]),
        "--vocab",
        str(setup["vocab"]),
    ]
    options = [
        "--beam",
        "2",
        "--batch-size",
        "2",
        "--device",
        "auto",
        "--num-workers",
        "0",
        "--json",
        str(out),
    ]
    result = subprocess.run(
        [sys.executable, "caption.py", str(setup["photos"]), *weights, *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr
    assert "broken.jpg" in result.stderr and "Traceback" not in result.stderr
    assert "error: 1 of 5 files could not be read as images (see above)" in result.stderr
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in setup["good"]]
    captions = [line.split("\t", 1)[1] for line in lines]
    encoder, decoder, vocab = loaded
    assert captions == caption.caption_image_files(encoder, decoder, vocab, setup["good"], beam_size=2)
    assert all(captions) and all(word in vocab.word2idx for text in captions for word in text.split())
    results = json.loads(out.read_text())
    assert results == [
        {"image_id": 391895, "caption": captions[0]},
        {"image_id": "b.png", "caption": captions[1]},
        {"image_id": "gray.jpg", "caption": captions[2]},
        {"image_id": 123, "caption": captions[3]},
    ]
    assert list(out.parent.iterdir()) == [out]  # no temp file left beside it


def test_caption_image_files_keeps_order_across_batches_and_marks_unreadable_files(setup, loaded):
    encoder, decoder, vocab = loaded
    assert encoder.image_size == 64  # from train_config.json
    paths = [*setup["good"][:2], setup["photos"] / "broken.jpg", *setup["good"][2:]]
    decoder.train()
    one_batch = caption.caption_image_files(encoder, decoder, vocab, paths, batch_size=64)
    assert decoder.training and not encoder.resnet.training  # modes restored afterwards
    decoder.eval()
    assert one_batch[2] is None and all(isinstance(c, str) for i, c in enumerate(one_batch) if i != 2)
    assert caption.caption_image_files(encoder, decoder, vocab, paths, batch_size=2) == one_batch
    only_bad = caption.caption_image_files(encoder, decoder, vocab, [setup["photos"] / "broken.jpg"])
    assert only_bad == [None]
    # The caption is the decoder's greedy output for the encoder's features, cleaned by the vocabulary.
    image = build_transform(64)(Image.open(paths[0]).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        ids = decoder.greedy_search(encoder(image))[0]
    assert one_batch[0] == vocab.decode(ids) != ""


def test_decode_features_picks_greedy_or_beam(loaded):
    _, decoder, _ = loaded
    features = torch.randn(3, EMBED, generator=torch.Generator().manual_seed(0))
    assert caption.decode_features(decoder, features, beam_size=1) == decoder.greedy_search(features)
    assert caption.decode_features(decoder, features, beam_size=3, max_len=7) == decoder.beam_search(
        features, 3, max_len=7
    )


def test_bad_weights_give_one_line_and_exit_code_2(setup, tmp_path, capsys):
    pointer = tmp_path / "decoder-3.pkl"
    pointer.write_text(LFS_POINTER)
    code = caption.main(
        [str(setup["photos"]), "--encoder", str(setup["encoder"]), "--decoder", str(pointer)]
        + ["--vocab", str(setup["vocab"])]
    )
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and str(pointer) in captured.err and "git lfs pull" in captured.err
    code = caption.main(
        [str(setup["photos"]), "--encoder", str(setup["encoder"]), "--decoder", "x", "--device", "tpu"]
    )
    assert code == 2 and "unknown device" in capsys.readouterr().err


def test_missing_inputs_are_reported_and_the_rest_captioned(setup, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    weights = [
        "--encoder",
        str(setup["encoder"]),
        "--decoder",
        str(setup["decoder"]),
        "--vocab",
        str(setup["vocab"]),
    ]
    inputs = [str(setup["good"][1]), str(tmp_path / "missing.jpg"), str(empty)]
    code = caption.main([*inputs, *weights, "--beam", "1", "--num-workers", "0", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2
    assert "missing.jpg: no such file" in captured.err and f"{empty}: no image files" in captured.err
    assert captured.out.startswith(f"{setup['good'][1]}\t") and captured.out.count("\n") == 1


@pytest.mark.parametrize(
    ("name", "image_id"),
    [
        ("COCO_val2014_000000391895.jpg", 391895),
        ("COCO_train2014_000000000009.jpg", 9),
        ("000000397133.jpg", 397133),
        ("val_000000000123.jpg", 123),
        ("IMG_0042.jpg", "IMG_0042.jpg"),
        ("test_000000000042.jpg", 42),  # the sample set's test images
        ("2019_party.jpg", "2019_party.jpg"),  # a number must be the whole id, not its start
        ("holiday.png", "holiday.png"),
    ],
)
def test_coco_image_ids_from_file_names(name, image_id):
    assert caption.coco_image_id(Path("some/folder") / name) == image_id


def weight_args(setup) -> list[str]:
    return ["--encoder", str(setup["encoder"]), "--decoder", str(setup["decoder"]), "--vocab", str(setup["vocab"])]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--num-workers", "-1"], "argument --num-workers: must be >= 0, not -1"),
        (["--max-len", "1"], "argument --max-len: must be >= 2 (it counts <start>: 1 gives empty captions), not 1"),
        (["--beam", "0"], "argument --beam: must be >= 1, not 0"),
    ],
)
def test_bad_numbers_are_refused_when_parsing(setup, capsys, option, message):
    with pytest.raises(SystemExit) as exit_:
        caption.main([str(setup["good"][0]), *weight_args(setup), *option])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_output_path_or_device_is_refused_before_any_work(setup, tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    cases = [
        (["--json", str(not_a_folder / "r.json")], f"error: {not_a_folder / 'r.json'}: {not_a_folder} is not a folder"),
        (["--json", str(tmp_path)], f"error: {tmp_path}: is a folder, expected a file name"),
        (["--json", str(tmp_path / ("x" * 300))], "cannot write there (File name too long)"),
        (["--device", "mps"] if not torch.backends.mps.is_available() else ["--device", "cuda:99"], "asked for, but"),
    ]
    for option, message in cases:
        code = caption.main([str(setup["photos"]), *weight_args(setup), "--num-workers", "0", *option])
        captured = capsys.readouterr()
        assert code == 2 and captured.out == ""  # nothing captioned
        assert message in captured.err and captured.err.count("\n") == 1, captured.err
    assert caption.main([str(setup["good"][0]), *weight_args(setup), "--json", str(tmp_path / "new" / "r.json")]) == 0
    assert json.loads((tmp_path / "new" / "r.json").read_text())[0]["image_id"] == 391895  # new folders are made


def test_a_failed_write_is_one_line_after_the_captions(setup, tmp_path, capsys):
    out = tmp_path / "results.json"
    inputs = [str(p) for p in setup["good"]]
    with file_size_limit(64):
        code = caption.main([*inputs, *weight_args(setup), "--num-workers", "0", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and len(captured.out.splitlines()) == 4  # the captions were printed first
    assert captured.err.endswith(f"error: {out}: cannot write (File too large)\n") and "Traceback" not in captured.err
    assert list(tmp_path.iterdir()) == []  # no torn file, no temp file


def test_named_files_are_captioned_whatever_their_name_and_folders_named_like_images_are_searched(
    setup, loaded, tmp_path, capsys
):
    """A file named on the command line is an image to caption even without an image extension; inside a
    folder only files count: a folder called "album.jpg" is searched, not reported as an unreadable image."""
    no_extension = tmp_path / "photo"
    no_extension.write_bytes(setup["good"][0].read_bytes())
    folder = tmp_path / "pictures"
    (folder / "album.jpg").mkdir(parents=True)
    inside = folder / "album.jpg" / "a.png"
    inside.write_bytes(setup["good"][1].read_bytes())
    code = caption.main(
        [str(no_extension), str(folder), *weight_args(setup), "--beam", "1", "--num-workers", "0"]
    )
    captured = capsys.readouterr()
    assert code == 0 and "error" not in captured.err
    encoder, decoder, vocab = loaded
    expected = caption.caption_image_files(encoder, decoder, vocab, [no_extension, inside])
    assert captured.out.splitlines() == [f"{no_extension}\t{expected[0]}", f"{inside}\t{expected[1]}"]


def test_image_size_and_max_len_options_reach_the_captioning(setup, loaded, capsys):
    inputs = [str(p) for p in setup["good"]]
    options = ["--beam", "1", "--num-workers", "0", "--image-size", "32", "--max-len", "3"]
    code = caption.main([*inputs, *weight_args(setup), *options])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    encoder, decoder, vocab = loaded
    expected = caption.caption_image_files(encoder, decoder, vocab, setup["good"], max_len=3, image_size=32)
    assert [line.split("\t", 1)[1] for line in captured.out.splitlines()] == expected
    # both options matter here: at 64 px, or with the default 20 ids, the captions differ
    assert expected != caption.caption_image_files(encoder, decoder, vocab, setup["good"], max_len=3)
    assert expected != caption.caption_image_files(encoder, decoder, vocab, setup["good"], image_size=32)
