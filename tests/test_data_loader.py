"""Data loader: the bucket sampler's epoch properties, image handling, template API, bad inputs."""

import io
import json
import math
import platform
import re
import struct
import subprocess
import sys
import textwrap
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_loader import (
    BucketBatchSampler,
    coco_image_files,
    dataset_paths,
    get_loader,
    load_coco,
    ready_dataset,
)
from image_io import (
    ImageFileDataset,
    UnreadableImage,
    _decode_jpeg,
    build_transform,
    image_batches,
    load_image,
    resize_side,
    transform_eval,
    transform_train,
)
from sample_data import MARKER
from vocabulary import tokenize

LENGTHS = np.random.default_rng(0).choice([5, 6, 7, 8, 9, 12, 20], size=1003, p=[0.1, 0.2, 0.3, 0.2, 0.1, 0.08, 0.02])


def epoch(sampler, epoch_number=0):
    sampler.set_epoch(epoch_number)
    return list(sampler)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_each_item_once_per_epoch_and_one_length_per_batch(batch_size):
    sampler = BucketBatchSampler(LENGTHS, batch_size, seed=3)
    batches = epoch(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(LENGTHS)))  # every item exactly once, leftovers included
    assert all(len({LENGTHS[i] for i in b}) == 1 for b in batches)
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert len(batches) == len(sampler)


def test_reproducible_and_reshuffled_per_epoch():
    a, b = BucketBatchSampler(LENGTHS, 16, seed=1), BucketBatchSampler(LENGTHS, 16, seed=1)
    assert epoch(a, 0) == epoch(b, 0)
    assert epoch(a, 1) != epoch(a, 0)
    assert epoch(a, 1) == epoch(b, 1)
    assert epoch(BucketBatchSampler(LENGTHS, 16, seed=2), 0) != epoch(a, 0)
    # batch lengths are interleaved, not one bucket after another
    lengths = [LENGTHS[b[0]] for b in epoch(a, 0)]
    assert lengths != sorted(lengths)


def test_resume_skips_consumed_batches():
    sampler = BucketBatchSampler(LENGTHS, 16, seed=1)
    full = epoch(sampler, 4)
    sampler.set_epoch(4, start_batch=5)
    assert list(sampler) == full[5:]
    assert list(sampler) == full  # the skip applies to one pass only


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("batch_size", [16, 50])
def test_distributed_shares_are_disjoint_complete_and_equal(replicas, batch_size):
    shares = [epoch(BucketBatchSampler(LENGTHS, batch_size, seed=5, num_replicas=replicas, rank=r), 2)
              for r in range(replicas)]
    assert len({len(s) for s in shares}) == 1  # same number of steps on every rank: nobody waits forever
    assert all(len(s) == len(BucketBatchSampler(LENGTHS, batch_size, num_replicas=replicas, rank=r))
               for r, s in enumerate(shares))
    flat = [i for s in shares for b in s for i in b]
    assert sorted(flat) == list(range(len(LENGTHS)))  # disjoint and nothing lost
    assert all(len({LENGTHS[i] for i in b}) == 1 for s in shares for b in s)


