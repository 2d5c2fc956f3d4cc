"""prepare_data.py against a real HTTP server on 127.0.0.1 serving small zips shaped like COCO's."""

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import types
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import prepare_data

IMAGE_COUNTS = {"train2014": 3, "val2014": 2, "test2014": 2}
FAST = ["--backoff", "0.01", "--retries", "2"]


def tiny_jpeg(seed: int) -> bytes:
    """A real 8x8 JPEG whose colour depends on seed."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40 % 256, 80, 160)).save(buffer, "JPEG")
    return buffer.getvalue()


def make_zip(files: dict[str, bytes]) -> bytes:
    """A zip archive holding files (member name -> bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def coco_json(split: str, with_annotations: bool = True) -> bytes:
    """A small COCO-style caption file for split."""
    count = IMAGE_COUNTS[split]
    data = {"images": [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg"} for i in range(count)]}
    if with_annotations:
        data["annotations"] = [{"id": i, "image_id": i, "caption": "A cat on a mat."} for i in range(count)]
    return json.dumps(data).encode()


def make_archives() -> dict[str, bytes]:
    """The six downloads, small, with the same member layout as the real ones."""
    images = {
        split: make_zip({f"{split}/COCO_{split}_{i:012d}.jpg": tiny_jpeg(i) for i in range(count)})
        for split, count in IMAGE_COUNTS.items()
    }
    karpathy = {"images": [{"filename": "COCO_val2014_000000000000.jpg", "split": "test"}], "dataset": "coco"}
    return {
        "annotations_trainval2014.zip": make_zip({
            "annotations/captions_train2014.json": coco_json("train2014"),
            "annotations/captions_val2014.json": coco_json("val2014"),
            "annotations/instances_val2014.json": coco_json("val2014"),
        }),
        "image_info_test2014.zip": make_zip({
            "annotations/image_info_test2014.json": coco_json("test2014", with_annotations=False),
        }),
        "caption_datasets.zip": make_zip({
            "dataset_coco.json": json.dumps(karpathy).encode(),
            "dataset_flickr8k.json": b'{"images": []}',
            "readme.txt": b"not wanted",
        }),
        **{f"{split}.zip": data for split, data in images.items()},
    }


class Server:
    """Files served over HTTP with Range support; records requests and can fail on purpose."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []  # (file name, Range header)
        self.drop_once: set[str] = set()  # names whose first response stops half way
        self.status: dict[str, int] = {}  # names answered with this HTTP status instead
        self.ignore_range: set[str] = set()  # names always answered 200 with the whole file
        self.shift_range: set[str] = set()  # names whose 206 answers start 10 bytes before the byte asked for
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def names(self) -> list[str]:
        """The file names requested so far, in order."""
        return [name for name, _ in self.requests]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append((name, self.headers.get("Range")))
                if name in server.status:
                    self.send_error(server.status[name])
                    return
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and name not in server.ignore_range:
                    start = max(0, int(match.group(1)) - 10 * (name in server.shift_range))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if name in server.drop_once:
                    server.drop_once.discard(name)
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        return Handler


@pytest.fixture
def archives() -> dict[str, bytes]:
    return make_archives()


@pytest.fixture
def server(archives):
    server = Server(archives)
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def small_tables(monkeypatch, archives):
    """Point the module's tables at the small archives: exact sizes, md5 for the image zips."""
    table = []
    for archive in prepare_data.ARCHIVES:
        data = archives[archive.name]
        md5 = hashlib.md5(data).hexdigest() if archive.group == "images" else None
        table.append(dataclasses.replace(archive, size=len(data), md5=md5, unpacked_bytes=1000))
    monkeypatch.setattr(prepare_data, "ARCHIVES", tuple(table))
    monkeypatch.setattr(prepare_data, "EXPECTED_IMAGES", dict(IMAGE_COUNTS))
    monkeypatch.delenv("COCO_BASE_URL", raising=False)


def run(*argv: str) -> int:
    return prepare_data.main(["coco", *argv])


def test_full_run_produces_layout_and_rerun_downloads_nothing(tmp_path, server, small_tables, capsys):
    root = tmp_path / "coco"
    assert run("--root", str(root), "--base-url", server.url, *FAST) == 0
    for split, count in IMAGE_COUNTS.items():
        images = sorted((root / "images" / split).glob("*.jpg"))
        assert len(images) == count
        Image.open(images[0]).verify()
    annotations = root / "annotations"
    assert json.loads((annotations / "captions_train2014.json").read_text())["annotations"]
    assert (annotations / "instances_val2014.json").is_file()  # the other files of the zip come along
    assert "images" in json.loads((annotations / "image_info_test2014.json").read_text())
    assert json.loads((annotations / "dataset_coco.json").read_text())["dataset"] == "coco"
    assert (annotations / "dataset_flickr8k.json").is_file()  # for `prepare_data.py flickr8k` later
    assert not (annotations / "readme.txt").exists()
    assert sorted(server.names()) == sorted(server.files)
    leftovers = [p.name for p in (root / "downloads").iterdir() if not p.name.endswith(".zip.done")]
    assert leftovers == []  # zips removed after unpacking, no .part or .tmp left
    assert prepare_data.check_coco(root) == []
    assert f"{root}: complete" in capsys.readouterr().out

    server.requests.clear()
    assert run("--root", str(root), "--base-url", server.url, *FAST) == 0
    assert server.requests == []
    assert "already unpacked" in capsys.readouterr().out


def test_only_annotations_and_env_base_url(tmp_path, server, small_tables, monkeypatch):
    monkeypatch.setenv("COCO_BASE_URL", server.url)
    root = tmp_path / "coco"
    prepare_data.prepare_coco(root, only="annotations", backoff=0.01)
    assert sorted(server.names()) == ["annotations_trainval2014.zip", "caption_datasets.zip",
                                      "image_info_test2014.zip"]
    assert not (root / "images").exists()
    assert prepare_data.check_coco(root, only="annotations") == []
    assert len(prepare_data.check_coco(root)) == 3  # all three image folders missing


def test_interrupted_download_resumes_with_range(tmp_path, server, archives):
    server.drop_once.add("val2014.zip")
    data = archives["val2014.zip"]
    dest = tmp_path / "val2014.zip"
    prepare_data.download(f"{server.url}/val2014.zip", dest, len(data), hashlib.md5(data).hexdigest(),
                          retries=2, backoff=0.01)
    assert dest.read_bytes() == data
    assert not dest.with_name("val2014.zip.part").exists()
    (first, first_range), (second, second_range) = server.requests
    assert first == second == "val2014.zip"
    assert first_range is None
    assert second_range == f"bytes={len(data) // 2}-"


def test_leftover_part_file_from_an_earlier_run_is_resumed(tmp_path, server, archives):
    data = archives["train2014.zip"]
    dest = tmp_path / "train2014.zip"
    dest.with_name("train2014.zip.part").write_bytes(data[:100])
    prepare_data.download(f"{server.url}/train2014.zip", dest, len(data), retries=0)
    assert dest.read_bytes() == data
    assert server.requests == [("train2014.zip", "bytes=100-")]


def test_part_file_already_complete_with_unknown_size(tmp_path, server, archives):
    data = archives["caption_datasets.zip"]
    dest = tmp_path / "caption_datasets.zip"
    dest.with_name("caption_datasets.zip.part").write_bytes(data)
    prepare_data.download(f"{server.url}/caption_datasets.zip", dest, retries=0)
    assert dest.read_bytes() == data
    # answered with 416 and the total size, so nothing is fetched again
    assert server.requests == [("caption_datasets.zip", f"bytes={len(data)}-")]


def test_md5_mismatch_removes_the_file(tmp_path, server):
    dest = tmp_path / "val2014.zip"
    with pytest.raises(prepare_data.PrepareError, match="md5"):
        prepare_data.download(f"{server.url}/val2014.zip", dest, md5="0" * 32, retries=0)
    assert list(tmp_path.iterdir()) == []


def test_size_mismatch_is_refused_before_downloading(tmp_path, server):
    with pytest.raises(prepare_data.PrepareError, match="expected 5"):
        prepare_data.download(f"{server.url}/val2014.zip", tmp_path / "val2014.zip", 5, retries=0)
    assert not (tmp_path / "val2014.zip").exists()


def test_server_size_disagreeing_with_the_table_is_refused_before_writing(tmp_path, server, archives):
    data = archives["val2014.zip"]
    url, part = f"{server.url}/val2014.zip", tmp_path / "val2014.zip.part"
    part.write_bytes(data[:100])
    with pytest.raises(prepare_data.PrepareError) as error:
        prepare_data.download(url, tmp_path / "val2014.zip", len(data) + 1000, retries=0)
    assert str(error.value) == f"{url}: the server has {len(data):,} bytes, expected {len(data) + 1000:,}"
    assert part.read_bytes() == data[:100]  # nothing of the body was appended
    assert server.requests == [("val2014.zip", "bytes=100-")]


def test_existing_dest_of_the_wrong_size_is_downloaded_again(tmp_path, server, archives):
    data = archives["val2014.zip"]
    dest = tmp_path / "val2014.zip"
    dest.write_bytes(data[:-1])
    prepare_data.download(f"{server.url}/val2014.zip", dest, len(data), retries=0)
    assert dest.read_bytes() == data
    assert server.requests == [("val2014.zip", None)]
    prepare_data.download(f"{server.url}/val2014.zip", dest, len(data), retries=0)
    assert len(server.requests) == 1  # now of the right size: kept as it is


def test_part_file_larger_than_expected_is_discarded(tmp_path, server, archives):
    data = archives["val2014.zip"]
    dest = tmp_path / "val2014.zip"
    dest.with_name("val2014.zip.part").write_bytes(data + b"stale tail")
    prepare_data.download(f"{server.url}/val2014.zip", dest, len(data), retries=0)
    assert dest.read_bytes() == data
    assert server.requests == [("val2014.zip", None)]


def test_refused_resume_with_another_total_starts_over(tmp_path, server, archives):
    """Size unknown, the .part is longer than the file: 416 with another total, so the .part goes."""
    data = archives["caption_datasets.zip"]
    dest = tmp_path / "caption_datasets.zip"
    dest.with_name("caption_datasets.zip.part").write_bytes(data + b"stale tail")
    prepare_data.download(f"{server.url}/caption_datasets.zip", dest, retries=1, backoff=0)
    assert dest.read_bytes() == data
    name = "caption_datasets.zip"
    assert server.requests == [(name, f"bytes={len(data) + 10}-"), (name, None)]


@pytest.mark.parametrize("size_known", [True, False])
def test_server_ignoring_range_gets_the_whole_file_written_afresh(tmp_path, server, archives, size_known):
    server.ignore_range.add("train2014.zip")
    data = archives["train2014.zip"]
    dest = tmp_path / "train2014.zip"
    dest.with_name("train2014.zip.part").write_bytes(data[:100])
    prepare_data.download(f"{server.url}/train2014.zip", dest, len(data) if size_known else None, retries=0)
    assert dest.read_bytes() == data
    assert server.requests == [("train2014.zip", "bytes=100-")]


def test_a_resume_answered_from_another_byte_is_discarded_not_appended(tmp_path, server, archives, capsys):
    """A 206 from another byte than asked (a broken proxy) would leave a file with a repeated stretch inside: the part
    is dropped and the file fetched whole, also where no size or md5 could catch the damage."""
    server.shift_range.add("train2014.zip")
    data = archives["train2014.zip"]
    dest = tmp_path / "train2014.zip"
    dest.with_name("train2014.zip.part").write_bytes(data[:100])
    prepare_data.download(f"{server.url}/train2014.zip", dest, retries=1, backoff=0)
    assert dest.read_bytes() == data
    assert server.requests == [("train2014.zip", "bytes=100-"), ("train2014.zip", None)]
    assert "resumed at another byte than 100; starting over" in capsys.readouterr().err


def test_transient_errors_are_retried_a_bounded_number_of_times(tmp_path, server, small_tables, capsys):
    server.status["annotations_trainval2014.zip"] = 503
    assert run("--root", str(tmp_path), "--base-url", server.url, "--only", "annotations", *FAST) == 2
    assert server.names() == ["annotations_trainval2014.zip"] * 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "retrying" in line]) == 2
    assert err[-1].startswith("error: ") and "503" in err[-1] and "3 attempts" in err[-1]


def test_404_is_a_clear_error(tmp_path, server, small_tables, capsys):
    del server.files["image_info_test2014.zip"]
    assert run("--root", str(tmp_path), "--base-url", server.url, "--only", "annotations", *FAST) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"error: {server.url}/image_info_test2014.zip: HTTP 404 Not Found"
    assert "Traceback" not in err
    assert server.names().count("image_info_test2014.zip") == 1  # a 404 is not retried
    assert not list((tmp_path / "downloads").glob("image_info_test2014.zip*"))


def test_corrupt_zip_is_removed_and_downloaded_again(tmp_path, server, small_tables, archives, capsys):
    good = archives["caption_datasets.zip"]
    bad = good[:50] + bytes([good[50] ^ 0xFF]) + good[51:]  # one byte of dataset_coco.json flipped: bad CRC
    server.files["caption_datasets.zip"] = bad
    root = tmp_path / "coco"
    assert run("--root", str(root), "--base-url", server.url, "--only", "annotations", *FAST) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "caption_datasets.zip: not a valid zip file" in err and "run again" in err
    assert not list((root / "downloads").glob("caption_datasets.zip*"))
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]  # the half-written member is gone

    server.files["caption_datasets.zip"] = good
    server.requests.clear()
    assert run("--root", str(root), "--base-url", server.url, "--only", "annotations", *FAST) == 0
    assert server.names() == ["caption_datasets.zip"]
    assert (root / "annotations" / "dataset_coco.json").is_file()


