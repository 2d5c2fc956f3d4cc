"""Download, verify and unpack MS COCO 2014 and the Karpathy split; lay out Flickr8k / Flickr30k; or make the
small sample set.

    python prepare_data.py coco --root data/coco                      # everything (about 27 GB of zips)
    python prepare_data.py coco --root data/coco --only annotations   # captions + Karpathy split only
    python prepare_data.py coco --root data/coco --check              # is the tree complete? (exit 0 / 2)
    python prepare_data.py flickr8k --root data/flickr8k --from ~/Downloads/archive.zip   # Kaggle's copy
    python prepare_data.py flickr8k --from Flickr8k_Dataset.zip --from Flickr8k_text.zip  # the original two
    python prepare_data.py flickr30k --root data/flickr30k --from flickr30k_images/       # a folder works too
    python prepare_data.py sample --root data/sample --seed 0
    python prepare_data.py sample --root data/sample-spatial --spatial   # captions say where objects are

Downloads resume (HTTP Range, a `.part` file), are checked against the sizes and md5 sums below and
retried with exponential backoff; a re-run skips every archive that is already unpacked.
`--base-url` (or the env var COCO_BASE_URL) points every download at a mirror: BASE_URL/<file name>.

Flickr images have no stable public download (the original form and its links are gone, copies live on Kaggle and
the like behind logins), so `flickr8k` / `flickr30k` lay out a copy you already have: ROOT/images/*.jpg, the
caption file(s) beside them, and Karpathy's dataset_flickr8k.json / dataset_flickr30k.json (from the
caption_datasets.zip the coco command also fetches; taken from data/coco/annotations when it is there).
"""

import argparse
import hashlib
import http.client
import json
import math
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from fileio import atomic_write


@dataclass(frozen=True)
class Archive:
    """One file to download and where its contents go under the data root."""

    name: str  # file name; a mirror serves it as BASE_URL/name
    url: str  # official location
    size: int | None  # exact size in bytes, None where not known for sure
    md5: str | None  # md5 hex digest, None where not known for sure
    group: str  # "annotations" or "images", what --only selects
    dest: str  # folder under the root that the zip is unpacked into
    provides: str  # path under the root that must exist after unpacking
    unpacked_bytes: int  # rough disk space the unpacked contents take (for the free-space check)
    members: tuple[str, ...] | None = None  # unpack only members with these base names (flat), None = all


COCO = "http://images.cocodataset.org"
KARPATHY = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
GB = 10**9