def test_tiny_dataset_splits_batches_for_ranks():
    shares = [list(BucketBatchSampler([4, 4, 4], 8, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(i for s in shares for b in s for i in b) == [0, 1, 2]
    assert [len(s) for s in shares] == [1, 1, 1]


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_every_rank_gets_the_same_number_of_non_empty_batches_even_from_tiny_sets(replicas):
    """train.py reads batch[0]: a rank must never get an empty batch. Batches are split while they can be; only a set
    too small to split into a multiple of `replicas` batches repeats a few items (replicas - N % replicas)."""
    assert [list(BucketBatchSampler([5, 6, 7], 1, num_replicas=2, rank=r)) for r in range(2)] == [[[2], [1]], [[0], [2]]]
    rng = np.random.default_rng(replicas)
    for trial in range(100):
        lengths = rng.integers(5, 8, size=rng.integers(replicas, 12))
        batch_size = int(rng.integers(1, 4))
        shares = [epoch(BucketBatchSampler(lengths, batch_size, seed=trial, num_replicas=replicas, rank=r))
                  for r in range(replicas)]
        assert {len(s) for s in shares} == {len(BucketBatchSampler(lengths, batch_size, num_replicas=replicas))}
        assert all(len(b) >= 1 and len({lengths[i] for i in b}) == 1 for s in shares for b in s)
        uses = Counter(i for s in shares for b in s for i in b)
        assert set(uses) == set(range(len(lengths)))
        batches = sum(math.ceil(n / batch_size) for n in Counter(lengths.tolist()).values())
        splittable = math.ceil(batches / replicas) * replicas <= len(lengths)
        assert sum(uses.values()) - len(lengths) == (0 if splittable else replicas - len(lengths) % replicas)


def test_get_loader_train_batches(tiny_coco, tmp_path):
    loader = get_loader(
        build_transform(32, train=True), "train", batch_size=4, vocab_threshold=1, vocab_file=str(tmp_path / "v.pkl"),
        vocab_from_file=False, annotations_file=tiny_coco["annotations"], img_folder=tiny_coco["images"],
    )
    seen = 0
    for images, captions in loader:
        assert images.shape[1:] == (3, 32, 32) and images.shape[0] == captions.shape[0]
        assert captions.dtype == torch.long and (captions[:, 0] == 0).all() and (captions[:, -1] == 1).all()
        seen += len(captions)
    assert seen == 5 * tiny_coco["n_images"]
    dataset = loader.dataset
    indices = dataset.get_train_indices()  # the template's API keeps working
    assert len(indices) == 4 and len({dataset.caption_lengths[i] for i in indices}) == 1
    assert (tmp_path / "v.pkl").exists()
    # The template's training loop: a fresh one-length batch from get_train_indices() at every step.
    for _ in range(5):
        indices = dataset.get_train_indices()
        loader.batch_sampler.sampler = torch.utils.data.SubsetRandomSampler(indices)
        _images, captions = next(iter(loader))
        assert len(captions) == 4 and int(captions.shape[1]) == dataset.caption_lengths[indices[0]] + 2
    loader.batch_sampler.sampler = None
    assert sum(len(c) for _, c in loader) == seen
    np.random.seed(0)  # the template draws a length per batch, as often as captions have it: not always one
    assert len({dataset.caption_lengths[dataset.get_train_indices()[0]] for _ in range(30)}) > 1


def test_val_and_test_modes(tiny_coco, tmp_path):
    vocab_file = str(tmp_path / "v.pkl")
    kwargs = {"annotations_file": tiny_coco["annotations"], "img_folder": tiny_coco["images"]}
    get_loader(build_transform(32), "train", vocab_threshold=1, vocab_file=vocab_file, vocab_from_file=False, **kwargs)
    images, _captions, image_ids = next(iter(get_loader(build_transform(32), "val", batch_size=3, vocab_file=vocab_file,
                                                        **kwargs)))
    assert images.shape == (3, 3, 32, 32) and image_ids.shape == (3,)
    test_info = tmp_path / "test_info.json"
    info = json.loads(tiny_coco["annotations"].read_text())
    test_info.write_text(json.dumps({"images": info["images"]}))
    original, image = next(iter(get_loader(build_transform(32), "test", annotations_file=test_info,
                                           img_folder=tiny_coco["images"])))
    assert original.shape == (1, 40, 48, 3) and image.shape == (1, 3, 32, 32)


def test_workers_and_persistent_iterators(tiny_coco, tmp_path):
    loader = get_loader(
        build_transform(32), "train", batch_size=8, vocab_threshold=1, vocab_file=str(tmp_path / "v.pkl"),
        vocab_from_file=False, num_workers=2, annotations_file=tiny_coco["annotations"], img_folder=tiny_coco["images"],
    )
    assert loader.persistent_workers
    counts = []
    for e in range(2):
        loader.batch_sampler.set_epoch(e)
        counts.append(sum(len(c) for _, c in loader))
    assert counts == [60, 60]


def test_grayscale_cmyk_missing_and_corrupt_images(tiny_coco, tmp_path, capsys):
    folder = tiny_coco["images"]
    Image.new("L", (48, 40), 128).save(folder / "img_000000000001.jpg")
    Image.new("CMYK", (48, 40), (0, 255, 255, 0)).save(folder / "img_000000000002.jpg")
    assert load_image(folder / "img_000000000001.jpg").mode == "RGB"
    assert load_image(folder / "img_000000000002.jpg").getpixel((5, 5))[0] > 200  # CMYK red comes out red
    (folder / "img_000000000003.jpg").write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    (folder / "img_000000000004.jpg").unlink()
    loader = get_loader(
        build_transform(32), "train", batch_size=5, vocab_threshold=1, vocab_file=str(tmp_path / "v.pkl"),
        vocab_from_file=False, annotations_file=tiny_coco["annotations"], img_folder=folder,
    )
    seen = sum(len(c) for batch in loader if batch is not None for c in [batch[1]])
    assert seen == 5 * (tiny_coco["n_images"] - 2)  # the two bad images' captions are skipped, not fatal
    assert len(loader.dataset.skipped) == 2
    err = capsys.readouterr().err
    assert err.count("img_000000000003.jpg") == 1 and err.count("img_000000000004.jpg") == 1  # one line each

    _ids, paths = coco_image_files(tiny_coco["annotations"], folder)
    items = [ImageFileDataset(paths, build_transform(32), image_size=32)[i] for i in range(4)]
    assert [ok for _, _, ok in items] == [True, True, False, False]
    assert all(img.shape == (3, 32, 32) for img, _, _ in items)


@pytest.mark.parametrize(
    ("content", "message"),
    [("{broken", "not a COCO-format"), ("[1, 2]", "not a COCO-format"), ('{"annotations": []}', "no 'images' list")],
)
def test_bad_annotation_file(tmp_path, content, message):
    bad = tmp_path / "captions_bad.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=f"captions_bad.json.*{message}"):
        get_loader(build_transform(32), "train", vocab_threshold=1, vocab_file=str(tmp_path / "v.pkl"),
                   vocab_from_file=False, annotations_file=bad, img_folder=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        get_loader(build_transform(32), "train", vocab_threshold=1, vocab_file=str(tmp_path / "v.pkl"),
                   vocab_from_file=False, annotations_file=tmp_path / "nope.json", img_folder=tmp_path)


IMAGE = {"id": 1, "file_name": "a.jpg"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"images": [{"id": 1}]}, "image {'id': 1} needs an int 'id' and a str 'file_name'"),
        ({"images": [{"id": "1", "file_name": "a.jpg"}]}, "image {'id': '1', 'file_name': 'a.jpg'} needs an int 'id'"),
        ({"images": [{"id": 1, "file_name": 5}]}, "needs an int 'id' and a str 'file_name'"),
        ({"images": [{"id": True, "file_name": "a.jpg"}]}, "image {'id': True, 'file_name': 'a.jpg'} needs"),
        ({"images": [IMAGE], "annotations": {"id": 1}}, "'annotations' is not a list of objects"),
        ({"images": [IMAGE], "annotations": [{"id": "c1", "image_id": 1, "caption": "x"}]}, "annotation {'id': 'c1',"),
        ({"images": [IMAGE], "annotations": [{"id": 1, "image_id": 1, "caption": "a box"},
                                             {"id": 123, "image_id": 99, "caption": "a box"}]},
         "annotation 123 refers to image 99, which is not in 'images'"),
        ({"images": [IMAGE], "annotations": [{"id": 7, "caption": "x"}]}, "annotation 7 refers to image None"),
        ({"images": [IMAGE], "annotations": [{"id": 1, "image_id": 1, "caption": "x"}, {"id": 2, "image_id": 1}]},
         "annotation 2 has no caption text"),
        ({"images": [IMAGE], "annotations": [{"id": 3, "image_id": 1, "caption": None}]}, "annotation 3 has no caption"),
    ],
)
def test_inconsistent_annotation_files_are_named_in_one_line(tmp_path, content, message):
    bad = tmp_path / "captions_bad.json"
    bad.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"^{re.escape(str(bad))}: .*{re.escape(message)}"):
        load_coco(bad)