@pytest.mark.parametrize("damage", ["marker records another md5", "unpacked folder deleted"])
def test_rerun_unpacks_again_what_no_longer_matches(tmp_path, server, small_tables, archives, damage):
    root = tmp_path / "coco"
    assert run("--root", str(root), "--base-url", server.url, "--only", "images", *FAST) == 0
    marker, folder = root / "downloads" / "val2014.zip.done", root / "images" / "val2014"
    if damage == "marker records another md5":
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "md5": "0" * 32}))
    else:
        shutil.rmtree(folder)
    server.requests.clear()
    assert run("--root", str(root), "--base-url", server.url, "--only", "images", *FAST) == 0
    assert server.names() == ["val2014.zip"]
    assert len(list(folder.glob("*.jpg"))) == IMAGE_COUNTS["val2014"]
    assert json.loads(marker.read_text())["md5"] == hashlib.md5(archives["val2014.zip"]).hexdigest()


def test_zip_members_cannot_escape_the_root(tmp_path, server, small_tables, monkeypatch):
    server.files["image_info_test2014.zip"] = make_zip({"annotations/../../evil.json": b"{}"})
    table = [dataclasses.replace(a, size=None) for a in prepare_data.ARCHIVES]
    monkeypatch.setattr(prepare_data, "ARCHIVES", tuple(table))
    root = tmp_path / "a" / "coco"
    with pytest.raises(prepare_data.PrepareError, match="unsafe path"):
        prepare_data.prepare_coco(root, only="annotations", base_url=server.url, backoff=0.01)
    assert not list(tmp_path.rglob("evil.json"))
    assert not (root / "downloads" / "image_info_test2014.zip").exists()