# The downloads, in the order they are fetched (small caption files first).
ARCHIVES: tuple[Archive, ...] = (
    Archive("annotations_trainval2014.zip", f"{COCO}/annotations/annotations_trainval2014.zip",
            252_872_794, "0a379cfc70b0e71301e0f377548639bd",
            "annotations", ".", "annotations/captions_train2014.json", 1 * GB),
    Archive("image_info_test2014.zip", f"{COCO}/annotations/image_info_test2014.zip",
            None, None,
            "annotations", ".", "annotations/image_info_test2014.json", GB // 100),
    Archive("caption_datasets.zip", KARPATHY,
            None, None,
            "annotations", "annotations", "annotations/dataset_coco.json", GB // 5,
            ("dataset_coco.json", "dataset_flickr8k.json", "dataset_flickr30k.json")),
    Archive("val2014.zip", f"{COCO}/zips/val2014.zip",
            6_645_013_297, "a3d79f5ed8d289b7a7554ce06a5782b3",
            "images", "images", "images/val2014", 7 * GB),
    Archive("train2014.zip", f"{COCO}/zips/train2014.zip",
            13_510_573_713, "0da8c0bd3d6becc4dcb32757491aca88",
            "images", "images", "images/train2014", 14 * GB),
    Archive("test2014.zip", f"{COCO}/zips/test2014.zip",
            6_660_437_059, "04127eef689ceac55e3a572c2c92f264",
            "images", "images", "images/test2014", 7 * GB),
)

# What a complete tree holds; tests replace these with the counts of their small trees.
EXPECTED_IMAGES = {"train2014": 82_783, "val2014": 40_504, "test2014": 40_775}
EXPECTED_ANNOTATIONS = {
    "captions_train2014.json": ("images", "annotations"),
    "captions_val2014.json": ("images", "annotations"),
    "image_info_test2014.json": ("images",),
    "dataset_coco.json": ("images",),
}

TIMEOUT_SECONDS = 60
CHUNK_BYTES = 1 << 20
MAX_BACKOFF_SECONDS = 60.0
RETRY_HTTP_CODES = {408, 425, 429, 500, 502, 503, 504}
TRANSIENT_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


class PrepareError(Exception):
    """A problem the user has to act on; the CLI prints it as one line and exits with 2."""


class TransientError(Exception):
    """A failed attempt that is worth retrying (dropped connection, timeout, HTTP 5xx)."""


def file_md5(path: Path) -> str:
    """The md5 hex digest of a file, read in chunks (with a bar for big files)."""
    digest = hashlib.md5()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"md5 {path.name}",
                                     disable=size < 100 * 2**20) as bar:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from a Content-Range header such as 'bytes 100-199/200' or 'bytes */200'."""
    match = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (header or "").strip())
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _fetch_once(url: str, part: Path, expected_size: int | None) -> None:
    """One HTTP attempt: append the rest of url to part, resuming with a Range request if part has bytes."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset >= expected_size:
        if offset == expected_size:
            return
        part.unlink()
        offset = 0
    request = urllib.request.Request(url, headers={"User-Agent": "prepare_data.py"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            if _content_range(err.headers.get("Content-Range"))[1] == offset:
                return  # the part file already holds the whole file
            part.unlink()
            raise TransientError(f"the server refused to resume at byte {offset}; starting over") from None
        if err.code in RETRY_HTTP_CODES:
            raise TransientError(f"HTTP {err.code} {err.reason}") from None
        raise PrepareError(f"{url}: HTTP {err.code} {err.reason}") from None
    with response:
        if response.status == 206 and _content_range(response.headers.get("Content-Range"))[0] != offset:
            part.unlink()  # a part of the file, but not the one asked for: appending it would corrupt the file
            raise TransientError(f"the server resumed at another byte than {offset}; starting over")
        if response.status != 206:
            offset = 0  # the server ignored the Range request (or none was sent): take the whole file
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        if expected_size is not None and total is not None and total != expected_size:
            raise PrepareError(f"{url}: the server has {total:,} bytes, expected {expected_size:,}")
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=part.name.removesuffix(".part")
        ) as bar:
            while chunk := response.read(CHUNK_BYTES):
                f.write(chunk)
                bar.update(len(chunk))
    received = part.stat().st_size
    if total is not None and received != total:
        raise TransientError(f"connection closed after {received:,} of {total:,} bytes")


def download(url: str, dest: str | Path, expected_size: int | None = None, md5: str | None = None,
             retries: int = 5, backoff: float = 2.0) -> Path:
    """Stream url to dest.part (resumed across attempts and runs), verify it, then rename it to dest."""
    if retries < 0 or backoff < 0:
        raise ValueError(f"retries and backoff must be >= 0, got {retries} and {backoff}")
    dest = Path(dest)
    if dest.exists() and (expected_size is None or dest.stat().st_size == expected_size):
        return dest  # only verified files are ever renamed to dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, expected_size)
            break
        except (TransientError, *TRANSIENT_ERRORS) as err:
            reason = getattr(err, "reason", None) or err
            if attempt == retries:
                raise PrepareError(f"{url}: {reason} (gave up after {retries + 1} attempts)") from None
            delay = min(backoff * 2**attempt, MAX_BACKOFF_SECONDS)
            print(f"{dest.name}: {reason}; retrying in {delay:.1f} s", file=sys.stderr)
            time.sleep(delay)
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        part.unlink()
        raise PrepareError(f"{url}: got {size:,} bytes, expected {expected_size:,}; removed it, run again")
    if md5 is not None and (actual := file_md5(part)) != md5:
        part.unlink()
        raise PrepareError(f"{url}: md5 is {actual}, expected {md5}; removed it, run again")
    os.replace(part, dest)
    return dest


def _safe_target(dest: Path, member: str) -> Path:
    """Where a zip member goes under dest; refuses absolute paths and '..' that would escape dest.

    The check is lexical, not on resolved paths: folders under dest that the user made symlinks to another
    disk (annotations/, images/train2014/) are followed. The archive cannot plant a symlink of its own, as
    every member is written as a regular file.
    """
    path = PurePosixPath(member)
    target = Path(os.path.normpath(dest / path))
    if path.is_absolute() or ".." in path.parts or target == dest or not target.is_relative_to(dest):
        raise PrepareError(f"unsafe path in zip: {member!r} would land outside {dest}")
    return target


def extract_zip(archive: Path, dest: Path, members: tuple[str, ...] | None = None) -> int:
    """Unpack archive into dest (files written atomically, nothing outside dest); return the file count.

    Files are not fsynced one by one (14x slower for COCO's many small images); prepare_coco syncs once before
    it writes the marker that records the archive as unpacked.
    """
    dest.mkdir(parents=True, exist_ok=True)
    dest = Path(os.path.abspath(dest))
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = [info for info in zf.infolist() if not info.is_dir()]
            if members is not None:
                infos = [info for info in infos if PurePosixPath(info.filename).name in members]
            total = sum(info.file_size for info in infos)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"unpack {archive.name}",
                      disable=total < 100 * 2**20) as bar:
                for info in infos:
                    name = PurePosixPath(info.filename).name if members is not None else info.filename
                    target = _safe_target(dest, name)
                    with zf.open(info) as src, atomic_write(target, fsync=False) as out:
                        shutil.copyfileobj(src, out, CHUNK_BYTES)
                    bar.update(info.file_size)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise PrepareError(f"{archive}: not a valid zip file ({err})") from None
    return len(infos)