def test_image_lists_and_other_annotation_kinds_still_load(tmp_path):
    """A test split's image list has no annotations, an instances file no captions: both are fine."""
    info = tmp_path / "image_info_test.json"
    info.write_text(json.dumps({"images": [{"id": 2, "file_name": "b.jpg"}, IMAGE]}))
    assert coco_image_files(info, tmp_path) == ([1, 2], [tmp_path / "a.jpg", tmp_path / "b.jpg"])  # id order
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"images": [IMAGE], "annotations": [{"id": 5, "image_id": 1, "bbox": [0, 0, 1, 1]}]}))
    assert load_coco(instances).getAnnIds(imgIds=[1]) == [5]


def test_transform_sizes():
    image = Image.new("RGB", (640, 480))
    assert build_transform()(image).shape == (3, 224, 224)
    assert build_transform(64, train=True)(image).shape == (3, 64, 64)
    assert Counter(type(t).__name__ for t in build_transform(train=True).transforms)["RandomHorizontalFlip"] == 1


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A smooth random RGB picture (JPEG-friendly, unlike pure noise)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.BICUBIC)


def test_reduced_scale_jpeg_decoding_keeps_the_short_side_and_the_picture(tmp_path):
    path = tmp_path / "big.jpg"
    photo((640, 480)).save(path, quality=92)
    full = load_image(path)
    for min_side, expected in ((256, (640, 480)), (200, (320, 240)), (73, (160, 120)), (50, (80, 60))):
        assert load_image(path, min_side).size == expected
        reduced = build_transform(64)(load_image(path, min_side))
        assert (reduced - build_transform(64)(full)).abs().mean() < 0.03  # ImageNet-normalised units
    png = tmp_path / "big.png"
    photo((640, 480)).save(png)
    assert load_image(png, 73).size == (640, 480)  # other formats are decoded whole


