"""Caption files of every format (COCO JSON, Karpathy dataset_*.json, captions.txt, Flickr8k.token.txt): reading,
the split rules, the one-line errors, the COCO-format split files, and train / evaluate / caption / prepare_data
on a Flickr-like copy of generated JPEGs."""

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

import caption
import evaluate
import prepare_data
import train
import vocabulary
from caption_sources import CaptionFileError, assign_splits, caption_splits, load_coco, read_captions
from data_loader import BucketBatchSampler, locate_caption_file, split_files
from datasets import build_vocabulary, caption_table, read_split
from sample_data import flickr_copy, make_sample_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(image_size=32, embed_size=32, hidden_size=48, epochs=2, batch_size=32, num_workers=0, log_every=5)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A small generated sample set (150 train, 30 val images), and its Flickr-like copies in three layouts."""
    root = tmp_path_factory.getbasetemp() / "caption-sources"
    make_sample_dataset(root / "sample", n_train=150, n_val=30, n_test=2)
    for layout in ("kaggle", "original", "karpathy"):
        flickr_copy(root / "sample", root / layout, layout)
    return root


@pytest.fixture(autouse=True)
def _cache(base, monkeypatch):
    monkeypatch.setattr(vocabulary, "CACHE_DIR", base / "cache")


def captions_by_name(source) -> dict[str, list[str]]:
    return {image.file_name: image.captions for image in source.images}


def test_the_four_formats_give_the_same_images_and_captions(base):
    sample = base / "sample"
    expected = {}
    for split in ("train", "val"):
        coco = json.loads((sample / f"annotations/captions_{split}.json").read_text())
        names = {image["id"]: image["file_name"] for image in coco["images"]}
        for ann in coco["annotations"]:
            expected.setdefault(names[ann["image_id"]], []).append(ann["caption"])
    sources = {
        "captions-csv": read_captions(base / "kaggle/captions.txt"),
        "flickr-token": read_captions(base / "original/Flickr8k.token.txt"),
        "karpathy": read_captions(base / "karpathy/dataset_flickr8k.json"),
    }
    for fmt, source in sources.items():
        assert source.format == fmt and captions_by_name(source) == expected, fmt
    coco = read_captions(sample / "annotations/captions_val.json")
    assert coco.format == "coco" and captions_by_name(coco) == {
        name: caps for name, caps in expected.items() if name.startswith("val_")}
    # ids are stable: images numbered in name order, sentences in file order
    token = sources["flickr-token"]
    assert [image.image_id for image in sorted(token.images, key=lambda i: i.file_name)] == list(
        range(1, len(token.images) + 1))


def test_flickr30k_results_csv_with_its_pipe_separator_and_merged_row(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("image_name| comment_number| comment\n"
                    "1000092795.jpg| 0| Two young guys with shaggy hair .\n"
                    "1000092795.jpg| 1| Two men, one in a hat , look at their hands .\n"
                    "2199200615.jpg| 4 A dog runs across the grass .\n")
    source = read_captions(path)
    assert source.format == "captions-csv"
    assert captions_by_name(source) == {
        "1000092795.jpg": ["Two young guys with shaggy hair .", "Two men, one in a hat , look at their hands ."],
        "2199200615.jpg": ["A dog runs across the grass ."]}


def test_split_rules(base):
    karpathy = assign_splits(read_captions(base / "karpathy/dataset_flickr8k.json"))
    raw = json.loads((base / "karpathy/dataset_flickr8k.json").read_text())["images"]
    want = {r["filename"]: "train" if r["split"] == "restval" else r["split"] for r in raw}
    assert {i.file_name: i.split for i in karpathy.images} == want and "restval" in {r["split"] for r in raw}
    listed = assign_splits(read_captions(base / "original/Flickr8k.token.txt"))
    assert "Flickr8k lists" in listed.split_rule
    assert {i.file_name: i.split for i in listed.images} == want  # the lists were written from the same split
    by_name = assign_splits(read_captions(base / "kaggle/captions.txt"))
    counts = {s: sum(i.split == s for i in by_name.images) for s in ("train", "val", "test")}
    assert counts == {"train": 144, "val": 18, "test": 18} and "deterministically" in by_name.split_rule
    again = assign_splits(read_captions(base / "kaggle/captions.txt"))
    assert [i.split for i in again.images] == [i.split for i in by_name.images]
    ordered = sorted(by_name.images, key=lambda i: hashlib.sha1(i.file_name.encode()).hexdigest())
    assert [i.split for i in ordered[:36]] == ["val"] * 18 + ["test"] * 18


def test_split_files_are_coco_format_written_once_and_reused(base):
    splits = caption_splits(*locate_caption_file(base / "kaggle"))
    assert splits.paths["train_images"] == base / "kaggle/Images" and not splits.karpathy
    coco = load_coco(splits.paths["test_annotations"])
    assert len(coco.dataset["images"]) == 18 and len(coco.anns) == 90
    made = splits.paths["train_annotations"].stat().st_mtime_ns
    assert caption_splits(base / "kaggle/captions.txt", base / "kaggle/Images").paths == splits.paths
    assert splits.paths["train_annotations"].stat().st_mtime_ns == made
    assert "captions-csv, 180 images" in splits.summary and "train 144, val 18, test 18" in splits.summary


@pytest.mark.parametrize("content, message", [
    ("hello world\n", r"x.txt: not a caption file: expected COCO.*line 1 is 'hello world'"),
    ("image,caption\na.jpg,a dog\nb.jpg,\n", r"x.txt:3: empty caption for b.jpg"),
    ("image,caption\na.jpg\n", r"x.txt:2: expected 'image,caption'"),
    ("a.jpg#0\ta dog\na.jpg#1\t  \n", r"x.txt:2: empty caption for a.jpg#1"),
    ("a.jpg#0\ta dog\nb.jpg#0\ta cat\na.jpg#0\tagain\n", r"x.txt:3: sentence id a.jpg#0 appears twice"),
    ("a.jpg#0\ta dog\nb.jpg a cat\n", r"x.txt:2: expected 'NAME.jpg#N<TAB>caption'"),
    ('{"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "x", "sentid": 1}]},'
     ' {"filename": "b.jpg", "split": "val", "sentences": [{"raw": "y", "sentid": 1}]}]}',
     r"x.txt: sentence id 1 appears twice"),
    ('{"images": [{"filename": "a.jpg", "split": "dev", "sentences": [{"raw": "x", "sentid": 1}]}]}',
     r"x.txt: image 0 \(a.jpg\) has split 'dev'"),
    ('{"images": [{"filename": "a.jpg", "split": "val", "sentences": [{"raw": " ", "sentid": 1}]}]}',
     r"x.txt: image 0 \(a.jpg\): sentence 0 has an empty caption"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 1, "caption": ""}]}',
     r"x.txt: annotation 0 \(id 1\) has an empty caption"),
    ('{"images": [1, 2', r"x.txt:1: not valid JSON"),
])
def test_malformed_files_are_named_in_one_line(tmp_path, content, message):
    path = tmp_path / "x.txt"
    path.write_text(content)
    with pytest.raises(CaptionFileError, match=message) as error:
        read_captions(path)
    assert "\n" not in str(error.value)


def test_list_naming_an_image_without_captions_and_an_empty_or_wrong_image_folder(base, tmp_path):
    copy = tmp_path / "original"
    shutil.copytree(base / "original", copy)
    listed = (copy / "Flickr_8k.devImages.txt").read_text().splitlines()
    (copy / "Flickr_8k.devImages.txt").write_text("\n".join([*listed, "nowhere.jpg"]) + "\n")
    with pytest.raises(CaptionFileError, match=rf"devImages.txt:{len(listed) + 1}: nowhere.jpg is listed but"):
        assign_splits(read_captions(copy / "Flickr8k.token.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionFileError, match=r"empty: none of the 180 images of the caption file is there"):
        caption_splits(base / "kaggle/captions.txt", tmp_path / "empty")
    with pytest.raises(CaptionFileError, match=r"nope: image folder not found"):
        caption_splits(base / "kaggle/captions.txt", tmp_path / "nope")
    (tmp_path / "tiny.txt").write_text("image,caption\na.jpg,a dog\nb.jpg,a cat\n")
    with pytest.raises(CaptionFileError, match=r"tiny.txt: its val split is empty"):
        caption_splits(tmp_path / "tiny.txt", tmp_path / "empty")


def test_a_coco_run_gives_the_same_vocabulary_and_batches_as_before(base):
    """The COCO path is untouched: on this sample set, the vocabulary, the caption table and an epoch's batches
    hash to what the code before the caption-file readers (commit c1abe19) gave."""
    ann, images = base / "sample/annotations/captions_train.json", base / "sample/images/train"
    split = read_split(ann, images)
    vocab = build_vocabulary(ann, 2, base / "vocab.pkl")
    table = caption_table(split, vocab, np.ones(len(split.image_ids), dtype=bool))
    sampler = BucketBatchSampler(table.lengths, 16, shuffle=True, seed=0)
    sampler.set_epoch(2)
    digest = hashlib.sha256()
    digest.update(json.dumps(vocab.word2idx).encode())
    digest.update(table.tokens.numpy().tobytes())
    digest.update(table.rows.numpy().tobytes())
    digest.update(json.dumps([list(map(int, batch)) for batch in sampler]).encode())
    assert (vocab.fingerprint(), len(vocab)) == ("739805ddf8cef146", 81)
    assert digest.hexdigest() == "ef4e725f6410e69400a42d53848abb0e4a2c46e49d6ef0eefeacf17bb52fcf24"


@pytest.fixture(scope="module")
def trained_on_captions_txt(base, tmp_path_factory) -> Path:
    """A model trained through the CLI on the Kaggle-style copy (captions.txt + Images/)."""
    out = tmp_path_factory.mktemp("captions-model")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vocabulary, "CACHE_DIR", base / "cache")
        code = train.main(["--data", "sample", "--captions", str(base / "kaggle/captions.txt"), "--images",
                           str(base / "kaggle/Images"), "--out-dir", str(out), "--cache-dir", str(base / "features"),
                           *flags])
    assert code == 0
    return out


def test_train_and_evaluate_on_a_captions_txt_dataset(base, trained_on_captions_txt, capsys):
    out = trained_on_captions_txt
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and metrics[-1]["val_loss"] < metrics[0]["train_loss"]
    vocab = vocabulary.Vocabulary.load(out / "vocab.pkl")  # from the training split of captions.txt
    assert {"circle", "triangle"} <= set(vocab.word2idx) and Path(vocab.annotations_file).name == "captions_train.json"
    capsys.readouterr()
    code = evaluate.main(["--models", str(out), "--captions", str(base / "kaggle/captions.txt"), "--images",
                          str(base / "kaggle/Images"), "--split", "test", "--no-java", "--json", "--num-workers", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    scores = json.loads(captured.out)["model"]
    assert {"BLEU-4", "CIDEr", "ROUGE-L"} <= set(scores) and scores["CIDEr"] > 0 and scores["images"] == 18
    assert "split deterministically by image" in captured.err
    code = evaluate.main(["--models", str(out), "--captions", str(base / "kaggle/captions.txt"), "--images",
                          str(base / "kaggle/Images"), "--split", "karpathy-test", "--no-java"])
    assert code == 2 and "captions.txt: has no Karpathy split" in capsys.readouterr().err


def test_karpathy_test_of_a_flickr_folder_and_caption_py_on_a_split(base, trained_on_captions_txt, tmp_path,
                                                                     capsys):
    out = trained_on_captions_txt
    ids, files, references = split_files("karpathy-test", str(base / "karpathy"))
    raw = json.loads((base / "karpathy/dataset_flickr8k.json").read_text())["images"]
    assert sorted(f.name for f in files) == sorted(r["filename"] for r in raw if r["split"] == "test")
    assert all(len(references[i]) == 5 for i in ids)
    code = evaluate.main(["--models", str(out), "--data", "flickr8k", "--root", str(base / "karpathy"), "--split",
                          "karpathy-test", "--no-java", "--num-workers", "0"])
    assert code == 0 and "CIDEr" in capsys.readouterr().out
    results = tmp_path / "results.json"
    weights = [f"--encoder={out / 'encoder-2.pkl'}", f"--decoder={out / 'decoder-2.pkl'}", f"--vocab={out / 'vocab.pkl'}"]
    code = caption.main([*weights, "--data", "flickr8k", "--root", str(base / "karpathy"), "--split", "test",
                         "--json", str(results), "--num-workers", "0"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(printed) == len(ids)
    assert sorted(r["image_id"] for r in json.loads(results.read_text())) == sorted(ids)
    code = caption.main([*weights, "--data", "flickr8k", "--root", str(tmp_path / "none"), "--split", "test"])
    assert code == 2 and "no caption file" in capsys.readouterr().err


def test_prepare_flickr8k_from_the_kaggle_zip_and_from_the_original_two(base, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(prepare_data.FLICKR_IMAGES, "flickr8k", 180)
    kaggle = tmp_path / "archive.zip"
    with zipfile.ZipFile(kaggle, "w") as zf:
        zf.write(base / "kaggle/captions.txt", "captions.txt")
        for image in sorted((base / "kaggle/Images").iterdir()):
            zf.write(image, f"Images/{image.name}")
        zf.writestr("__MACOSX/Images/._x.jpg", b"junk")
    karpathy_zip = tmp_path / "caption_datasets.zip"
    with zipfile.ZipFile(karpathy_zip, "w") as zf:
        zf.write(base / "karpathy/dataset_flickr8k.json", "dataset_flickr8k.json")
    root = tmp_path / "flickr8k"
    assert prepare_data.main(["flickr8k", "--root", str(root), "--from", str(kaggle), "--karpathy",
                              str(karpathy_zip)]) == 0
    output = capsys.readouterr()
    assert len(list((root / "images").iterdir())) == 180 and (root / "dataset_flickr8k.json").is_file()
    assert "laid out 180 images" in output.out and "split as Karpathy's split" in output.out
    assert "warning" not in output.err
    # the original two zips, the Karpathy file left out: the lists beside the token file decide, with a warning
    dataset_zip, text_zip = tmp_path / "Flickr8k_Dataset.zip", tmp_path / "Flickr8k_text.zip"
    with zipfile.ZipFile(dataset_zip, "w") as zf:
        for image in sorted((base / "original/Flicker8k_Dataset").iterdir()):
            zf.write(image, f"Flicker8k_Dataset/{image.name}")
    with zipfile.ZipFile(text_zip, "w") as zf:
        for text in sorted((base / "original").glob("*.txt")):
            zf.write(text, text.name)
    root = tmp_path / "original"
    monkeypatch.setattr(prepare_data, "fetch_karpathy_split", fail_to_fetch)
    assert prepare_data.main(["flickr8k", "--root", str(root), "--from", str(dataset_zip), "--from",
                              str(text_zip)]) == 0
    output = capsys.readouterr()
    assert "split by the Flickr8k lists" in output.out and "warning: no Karpathy split" in output.err
    assert prepare_data.main(["flickr8k", "--root", str(tmp_path / "x"), "--from", str(tmp_path / "missing")]) == 2
    assert "missing: no such file or folder" in capsys.readouterr().err


def fail_to_fetch(*args, **kwargs):
    raise prepare_data.PrepareError("offline")


def test_notebook_config_takes_a_name_or_a_path(base):
    from config import notebook_config

    cfg = notebook_config(str(base / "kaggle"))
    assert cfg.captions == str(base / "kaggle/captions.txt") and cfg.images == str(base / "kaggle/Images")
    assert cfg.out_dir == "models/kaggle" and cfg.data == "captions" and cfg.image_size == 224
    assert notebook_config("sample").out_dir == "models/sample"
    assert notebook_config("flickr8k", decoder="attention").out_dir == "models/flickr8k-attention"


def test_data_flickr8k_trains_from_its_folder_and_flags_are_checked(base, tmp_path, capsys):
    """--data flickr8k reads data/flickr8k (here --data-root) with the flickr8k preset; --captions needs --images."""
    from config import TrainConfig, resolve_config

    cfg = resolve_config(TrainConfig(data="flickr8k"))
    assert (cfg.image_size, cfg.vocab_threshold, cfg.pretrained, cfg.out_dir) == (224, 5, True, "models/flickr8k")
    assert cfg.data_root.endswith("data/flickr8k")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in (TINY | {"epochs": 1, "vocab_threshold": 2}).items()]
    code = train.main(["--data", "flickr8k", "--data-root", str(base / "karpathy"), "--no-pretrained", "--no-mirror",
                       "--out-dir", str(tmp_path / "out"), "--cache-dir", str(base / "features"), *flags])
    assert code == 0 and "split as Karpathy's split" in capsys.readouterr().out
    assert (tmp_path / "out" / "encoder-1.pkl").is_file()
    assert train.main(["--captions", str(base / "kaggle/captions.txt"), "--out-dir", str(tmp_path / "x")]) == 2
    assert "--captions FILE and --images DIR go together" in capsys.readouterr().err
    assert train.main(["--data", "captions"]) == 2
    assert "--data captions: give the caption file" in capsys.readouterr().err
    code = train.main(["--data", "sample", "--captions", str(tmp_path / "none.txt"), "--images", str(tmp_path)])
    assert code == 2 and "none.txt: no such file" in capsys.readouterr().err
