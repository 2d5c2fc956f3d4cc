"""fileio.atomic_write: a temp file in the target's folder that replaces the target only on a clean exit."""

import os

import pytest

import fileio
from fileio import atomic_write


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)], ids=["umask022", "umask027"])
def test_written_file_gets_the_usual_permissions_not_mkstemps(tmp_path, monkeypatch, umask, mode):
    monkeypatch.setattr(fileio, "_UMASK", umask)  # the umask read once at import
    path = tmp_path / "weights.pt"
    with atomic_write(path) as f:
        f.write(b"data")
    assert path.read_bytes() == b"data"
    assert path.stat().st_mode & 0o777 == mode


def test_error_in_the_block_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(ValueError, match="boom"), atomic_write(path, "w", encoding="utf-8") as f:
        f.write("half")
        raise ValueError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_creates_missing_folders_and_writes_text_in_the_given_encoding(tmp_path):
    path = tmp_path / "new" / "deeper" / "caption.txt"
    with atomic_write(path, "w", encoding="latin-1") as f:
        f.write("un café")
    assert path.read_bytes() == b"un caf\xe9"
    assert [p.name for p in path.parent.iterdir()] == ["caption.txt"]


@pytest.mark.parametrize("fsync", [True, False])
def test_fsync_flag_and_replacing_an_existing_file(tmp_path, monkeypatch, fsync):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    path = tmp_path / "image.jpg"
    path.write_bytes(b"old")
    with atomic_write(path, fsync=fsync) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["image.jpg"]
    assert len(synced) == (1 if fsync else 0)


def test_a_rewritten_file_keeps_the_permissions_its_owner_gave_it(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")
    path.chmod(0o600)
    with atomic_write(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open descriptors in /proc")
def test_a_mode_that_cannot_open_leaks_no_descriptor_and_no_temp_file(tmp_path):
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError), atomic_write(tmp_path / "x.txt", "wz"):
        pass
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert list(tmp_path.iterdir()) == []