@pytest.mark.parametrize("decode_on_device", [False, True], ids=["PIL in workers", "decode_jpeg on the device"])
def test_image_batches_are_the_eval_transform_and_flag_unreadable_files(tiny_coco, decode_on_device, capsys):
    """Both decoding paths (the device one runs torchvision's decode_jpeg on the CPU here, nvJPEG on a GPU) give
    the centre crops of build_transform, in file order, for RGB, grayscale and CMYK JPEGs, PNG data and big
    photos; missing, corrupt and truncated files come out as zero images with ok=False."""
    folder = tiny_coco["images"]
    Image.new("L", (48, 40), 128).save(folder / "img_000000000001.jpg")
    Image.new("CMYK", (48, 40), (0, 255, 255, 0)).save(folder / "img_000000000002.jpg")
    (folder / "img_000000000003.jpg").write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    (folder / "img_000000000004.jpg").unlink()
    photo((640, 480), seed=1).save(folder / "img_000000000005.jpg", quality=92)
    photo((300, 500), seed=2).save(folder / "img_000000000006.jpg", format="PNG")  # PNG data in a .jpg
    whole = (folder / "img_000000000008.jpg").read_bytes()
    (folder / "img_000000000007.jpg").write_bytes(whole[: len(whole) // 2])  # truncated
    _ids, paths = coco_image_files(tiny_coco["annotations"], folder)
    batches = list(image_batches(paths, 32, "cpu", batch_size=5, decode_on_device=decode_on_device))
    assert [len(indices) for _, indices, _ in batches] == [5, 5, 2]
    images, indices, ok = (torch.cat(parts) for parts in zip(*batches, strict=True))
    assert indices.tolist() == list(range(len(paths))) and images.shape == (len(paths), 3, 32, 32)
    unreadable = {2, 3, 6}  # files 3, 4 and 7
    assert ok.tolist() == [i not in unreadable for i in range(len(paths))]
    assert not images[~ok].any()
    for i in np.flatnonzero(ok.numpy()):
        reference = build_transform(32)(load_image(paths[i]))
        assert (images[i] - reference).abs().mean() < 0.03, paths[i].name
    err = capsys.readouterr().err
    assert all(err.count(f"img_00000000000{n}.jpg") == 1 for n in (3, 4, 7)), err  # one line each


def bomb_jpeg(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A small JPEG whose header claims width x height pixels: PIL refuses to open one of over 179 MP."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def test_decompression_bomb_headers_are_unreadable_images(tiny_coco, tmp_path, capsys):
    """A JPEG claiming 30000 x 30000 px makes PIL raise DecompressionBombError (not an OSError): it is skipped and
    counted like any corrupt file, in load_image, on both decoding paths of image_batches and in the dataset."""
    bomb = bomb_jpeg(tmp_path / "bomb.jpg")
    with pytest.raises(UnreadableImage, match="bomb.jpg: image too large to decode"):
        load_image(bomb)
    good = tiny_coco["images"] / "img_000000000001.jpg"
    for decode_on_device in (False, True):
        images, indices, ok = next(image_batches([good, bomb, good], 32, "cpu", decode_on_device=decode_on_device))
        assert indices.tolist() == [0, 1, 2] and ok.tolist() == [True, False, True] and not images[1].any()
    bomb_jpeg(tiny_coco["images"] / "img_000000000002.jpg")
    loader = get_loader(
        build_transform(32), "train", batch_size=5, vocab_threshold=1, vocab_file=str(tmp_path / "v.pkl"),
        vocab_from_file=False, annotations_file=tiny_coco["annotations"], img_folder=tiny_coco["images"],
    )
    assert sum(len(batch[1]) for batch in loader if batch is not None) == 5 * (tiny_coco["n_images"] - 1)
    assert len(loader.dataset.skipped) == 1
    assert capsys.readouterr().err.count("too large to decode") == 3  # each path once, the dataset once


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG decoding needs a CUDA device")


@needs_cuda
def test_gpu_decoding_matches_pil_and_never_waits_for_the_gpu(tiny_coco):
    """On CUDA, image_batches decodes with nvJPEG and resizes on the GPU: the crops match PIL's, and once warm our
    code queues its copies without a host sync (torch's sync debug mode reports any, with the line that made it)."""
    folder = tiny_coco["images"]
    photo((640, 480), seed=1).save(folder / "img_000000000005.jpg", quality=92)
    photo((300, 500), seed=2).save(folder / "img_000000000006.jpg", format="PNG")  # decoded by PIL in the loader
    _ids, paths = coco_image_files(tiny_coco["annotations"], folder)
    list(image_batches(paths, 32, "cuda", batch_size=5))  # warm: mean and std go to the GPU once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            batches = [(images.cpu(), indices, ok) for images, indices, ok in image_batches(paths, 32, "cuda", 5)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"line {w.lineno}: {w.message}" for w in caught if Path(w.filename).name == "image_io.py"]
    assert not syncs
    images, indices, ok = (torch.cat(parts) for parts in zip(*batches, strict=True))
    assert indices.tolist() == list(range(len(paths))) and ok.all()
    for i, path in enumerate(paths):
        assert (images[i] - build_transform(32)(load_image(path))).abs().mean() < 0.03, path.name


@needs_cuda
def test_gpu_decoding_never_overwrites_memory_that_queued_kernels_still_read():
    """pytorch/vision#9606: nvJPEG's hardware engine writes its outputs without waiting for the work queued on the
    stream they were allocated on. Tensors the size of the decoded images, freed while sums that read them wait
    behind a long kernel, must keep their values however often the decoder runs meanwhile."""
    buffer = io.BytesIO()
    photo((640, 480)).save(buffer, "JPEG", quality=92)
    jpeg = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    device = torch.device("cuda", torch.cuda.current_device())
    size = 3 * 480 * 640
    wrong = 0
    for _ in range(20):
        tensors = [torch.ones(size, dtype=torch.uint8, device=device) for _ in range(8)]
        torch.cuda.synchronize()
        torch.cuda._sleep(20_000_000)  # some milliseconds of GPU time ahead of the sums
        sums = [t.sum(dtype=torch.int64) for t in tensors]
        del tensors  # the allocator may hand their memory out again while the sums are still queued
        decoded = _decode_jpeg([jpeg] * 4, device)
        torch.cuda.synchronize()
        wrong += sum(int(total) != size for total in sums)
    assert wrong == 0
    reference = _decode_jpeg(jpeg, torch.device("cpu")).float()
    assert all((image.cpu().float() - reference).abs().mean() < 3 for image in decoded)


def test_resize_side_is_the_seeds_256_for_224():
    assert resize_side(224) == 256 and resize_side(64) == 73


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")
def test_cpu_batches_let_large_tensors_reuse_heap_memory_until_the_end(tmp_path):
    """While image_batches runs on the CPU, a 64 MiB tensor (a ResNet activation's size) comes from the heap and
    the next ones mostly reuse its memory (no mmap, no page zeroing by the kernel); before, each is a fresh mmap;
    at the end the memory kept goes back to the system. Run in a fresh interpreter, whose malloc is untuned."""
    for i in range(6):
        photo((64, 48), seed=i).save(tmp_path / f"{i}.jpg")
    script = textwrap.dedent("""
        import ctypes, json, os, sys, torch
        from pathlib import Path
        from image_io import image_batches

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                "keepcost")]

        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = MallInfo2

        def grows():  # how much mmapped and heap memory a 64 MiB tensor adds while it lives
            before = libc.mallinfo2()
            x = torch.ones(16 << 20)
            after = libc.mallinfo2()
            del x
            return {"mapped": after.hblkhd - before.hblkhd, "heap": after.arena - before.arena}

        def resident():
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        seen = {"before": grows(), "during": []}
        for _ in image_batches(sorted(Path(sys.argv[1]).glob("*.jpg")), 32, "cpu", batch_size=1):
            seen["during"].append(grows())
            seen["resident_during"] = resident()
        seen["resident_after"] = resident()
        print(json.dumps(seen))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["before"]["mapped"] >= 64 << 20
    first, *later = seen["during"]
    assert first["mapped"] == 0 and first["heap"] >= 60 << 20  # a free chunk at the heap's top may make up the rest
    assert all(step["mapped"] == 0 for step in later)
    assert sum(step["heap"] == 0 for step in later) >= len(later) // 2  # mostly the freed block, reused
    assert seen["resident_during"] - seen["resident_after"] >= 48 << 20  # kept while batches ran, then returned


def test_ready_dataset_makes_the_sample_set_once_and_says_how_to_get_coco(tmp_path):
    paths = ready_dataset("sample", tmp_path / "sample")
    train_file = paths["train_annotations"]
    assert train_file.exists() and len(load_coco(train_file).dataset["images"]) > 0
    made = train_file.stat().st_mtime_ns
    assert json.loads((paths["root"] / MARKER).read_text())["params"]["seed"] == 0  # as prepare_data.py does
    assert ready_dataset("sample", tmp_path / "sample") == paths and train_file.stat().st_mtime_ns == made

    with pytest.raises(FileNotFoundError, match=r"captions_train2014.json: missing; run `python prepare_data.py coco "
                                                rf"--root {tmp_path / 'coco'}`"):
        ready_dataset("coco", tmp_path / "coco")


def test_transforms_are_the_seeds_resize_crop_flip_and_imagenet_normalisation():
    """DESIGN.md: transform_train is Resize(256), RandomCrop(224), RandomHorizontalFlip, ToTensor and ImageNet
    Normalize; evaluation crops the centre instead; smaller crops resize to 8/7 of the crop, rounded."""

    def steps(transform):
        return [(type(t).__name__, getattr(t, "size", None)) for t in transform.transforms]

    assert steps(transform_train) == [
        ("Resize", 256),
        ("RandomCrop", (224, 224)),
        ("RandomHorizontalFlip", None),
        ("ToTensor", None),
        ("Normalize", None),
    ]
    assert steps(transform_eval) == [
        ("Resize", 256),
        ("CenterCrop", (224, 224)),
        ("ToTensor", None),
        ("Normalize", None),
    ]
    assert steps(build_transform(32))[:2] == [("Resize", 37), ("CenterCrop", (32, 32))]  # 36.57 rounds up
    normalize = transform_train.transforms[-1]
    assert (tuple(normalize.mean), tuple(normalize.std)) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_dataset_paths_refuse_an_unknown_dataset_name(tmp_path):
    for root in (None, tmp_path):  # with a root given, it must not fall back to the sample layout either
        with pytest.raises(
            ValueError, match=r"unknown dataset 'imagenet': expected one of \['coco', 'flickr30k', 'flickr8k', 'sample', 'sample-spatial'\]"
        ):
            dataset_paths("imagenet", root)


def test_ready_dataset_needs_the_coco_val_annotations_too(tmp_path):
    paths = dataset_paths("coco", tmp_path)
    paths["train_annotations"].parent.mkdir(parents=True)
    paths["train_annotations"].write_text("{}")
    with pytest.raises(
        FileNotFoundError, match=r"captions_val2014.json: missing; run `python prepare_data.py coco"
    ):
        ready_dataset("coco", tmp_path)
    paths["val_annotations"].write_text("{}")
    assert ready_dataset("coco", tmp_path) == paths


def test_a_folder_or_binary_file_as_annotations_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}: not a COCO-format .*IsADirectory"):
        load_coco(tmp_path)
    binary = tmp_path / "captions.json"
    binary.write_bytes(b"{\x80\x81\xfe")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(binary))}: not a COCO-format annotation file"):
        load_coco(binary)


def test_an_image_list_cannot_feed_train_or_val_mode(tiny_coco, tmp_path):
    vocab_file = str(tmp_path / "v.pkl")
    get_loader(
        build_transform(32),
        "train",
        vocab_threshold=1,
        vocab_file=vocab_file,
        vocab_from_file=False,
        annotations_file=tiny_coco["annotations"],
        img_folder=tiny_coco["images"],
    )
    info = tmp_path / "image_info.json"
    info.write_text(json.dumps({"images": json.loads(tiny_coco["annotations"].read_text())["images"]}))
    for mode in ("train", "val"):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(info))}: has no caption .* in {mode} mode"):
            get_loader(
                build_transform(32),
                mode,
                vocab_file=vocab_file,
                annotations_file=info,
                img_folder=tiny_coco["images"],
            )


def unshuffled_batches(lengths, batch_size: int) -> list[list[int]]:
    """Buckets by increasing length, indices in increasing order, cut into batches: the unshuffled order."""
    batches = []
    for length in sorted(set(lengths)):
        indices = [i for i, n in enumerate(lengths) if n == length]
        batches += [indices[k : k + batch_size] for k in range(0, len(indices), batch_size)]
    return batches


def test_unshuffled_batches_keep_length_and_index_order_in_every_epoch():
    sampler = BucketBatchSampler(LENGTHS, 16, shuffle=False, seed=4)
    assert epoch(sampler, 0) == unshuffled_batches(LENGTHS.tolist(), 16) == epoch(sampler, 3)


def test_val_items_pair_each_caption_with_its_own_image_and_image_id_in_a_fixed_order(tiny_coco, tmp_path):
    """Val mode (image, caption ids, image id): the image file of the caption's own annotation, that caption's
    ids and its image id; batches unshuffled, unlike train mode's."""
    vocab_file = str(tmp_path / "v.pkl")
    kwargs = {"annotations_file": tiny_coco["annotations"], "img_folder": tiny_coco["images"]}
    transform = build_transform(32)
    train = get_loader(
        transform,
        "train",
        batch_size=3,
        vocab_threshold=1,
        vocab_file=vocab_file,
        vocab_from_file=False,
        **kwargs,
    )
    loader = get_loader(transform, "val", batch_size=3, vocab_file=vocab_file, **kwargs)
    dataset = loader.dataset
    assert len(dataset) == 5 * tiny_coco["n_images"]
    for index, annotation_id in enumerate(dataset.ids):
        annotation = dataset.coco.anns[annotation_id]
        image, caption, image_id = dataset[index]
        assert image_id == annotation["image_id"]
        assert caption.tolist() == dataset.vocab.encode(tokenize(annotation["caption"]))
        file_name = dataset.coco.imgs[image_id]["file_name"]
        assert torch.equal(image, transform(load_image(tiny_coco["images"] / file_name))), index
    lengths = [len(c) for c in dataset.caption_ids]
    assert list(loader.batch_sampler) == unshuffled_batches(lengths, 3)
    assert list(train.batch_sampler) != unshuffled_batches(lengths, 3)
    _images, _captions, image_ids = next(iter(loader))
    first = unshuffled_batches(lengths, 3)[0]
    assert image_ids.tolist() == [dataset.coco.anns[dataset.ids[i]]["image_id"] for i in first]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"num_replicas": 2, "rank": 2}, r"rank 2 is not in \[0, 2\)"),
        ({"num_replicas": 2, "rank": -1}, r"rank -1 is not in \[0, 2\)"),
        ({"num_replicas": 4, "rank": 3}, "3 items cannot be shared among 4 ranks"),
    ],
)
def test_bucket_sampler_refuses_settings_that_cannot_make_an_epoch(settings, message):
    with pytest.raises(ValueError, match=message):
        BucketBatchSampler([5, 6, 7], **{"batch_size": 2, **settings})