def test_folders_symlinked_to_another_disk_are_unpacked_into(tmp_path, server, small_tables):
    """A user who linked annotations/ and images/train2014/ to a bigger disk gets the files there."""
    root, disk = tmp_path / "coco", tmp_path / "disk2"
    (disk / "annotations").mkdir(parents=True)
    (disk / "train2014").mkdir()
    (root / "images").mkdir(parents=True)
    (root / "annotations").symlink_to(disk / "annotations", target_is_directory=True)
    (root / "images" / "train2014").symlink_to(disk / "train2014", target_is_directory=True)
    assert run("--root", str(root), "--base-url", server.url, *FAST) == 0
    assert (root / "annotations").is_symlink() and (root / "images" / "train2014").is_symlink()
    assert json.loads((disk / "annotations" / "captions_train2014.json").read_text())["annotations"]
    assert (disk / "annotations" / "dataset_coco.json").is_file()
    assert len(list((disk / "train2014").glob("*.jpg"))) == IMAGE_COUNTS["train2014"]
    assert prepare_data.check_coco(root) == []


@pytest.mark.parametrize("member", ["../evil.json", "annotations/../../evil.json", "ABSOLUTE"])
def test_escaping_members_are_refused_even_through_a_symlinked_folder(tmp_path, member):
    root, disk = tmp_path / "coco", tmp_path / "disk2"
    (disk / "annotations").mkdir(parents=True)
    root.mkdir()
    (root / "annotations").symlink_to(disk / "annotations", target_is_directory=True)
    member = str(tmp_path / "evil.json") if member == "ABSOLUTE" else member
    archive = tmp_path / "bad.zip"
    archive.write_bytes(make_zip({"annotations/ok.json": b"{}", member: b"{}"}))
    with pytest.raises(prepare_data.PrepareError, match="unsafe path in zip"):
        prepare_data.extract_zip(archive, root)
    assert not list(tmp_path.rglob("evil.json"))
    assert (disk / "annotations" / "ok.json").read_bytes() == b"{}"  # the symlinked folder itself is fine