def _marker(root: Path, archive: Archive) -> Path:
    """The file recording that archive was unpacked completely."""
    return root / "downloads" / f"{archive.name}.done"


def is_unpacked(root: Path, archive: Archive) -> bool:
    """True when archive's marker matches the table (size, md5) and what it provides is still there."""
    try:
        record = json.loads(_marker(root, archive).read_text())
    except (OSError, ValueError):
        return False
    return (
        (archive.size is None or record.get("size") == archive.size)
        and (archive.md5 is None or record.get("md5") == archive.md5)
        and (root / archive.provides).exists()
    )


def bytes_needed(root: Path, archives: list[Archive], keep_archives: bool = False) -> int:
    """Disk space still needed: unpacked estimates plus downloads (only the biggest if zips get deleted)."""
    pending = [a for a in archives if not is_unpacked(root, a)]
    downloads = []
    for archive in pending:
        zip_path = root / "downloads" / archive.name
        part = zip_path.with_name(zip_path.name + ".part")
        have = zip_path.stat().st_size if zip_path.exists() else part.stat().st_size if part.exists() else 0
        downloads.append(max((archive.size or 0) - have, 0))
    unpacked = sum(a.unpacked_bytes for a in pending)
    return unpacked + (sum(downloads) if keep_archives else max(downloads, default=0))


def ensure_disk_space(root: Path, needed: int, free: int | None = None) -> None:
    """Raise a PrepareError naming the shortfall in GB if free (default: measured at root) is below needed."""
    free = shutil.disk_usage(root).free if free is None else free
    if needed > free:
        raise PrepareError(
            f"{root}: not enough disk space: need about {needed / GB:.1f} GB, {free / GB:.1f} GB free "
            f"({(needed - free) / GB:.1f} GB short)"
        )


def link_cocoapi_layout(root: Path) -> None:
    """Link ROOT/cocoapi/{images,annotations} (relative symlinks) for get_loader(cocoapi_loc=ROOT)."""
    cocoapi = root / "cocoapi"
    cocoapi.mkdir(exist_ok=True)
    for name in ("images", "annotations"):
        link, target = cocoapi / name, Path("..") / name
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.exists() or link.is_symlink():
            raise PrepareError(f"{link}: already exists and is not a link to {target}; move it away")
        link.symlink_to(target, target_is_directory=True)


