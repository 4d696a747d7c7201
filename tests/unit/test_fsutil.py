"""alignment.fsutil: each property of an atomic publish, tested once here.

Every writer that a user or a resume reads (checkpoints, exports, shards, the
translate parts, the requeue file) publishes through these functions, so their
own tests check what the user consumes and these check the mechanism.
"""

from __future__ import annotations

import os
import stat

import pytest

from alignment import fsutil


class Boom(RuntimeError):
    pass


@pytest.fixture
def umask_027():
    """A non-default umask (group may read, others nothing), restored afterwards."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _siblings(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_an_exception_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    fsutil.publish_file(target, "old\n")
    with pytest.raises(Boom), fsutil.publishing(target, "w") as fh:
        fh.write("half of the new")
        raise Boom
    assert target.read_text() == "old\n"
    assert _siblings(tmp_path) == ["state.json"]


def test_publish_file_replaces_an_existing_file(tmp_path):
    target = tmp_path / "part.jsonl"
    fsutil.publish_file(target, b"one\n")
    fsutil.publish_file(target, lambda fh: fh.write(b"two\n"))
    fsutil.publish_file(target, "three\n")
    assert target.read_text() == "three\n" and _siblings(tmp_path) == ["part.jsonl"]


def test_a_folder_failing_mid_build_keeps_the_old_folder(tmp_path):
    out = tmp_path / "export"
    with fsutil.publish_folder(out) as staging:
        (staging / "weights").write_text("v1")
    with pytest.raises(Boom), fsutil.publish_folder(out) as staging:
        (staging / "weights").write_text("v2, half")
        raise Boom
    assert (out / "weights").read_text() == "v1"
    assert _siblings(tmp_path) == ["export"], "the failed build left its staging folder or lock"


def test_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    with fsutil.publish_folder(out) as staging:
        (staging / "shard0").write_text("v1")
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith(".new"):  # the new folder's rename into place fails
            raise OSError("disk full")
        return real_rename(src, dst)

    new = tmp_path / ".new"
    new.mkdir()
    (new / "shard0").write_text("v2")
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        fsutil.commit(new, out)
    assert (out / "shard0").read_text() == "v1"
    assert not [n for n in _siblings(tmp_path) if ".old-" in n], "the old folder was left aside"


def test_publishing_over_an_existing_folder_replaces_it_whole(tmp_path):
    out = tmp_path / "shards"
    with fsutil.publish_folder(out) as staging:
        (staging / "a").write_text("1")
        (staging / "b").write_text("1")
    with fsutil.publish_folder(out) as staging:
        (staging / "a").write_text("2")
    assert _siblings(out) == ["a"] and (out / "a").read_text() == "2"
    assert _siblings(tmp_path) == ["shards"]


def test_modes_follow_a_non_default_umask(tmp_path, umask_027):
    fsutil.publish_file(tmp_path / "file", b"x")
    with fsutil.publish_folder(tmp_path / "folder") as staging:
        (staging / "sub").mkdir(mode=0o700)
        inner = staging / "sub" / "weights"
        inner.write_bytes(b"x")
        inner.chmod(0o600)  # as safetensors and mkstemp create files
        script = staging / "run.sh"
        script.write_text("#!/bin/sh\n")
        script.chmod(0o700)
    assert _mode(tmp_path / "file") == 0o666 & ~umask_027 == 0o640
    assert _mode(tmp_path / "folder") == _mode(tmp_path / "folder" / "sub") == 0o777 & ~umask_027
    assert _mode(tmp_path / "folder" / "sub" / "weights") == 0o640
    assert _mode(tmp_path / "folder" / "run.sh") == 0o750, "an executable lost its x bits"


def test_every_file_and_the_parent_folder_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fsutil.publish_file(tmp_path / "file", b"x")
    assert any(".file.partial-" in p for p in synced), "the file's data was not fsynced before the rename"
    assert synced[-1] == str(tmp_path), "the rename was not made durable (parent folder fsync)"
    synced.clear()
    with fsutil.publish_folder(tmp_path / "folder") as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "weights").write_bytes(b"x")
    assert any(p.endswith("/sub/weights") for p in synced) and any(p.endswith("/sub") for p in synced)
    assert synced[-1] == str(tmp_path)


def test_recover_restores_a_folder_left_aside_by_a_kill_between_the_renames(tmp_path):
    out = tmp_path / "last.ckpt"
    aside = tmp_path / ".last.ckpt.old-1234abcd"
    aside.mkdir()
    (aside / "model_states.pt").write_text("complete")
    temp = fsutil.temp_path(out, token="step12")
    temp.mkdir()
    (temp / "model_states.pt").write_text("half")
    assert sorted(fsutil.recover_in(tmp_path, grace_s=0)) == [
        "removed .last.ckpt.partial-step12", "restored last.ckpt from .last.ckpt.old-1234abcd"]
    assert (out / "model_states.pt").read_text() == "complete"
    assert _siblings(tmp_path) == ["last.ckpt"]


def test_recover_drops_an_aside_once_the_new_target_is_in_place(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "new").write_text("")
    (tmp_path / ".export.old-00000000").mkdir()
    assert fsutil.recover(out) == ["removed .export.old-00000000"]
    assert _siblings(tmp_path) == ["export"] and _siblings(out) == ["new"]


def test_recover_deletes_stale_temporaries_and_spares_live_and_fresh_ones(tmp_path):
    out = tmp_path / "shards"
    stale_file = fsutil.temp_path(tmp_path / "part.json")
    stale_file.write_text("killed writer")
    os.utime(stale_file, (0, 0))
    fresh_file = fsutil.temp_path(tmp_path / "part.json")
    fresh_file.write_text("a writer may be running")
    dead_build = fsutil.temp_path(out)
    dead_build.mkdir()
    dead_build.with_name(dead_build.name + fsutil.LOCK_SUFFIX).write_text("")  # its lock, no longer held
    with fsutil.building(out) as live_build:
        fsutil.recover_in(tmp_path)
        assert live_build.is_dir(), "recover deleted a build that is still running"
    assert not stale_file.exists() and fresh_file.exists()
    assert not dead_build.exists() and not dead_build.with_name(dead_build.name + fsutil.LOCK_SUFFIX).exists()
    assert fsutil.recover(tmp_path / "part.json", grace_s=0) == [f"removed {fresh_file.name}"]
    assert _siblings(tmp_path) == []


def test_an_empty_folder_target_is_replaced_and_a_file_is_never_a_leftover(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / ".hidden.json").write_text("{}")  # not ours: no .partial-/.old- name
    with fsutil.publish_folder(out) as staging:
        (staging / "x").write_text("1")
    assert (out / "x").read_text() == "1"
    assert fsutil.recover_in(tmp_path, grace_s=0) == [] and (tmp_path / ".hidden.json").exists()