def test_check_complete_and_incomplete_trees(tmp_path, server, small_tables, capsys):
    root = tmp_path / "coco"
    assert run("--root", str(root), "--check") == 2
    out = capsys.readouterr().out
    assert f"{root / 'images' / 'train2014'}: missing (expected 3 images)" in out
    assert f"{root / 'annotations' / 'dataset_coco.json'}: missing" in out
    assert "7 problems" in out

    assert run("--root", str(root), "--base-url", server.url, *FAST) == 0
    capsys.readouterr()
    assert run("--root", str(root), "--check") == 0
    assert f"{root}: complete" in capsys.readouterr().out

    next((root / "images" / "val2014").glob("*.jpg")).unlink()
    (root / "annotations" / "captions_val2014.json").write_text('{"images": [')
    (root / "annotations" / "image_info_test2014.json").write_text('{"info": {}}')
    assert prepare_data.check_coco(root) == [
        f"{root / 'images' / 'val2014'}: 1 of 2 images",
        f"{root / 'annotations' / 'captions_val2014.json'}: not valid JSON "
        "(Expecting value: line 1 column 13 (char 12))",
        f"{root / 'annotations' / 'image_info_test2014.json'}: no 'images' key",
    ]
    assert run("--root", str(root), "--check") == 2


def test_check_counts_only_jpg_files(tmp_path, small_tables):
    root = tmp_path / "coco"
    for split, count in IMAGE_COUNTS.items():
        folder = root / "images" / split
        folder.mkdir(parents=True)
        for i in range(count):
            (folder / f"COCO_{split}_{i:012d}.{'JPG' if i == 0 else 'jpg'}").write_bytes(tiny_jpeg(i))
        (folder / "notes.txt").write_text("not an image")
    val = root / "images" / "val2014"
    (val / "COCO_val2014_000000000001.jpg").rename(val / "COCO_val2014_000000000001.jpg.part")
    assert prepare_data.check_coco(root, only="images") == [f"{val}: 1 of 2 images"]