def _select(only: str | None) -> list[Archive]:
    """The archives that --only picks (all when only is None)."""
    if only not in (None, "images", "annotations"):
        raise PrepareError(f"--only must be 'images' or 'annotations', not {only!r}")
    return [a for a in ARCHIVES if only in (None, a.group)]


def prepare_coco(root: str | Path, only: str | None = None, base_url: str | None = None,
                 cocoapi_layout: bool = False, *, keep_archives: bool = False, retries: int = 5,
                 backoff: float = 2.0) -> None:
    """Download and unpack what is missing under root (see ARCHIVES), skipping archives already unpacked."""
    root = Path(root)
    base_url = base_url or os.environ.get("COCO_BASE_URL")
    if base_url and not base_url.startswith(("http://", "https://")):
        raise PrepareError(f"base URL must start with http:// or https://: {base_url!r}")
    archives = _select(only)
    root.mkdir(parents=True, exist_ok=True)
    ensure_disk_space(root, bytes_needed(root, archives, keep_archives))
    for archive in archives:
        if is_unpacked(root, archive):
            print(f"{archive.name}: already unpacked, skipping")
            continue
        url = f"{base_url.rstrip('/')}/{archive.name}" if base_url else archive.url
        zip_path = root / "downloads" / archive.name
        download(url, zip_path, archive.size, archive.md5, retries, backoff)
        try:
            count = extract_zip(zip_path, root / archive.dest, archive.members)
        except PrepareError as err:
            zip_path.unlink()
            raise PrepareError(f"{err}; removed it, run again to download it afresh") from None
        if not (root / archive.provides).exists():
            zip_path.unlink()
            raise PrepareError(f"{url}: unpacking it gave no {archive.provides}; is it the right file?")
        record = {"url": url, "size": zip_path.stat().st_size, "md5": archive.md5, "files": count}
        if hasattr(os, "sync"):  # POSIX: the unpacked files reach the disk before the marker vouches for them
            os.sync()
        with atomic_write(_marker(root, archive), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        if not keep_archives:
            zip_path.unlink()
        print(f"{archive.name}: unpacked {count:,} files into {root / archive.dest}")
    if cocoapi_layout:
        link_cocoapi_layout(root)


def _check_annotation(path: Path, keys: tuple[str, ...]) -> str | None:
    """What is wrong with one annotation file, or None."""
    if not path.is_file():
        return f"{path}: missing"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        return f"{path}: not valid JSON ({err})"
    missing = [key for key in keys if not isinstance(data, dict) or key not in data]
    return f"{path}: no {', '.join(repr(k) for k in missing)} key" if missing else None


def check_coco(root: str | Path, only: str | None = None, cocoapi_layout: bool = False) -> list[str]:
    """Problems with the tree under root (image counts, annotation JSON); an empty list means complete."""
    root = Path(root)
    problems = []
    if only in (None, "images"):
        for split, expected in EXPECTED_IMAGES.items():
            folder = root / "images" / split
            if not folder.is_dir():
                problems.append(f"{folder}: missing (expected {expected:,} images)")
                continue
            count = sum(1 for entry in os.scandir(folder) if entry.name.lower().endswith(".jpg"))
            if count != expected:
                problems.append(f"{folder}: {count:,} of {expected:,} images")
    if only in (None, "annotations"):
        for name, keys in EXPECTED_ANNOTATIONS.items():
            problem = _check_annotation(root / "annotations" / name, keys)
            if problem:
                problems.append(problem)
    if cocoapi_layout:
        for name in ("images", "annotations"):
            link = root / "cocoapi" / name
            if only in (None, name) and not link.is_dir():
                problems.append(f"{link}: missing (run with --cocoapi-layout)")
    return problems


def _report(root: Path, problems: list[str]) -> int:
    """Print the problems (or that all is well) and return the exit code."""
    for problem in problems:
        print(f"  {problem}")
    if problems:
        print(f"{root}: incomplete ({len(problems)} problem{'s' if len(problems) > 1 else ''})")
        return 2
    print(f"{root}: complete")
    return 0


def run_coco(args: argparse.Namespace) -> int:
    """The `coco` subcommand: check, or download + unpack and then check."""
    if not args.check:
        prepare_coco(args.root, args.only, args.base_url, args.cocoapi_layout,
                     keep_archives=args.keep_archives, retries=args.retries, backoff=args.backoff)
    return _report(args.root, check_coco(args.root, args.only, args.cocoapi_layout))


def run_sample(args: argparse.Namespace) -> int:
    """The `sample` subcommand: write the small generated dataset (with --spatial, its spatial variant)."""
    import sample_data

    if args.spatial:
        root = args.root or Path("data/sample-spatial")
        print(sample_data.make_sample_dataset(root, seed=args.seed, variant="spatial"))
    else:
        root = args.root or Path("data/sample")
        print(sample_data.make_sample_dataset(root, seed=args.seed))
    if args.flickr_copy:
        copy = sample_data.flickr_copy(root, args.flickr_copy, args.flickr_layout)
        print(f"{copy}: a {args.flickr_layout} Flickr8k-style copy")
    return 0


# ---- Flickr8k / Flickr30k: lay out a copy the user has ----

FLICKR_IMAGES = {"flickr8k": 8_091, "flickr30k": 31_783}  # images in a complete copy; tests replace these
FLICKR_KARPATHY = {"flickr8k": "dataset_flickr8k.json", "flickr30k": "dataset_flickr30k.json"}
FLICKR_TEXT_FILES = frozenset({
    "captions.txt", "Flickr8k.token.txt", "Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt",
    "Flickr_8k.testImages.txt", "results_20130124.token", "results.csv", *FLICKR_KARPATHY.values(),
})
IMAGE_SUFFIXES = (".jpg", ".jpeg")


@dataclass(frozen=True)
class Found:
    """A file of a user's copy: in a zip (`member` set) or on disk (`member` None), and the name it is laid out as."""

    container: Path
    member: str | None
    name: str

    @property
    def is_image(self) -> bool:
        return self.name.lower().endswith(IMAGE_SUFFIXES)


def _wanted(path: PurePosixPath) -> bool:
    """An image or one of the caption files, and not macOS's zip litter (__MACOSX/, ._name)."""
    if "__MACOSX" in path.parts or path.name.startswith("._"):
        return False
    return path.name.lower().endswith(IMAGE_SUFFIXES) or path.name in FLICKR_TEXT_FILES


def inventory(source: Path) -> list[Found]:
    """The images and caption files in a zip, a folder (searched recursively) or a single caption file."""
    if source.is_dir():
        return [Found(path, None, path.name) for path in sorted(source.rglob("*"))
                if path.is_file() and _wanted(PurePosixPath(path.relative_to(source).as_posix()))]
    if not source.is_file():
        raise PrepareError(f"{source}: no such file or folder")
    if not zipfile.is_zipfile(source):
        if source.name in FLICKR_TEXT_FILES:
            return [Found(source, None, source.name)]
        raise PrepareError(f"{source}: neither a zip file, a folder, nor a caption file ({', '.join(sorted(FLICKR_TEXT_FILES))})")
    try:
        with zipfile.ZipFile(source) as zf:
            return [Found(source, info.filename, PurePosixPath(info.filename).name) for info in zf.infolist()
                    if not info.is_dir() and _wanted(PurePosixPath(info.filename))]
    except (zipfile.BadZipFile, zlib.error) as err:
        raise PrepareError(f"{source}: not a valid zip file ({err})") from None


def _place(found: Found, target: Path) -> None:
    """Copy one file into the layout (atomically); a file on the same disk is hard-linked instead."""
    if found.member is None:
        try:
            target.unlink(missing_ok=True)
            os.link(found.container, target)
            return
        except OSError:
            pass
        with open(found.container, "rb") as src, atomic_write(target, fsync=False) as out:
            shutil.copyfileobj(src, out, CHUNK_BYTES)
        return
    with zipfile.ZipFile(found.container) as zf, zf.open(found.member) as src, atomic_write(target, fsync=False) as out:
        shutil.copyfileobj(src, out, CHUNK_BYTES)


def _size(found: Found) -> int:
    if found.member is None:
        return found.container.stat().st_size
    with zipfile.ZipFile(found.container) as zf:
        return zf.getinfo(found.member).file_size


def lay_out_flickr(root: Path, sources: list[Path]) -> tuple[int, int]:
    """Images of `sources` into ROOT/images, caption files into ROOT; a file already there at its size is kept.
    Returns (images, caption files) laid out."""
    files: dict[str, Found] = {}
    for source in sources:
        for found in inventory(Path(source)):
            files.setdefault(found.name, found)  # the first copy of a name wins
    images = [f for f in files.values() if f.is_image]
    texts = [f for f in files.values() if not f.is_image]
    if not images:
        raise PrepareError(f"{', '.join(map(str, sources))}: no .jpg images found")
    if not texts:
        raise PrepareError(f"{', '.join(map(str, sources))}: no caption file found "
                           f"(expected one of {', '.join(sorted(FLICKR_TEXT_FILES))})")
    (root / "images").mkdir(parents=True, exist_ok=True)
    for found in tqdm([*texts, *images], desc=f"lay out {root}", unit="file", disable=len(images) < 1000):
        target = root / "images" / found.name if found.is_image else root / found.name
        if not (target.is_file() and target.stat().st_size == _size(found)):
            _place(found, target)
    if hasattr(os, "sync"):
        os.sync()
    return len(images), len(texts)


def fetch_karpathy_split(name: str, root: Path, karpathy: Path | None = None, base_url: str | None = None,
                         retries: int = 5, backoff: float = 2.0) -> Path:
    """ROOT/dataset_<name>.json: from `karpathy` (the JSON or caption_datasets.zip), else the copy the coco command
    left in data/coco/annotations, else downloaded (caption_datasets.zip, only that member unpacked)."""
    wanted = FLICKR_KARPATHY[name]
    target = root / wanted
    if target.is_file() and karpathy is None:
        return target
    coco_copy = Path(__file__).resolve().parent / "data/coco/annotations" / wanted
    if karpathy is None and coco_copy.is_file():
        karpathy = coco_copy
    if karpathy is None:
        url = f"{base_url.rstrip('/')}/caption_datasets.zip" if base_url else KARPATHY
        karpathy = download(url, root / "downloads" / "caption_datasets.zip", retries=retries, backoff=backoff)
    if zipfile.is_zipfile(karpathy):
        if extract_zip(Path(karpathy), root, (wanted,)) != 1:
            raise PrepareError(f"{karpathy}: has no {wanted}")
        return target
    with open(karpathy, "rb") as src, atomic_write(target) as out:
        shutil.copyfileobj(src, out, CHUNK_BYTES)
    return target


def prepare_flickr(name: str, root: str | Path, sources: list[Path], karpathy: Path | None = None,
                   base_url: str | None = None, retries: int = 5, backoff: float = 2.0) -> None:
    """Lay out a Flickr8k / Flickr30k copy under root, add Karpathy's split, check the image count, and read the
    captions once (so a malformed file fails here, naming its line)."""
    from data_loader import caption_data

    root = Path(root)
    images, texts = lay_out_flickr(root, sources)
    print(f"{root}: laid out {images:,} images and {texts} caption file{'s' if texts > 1 else ''}")
    try:
        split_file = fetch_karpathy_split(name, root, karpathy, base_url or os.environ.get("COCO_BASE_URL"),
                                          retries, backoff)
        print(f"{split_file}: Karpathy's split")
    except (PrepareError, OSError) as err:
        print(f"warning: no Karpathy split ({err}); the split is then the Flickr8k lists beside the captions, or "
              "a deterministic one by image; --karpathy FILE adds it later", file=sys.stderr)
    count = sum(1 for path in (root / "images").iterdir() if path.name.lower().endswith(IMAGE_SUFFIXES))
    if count != FLICKR_IMAGES[name]:
        print(f"warning: {root / 'images'} has {count:,} images, a complete {name} has {FLICKR_IMAGES[name]:,}",
              file=sys.stderr)
    try:
        print(caption_data(name, root).summary)
    except ValueError as err:
        raise PrepareError(str(err)) from None


def run_flickr(args: argparse.Namespace) -> int:
    """The `flickr8k` / `flickr30k` subcommands."""
    root = args.root or Path(f"data/{args.command}")
    if not args.sources and not (root / "images").is_dir():
        raise PrepareError(f"{root}: no images yet; give your copy with --from ARCHIVE_OR_FOLDER (Flickr images "
                           "have no stable public download)")
    prepare_flickr(args.command, root, args.sources, args.karpathy, args.base_url, args.retries, args.backoff)
    return 0


def _non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (a bad one exits with code 2 and a one-line message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line: subcommands `coco`, `sample`, `flickr8k` and `flickr30k`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    coco = commands.add_parser("coco", help="download, unpack or check COCO 2014 and the Karpathy split")
    coco.add_argument("--root", type=Path, default=Path("data/coco"), help="data folder (default: data/coco)")
    coco.add_argument("--only", choices=("annotations", "images"),
                      help="only the caption files or only the images")
    coco.add_argument("--base-url",
                      help="mirror to download from, as BASE_URL/<file name> (env: COCO_BASE_URL)")
    coco.add_argument("--cocoapi-layout", action="store_true",
                      help="also link ROOT/cocoapi/{images,annotations} for get_loader(cocoapi_loc=ROOT)")
    coco.add_argument("--check", action="store_true", help="only verify the tree: exit 0 if complete, else 2")
    coco.add_argument("--keep-archives", action="store_true", help="keep the zips after unpacking them")
    _add_retry_options(coco)
    coco.set_defaults(run=run_coco)
    sample = commands.add_parser("sample", help="write the small generated sample dataset")
    sample.add_argument("--root", type=Path,
                        help="data folder (default: data/sample, with --spatial data/sample-spatial)")
    sample.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default: 0)")
    sample.add_argument("--spatial", action="store_true",
                        help="the spatial variant: 128 px, captions say left / right / above / below / corner "
                             "(never train it with mirrored views)")
    sample.add_argument("--flickr-copy", type=Path, metavar="DIR",
                        help="also write its train and val images as a Flickr8k-style copy into DIR (to try the "
                             "flickr8k commands without Flickr)")
    sample.add_argument("--flickr-layout", choices=("kaggle", "original", "karpathy"), default="kaggle",
                        help="kaggle: Images/ + captions.txt; original: Flicker8k_Dataset/ + Flickr8k.token.txt + "
                             "the split lists; karpathy: images/ + dataset_flickr8k.json (default: kaggle)")
    sample.set_defaults(run=run_sample)
    for name in FLICKR_IMAGES:
        _add_flickr_command(commands, name)
    return parser


def _add_retry_options(parser: argparse.ArgumentParser) -> None:
    """--retries and --backoff of the downloads."""
    parser.add_argument("--retries", type=_non_negative_int, default=5, help="retries per download (default: 5)")
    parser.add_argument("--backoff", type=_non_negative_float, default=2.0,
                        help="first retry delay in seconds, doubled each retry (default: 2)")


def _add_flickr_command(commands: argparse._SubParsersAction, name: str) -> None:
    """The `flickr8k` / `flickr30k` subcommand: lay out a copy the user has (there is no stable download)."""
    flickr = commands.add_parser(name, help=f"lay out a {name} copy you have (zip or folder) and Karpathy's split")
    flickr.add_argument("--root", type=Path, help=f"data folder (default: data/{name})")
    flickr.add_argument("--from", dest="sources", type=Path, action="append", default=[], metavar="ARCHIVE_OR_FOLDER",
                        help="a zip, folder or caption file of your copy; repeat for several (e.g. the original "
                             "Flickr8k_Dataset.zip and Flickr8k_text.zip)")
    flickr.add_argument("--karpathy", type=Path, help=f"{FLICKR_KARPATHY[name]} or caption_datasets.zip you have "
                        "(default: data/coco/annotations, else downloaded)")
    flickr.add_argument("--base-url", help="mirror of caption_datasets.zip, as BASE_URL/caption_datasets.zip")
    _add_retry_options(flickr)
    flickr.set_defaults(run=run_flickr)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; errors become one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (PrepareError, OSError, ValueError) as err:  # ValueError: a malformed caption file (CaptionFileError)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