def test_test_mode_yields_every_listed_image_shuffled_by_default_as_in_the_template(tiny_coco, tmp_path):
    folder = tiny_coco["images"]
    Image.new("L", (48, 40), 100).save(folder / "img_000000000001.jpg")  # unlike every other image
    images = json.loads(tiny_coco["annotations"].read_text())["images"][::-1]
    info = tmp_path / "image_info.json"
    info.write_text(json.dumps({"images": images}))
    kwargs = {"annotations_file": info, "img_folder": folder}
    loader = get_loader(build_transform(32), "test", shuffle=False, **kwargs)
    originals = [original[0].numpy() for original, _image in loader]
    assert len(originals) == len(images)
    assert all(  # in the file's order: the grayscale image comes last
        np.array_equal(a, np.array(load_image(folder / image["file_name"])))
        for a, image in zip(originals, images, strict=True)
    )
    assert isinstance(
        get_loader(build_transform(32), "test", **kwargs).sampler, torch.utils.data.RandomSampler
    )


def test_val_mode_reads_the_train_vocabulary_and_never_writes_one(tiny_coco, tmp_path):
    """Val mode must not build a vocabulary from the val captions: not when the file is missing (an error),
    not when vocab_from_file=False is passed (ignored): that would overwrite the train vocabulary."""
    vocab_file = tmp_path / "vocab.pkl"
    kwargs = {"img_folder": tiny_coco["images"], "vocab_threshold": 1, "vocab_file": str(vocab_file)}
    with pytest.raises(
        FileNotFoundError, match=f"{re.escape(str(vocab_file))}: val mode needs the vocabulary"
    ):
        get_loader(build_transform(32), "val", annotations_file=tiny_coco["annotations"], **kwargs)
    assert not vocab_file.exists()
    get_loader(
        build_transform(32),
        "train",
        vocab_from_file=False,
        annotations_file=tiny_coco["annotations"],
        **kwargs,
    )
    saved = vocab_file.read_bytes()
    val = json.loads(tiny_coco["annotations"].read_text())
    for annotation in val["annotations"]:
        annotation["caption"] = "a purple triangle"
    val_file = tmp_path / "captions_val.json"
    val_file.write_text(json.dumps(val))
    dataset = get_loader(
        build_transform(32), "val", vocab_from_file=False, annotations_file=val_file, **kwargs
    ).dataset
    assert vocab_file.read_bytes() == saved and "purple" not in dataset.vocab.word2idx