def test_disk_space_is_checked_before_downloading(tmp_path, server, small_tables, monkeypatch, capsys):
    table = [dataclasses.replace(a, unpacked_bytes=10**18) for a in prepare_data.ARCHIVES]
    monkeypatch.setattr(prepare_data, "ARCHIVES", tuple(table))
    assert run("--root", str(tmp_path), "--base-url", server.url, *FAST) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not enough disk space" in err[0] and "GB short" in err[0]
    assert server.requests == []


def test_disk_space_need_and_shortfall(tmp_path, small_tables):
    archives = list(prepare_data.ARCHIVES)
    sizes = [a.size for a in archives]
    unpacked = 1000 * len(archives)
    assert prepare_data.bytes_needed(tmp_path, archives) == unpacked + max(sizes)
    assert prepare_data.bytes_needed(tmp_path, archives, keep_archives=True) == unpacked + sum(sizes)
    prepare_data.ensure_disk_space(tmp_path, needed=10 * 10**9, free=11 * 10**9)
    shortfall = r"need about 30.0 GB, 12.5 GB free \(17.5 GB short\)"
    with pytest.raises(prepare_data.PrepareError, match=shortfall):
        prepare_data.ensure_disk_space(tmp_path, needed=30 * 10**9, free=12_500_000_000)


def test_disk_space_need_counts_only_bytes_still_to_download(tmp_path, small_tables, archives):
    table = list(prepare_data.ARCHIVES)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "train2014.zip.part").write_bytes(archives["train2014.zip"][:100])
    (tmp_path / "downloads" / "val2014.zip").write_bytes(archives["val2014.zip"])
    rest = {a.name: a.size for a in table}
    rest |= {"train2014.zip": len(archives["train2014.zip"]) - 100, "val2014.zip": 0}
    unpacked = 1000 * len(table)
    assert prepare_data.bytes_needed(tmp_path, table, keep_archives=True) == unpacked + sum(rest.values())
    assert prepare_data.bytes_needed(tmp_path, table) == unpacked + max(rest.values())


def test_cocoapi_layout_links_instead_of_copying(tmp_path, server, small_tables):
    root = tmp_path / "coco"
    assert run("--root", str(root), "--base-url", server.url, "--cocoapi-layout", *FAST) == 0
    cocoapi = root / "cocoapi"
    assert (cocoapi / "images").is_symlink() and (cocoapi / "annotations").is_symlink()
    assert len(list((cocoapi / "images" / "train2014").glob("*.jpg"))) == 3
    assert json.loads((cocoapi / "annotations" / "captions_train2014.json").read_text())["images"]
    server.requests.clear()
    assert run("--root", str(root), "--base-url", server.url, "--cocoapi-layout", *FAST) == 0
    assert server.requests == []


@pytest.mark.parametrize("existing", ["folder", "link elsewhere", "dangling link"])
def test_cocoapi_layout_refuses_to_replace_something_else(tmp_path, existing):
    root = tmp_path / "coco"
    link = root / "cocoapi" / "images"
    link.parent.mkdir(parents=True)
    if existing == "folder":
        link.mkdir()
    else:
        (tmp_path / "elsewhere").mkdir()
        target = tmp_path / ("elsewhere" if existing == "link elsewhere" else "gone")
        link.symlink_to(target, target_is_directory=True)
    before = os.readlink(link) if link.is_symlink() else "folder"
    message = re.escape(f"{link}: already exists and is not a link")
    with pytest.raises(prepare_data.PrepareError, match=message):
        prepare_data.link_cocoapi_layout(root)
    assert (os.readlink(link) if link.is_symlink() else "folder" if link.is_dir() else None) == before


def test_bad_base_url_is_one_line(tmp_path, small_tables, capsys):
    assert run("--root", str(tmp_path), "--base-url", "ftp://example.org/coco") == 2
    err = capsys.readouterr().err
    assert err == "error: base URL must start with http:// or https://: 'ftp://example.org/coco'\n"


@pytest.mark.parametrize(("argv", "message"), [
    (["sample", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["sample", "--seed", "1.5"], "argument --seed: expected a whole number >= 0, got '1.5'"),
    (["coco", "--retries", "-1"], "argument --retries: must be >= 0, got -1"),
    (["coco", "--backoff", "-0.5"], "argument --backoff: must be a finite number >= 0, got '-0.5'"),
    (["coco", "--backoff", "nan"], "argument --backoff: must be a finite number >= 0, got 'nan'"),
    (["coco", "--backoff", "soon"], "argument --backoff: expected a number >= 0, got 'soon'"),
])
def test_bad_numbers_on_the_command_line_exit_2_before_doing_anything(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare_data.main([*argv, "--root", str(tmp_path / "data")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].endswith(f"error: {message}")
    assert not (tmp_path / "data").exists()


def test_bad_seed_from_the_shell_is_one_error_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "prepare_data.py", "sample", "--seed", "-1", "--root", str(tmp_path)],
                            capture_output=True, text=True, cwd=Path(prepare_data.__file__).parent)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("error: argument --seed: must be >= 0, got -1")
    assert "Traceback" not in result.stderr


def test_download_refuses_negative_retries(tmp_path):
    with pytest.raises(ValueError, match="retries and backoff must be >= 0"):
        prepare_data.download("http://127.0.0.1:9/x.zip", tmp_path / "x.zip", retries=-1)


def test_sample_subcommand_calls_make_sample_dataset(tmp_path, monkeypatch, capsys):
    calls = []
    module = types.ModuleType("sample_data")
    module.make_sample_dataset = lambda root, seed=0: calls.append((root, seed)) or {"root": str(root)}
    monkeypatch.setitem(sys.modules, "sample_data", module)
    assert prepare_data.main(["sample", "--root", str(tmp_path / "s"), "--seed", "3"]) == 0
    assert calls == [(tmp_path / "s", 3)]
    assert capsys.readouterr().out.strip() == str({"root": str(tmp_path / "s")})


def test_sample_spatial_flag_asks_for_the_spatial_variant_at_its_own_default_root(tmp_path, monkeypatch, capsys):
    """`sample --spatial` never lands on data/sample (a plain set there would be replaced); plain calls are as before."""
    calls = []

    def fake(root, seed=0, **options):
        calls.append((root, seed, options))
        return {"root": str(root)}

    module = types.ModuleType("sample_data")
    module.make_sample_dataset = fake
    monkeypatch.setitem(sys.modules, "sample_data", module)
    assert prepare_data.main(["sample", "--spatial"]) == 0
    assert prepare_data.main(["sample", "--spatial", "--root", str(tmp_path / "s"), "--seed", "2"]) == 0
    assert prepare_data.main(["sample"]) == 0
    assert calls == [(Path("data/sample-spatial"), 0, {"variant": "spatial"}),
                     (tmp_path / "s", 2, {"variant": "spatial"}),
                     (Path("data/sample"), 0, {})]
    assert capsys.readouterr().out.splitlines()[0] == str({"root": str(Path("data/sample-spatial"))})