def test_get_loader_passes_seed_ranks_and_pinning_on(tiny_coco, tmp_path):
    """train.py's image path shards with get_loader(seed=, num_replicas=, rank=, pin_memory=)."""
    vocab_file = str(tmp_path / "v.pkl")
    kwargs = {
        "annotations_file": tiny_coco["annotations"],
        "img_folder": tiny_coco["images"],
        "vocab_file": vocab_file,
    }
    get_loader(build_transform(32), "train", vocab_threshold=1, vocab_from_file=False, **kwargs)
    shares = []
    for rank in range(2):
        loader = get_loader(
            build_transform(32),
            "train",
            batch_size=4,
            seed=7,
            num_replicas=2,
            rank=rank,
            pin_memory=True,
            **kwargs,
        )
        lengths = [len(c) for c in loader.dataset.caption_ids]
        shares.append(list(loader.batch_sampler))
        assert shares[-1] == list(BucketBatchSampler(lengths, 4, seed=7, num_replicas=2, rank=rank))
        assert loader.pin_memory
    assert sorted(i for share in shares for batch in share for i in batch) == list(
        range(5 * tiny_coco["n_images"])
    )


def test_building_a_vocabulary_without_a_threshold_fails_before_anything_is_read(tmp_path):
    with pytest.raises(
        ValueError, match=r"^to build a vocabulary \(vocab_from_file=False\) give vocab_threshold$"
    ):
        get_loader(
            build_transform(32),
            "train",
            vocab_from_file=False,
            vocab_file=str(tmp_path / "v.pkl"),
            annotations_file=tmp_path / "not_read.json",
            img_folder=tmp_path,
        )


def test_a_batch_of_only_unreadable_images_comes_out_as_none(tiny_coco, tmp_path, capsys):
    (tiny_coco["images"] / "img_000000000004.jpg").unlink()
    loader = get_loader(
        build_transform(32),
        "train",
        batch_size=1,
        vocab_threshold=1,
        vocab_file=str(tmp_path / "v.pkl"),
        vocab_from_file=False,
        annotations_file=tiny_coco["annotations"],
        img_folder=tiny_coco["images"],
    )
    batches = list(loader)
    assert len(batches) == 5 * tiny_coco["n_images"] and sum(batch is None for batch in batches) == 5
    assert capsys.readouterr().err.count("img_000000000004.jpg: file not found") == 1
