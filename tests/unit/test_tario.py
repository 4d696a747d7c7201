"""The plain tar reader (alignment/data/tario.py) against Python's tarfile and GNU tar, intact and damaged."""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from alignment.data.plan import ShardRef
from alignment.data.samples import SkipTally, iter_shard_payloads
from alignment.data.tario import iter_tar

LONG = "d" * 120 + "/" + "ü" * 40 + ".json"  # past ustar's 100-byte name field; non-ASCII


def _members() -> list[tuple[str, bytes]]:
    return [("a.json", b'{"id": "a"}'), (LONG, b"x" * 1000), ("empty.json", b""), ("b.txt", b"y" * 512),
            ("sub/c.json", bytes(range(256)) * 3)]


def _tar(fmt: int, extra_pax: dict | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=extra_pax or {}) as tar:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in _members():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.json")
        link.type, link.linkname = tarfile.SYMTYPE, "a.json"
        tar.addfile(link)
    return buf.getvalue()


def _tarfile_members(raw: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_what_tarfile_reads(fmt):
    if fmt == tarfile.USTAR_FORMAT:  # ustar cannot hold LONG's name: prefix field + short name instead
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, data in [("p" * 90 + "/" + "q" * 90 + ".json", b"prefixed")] + _members()[:1]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        raw = buf.getvalue()
    else:
        raw = _tar(fmt, {"comment": "global"} if fmt == tarfile.PAX_FORMAT else None)
    expected = _tarfile_members(raw)
    assert len(expected) >= 2
    assert list(iter_tar(io.BytesIO(raw), "t.tar")) == expected


def test_gnu_tar_cli_archive(tmp_path):
    tar_bin = shutil.which("tar")
    if tar_bin is None:
        pytest.skip("no tar binary on this machine")
    src = tmp_path / "src"
    for name, data in _members():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    for fmt in ("gnu", "posix", "ustar"):
        out = tmp_path / f"{fmt}.tar"
        names = [n for n, _ in _members() if fmt != "ustar" or len(n.encode()) <= 100]
        subprocess.run([tar_bin, f"--format={fmt}", "-cf", str(out), "-C", str(src), *names], check=True)
        raw = out.read_bytes()
        assert list(iter_tar(io.BytesIO(raw), str(out))) == _tarfile_members(raw), fmt


def test_damage_raises_after_the_good_members():
    raw = _tar(tarfile.GNU_FORMAT)
    whole = _tarfile_members(raw)
    for cut in range(0, len(raw) - 1024, 97):  # every cut before the end-of-archive blocks
        got = []
        try:
            for member in iter_tar(io.BytesIO(raw[:cut]), "cut.tar"):
                got.append(member)
        except tarfile.ReadError as exc:
            assert "cut.tar" in str(exc)
        assert got == whole[: len(got)], cut  # never a wrong or partial member
    garbage = bytearray(raw)
    second = 512  # after the directory header: a.json's header; damage its name
    garbage[second + 3] ^= 0xFF
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(iter_tar(io.BytesIO(bytes(garbage)), "bad.tar"))
    with pytest.raises(tarfile.ReadError, match="empty"):
        list(iter_tar(io.BytesIO(b""), "empty.tar"))


def test_shard_payloads_plain_gzip_and_damaged(tmp_path):
    raw = _tar(tarfile.PAX_FORMAT)
    json_members = [(n[: -len(".json")], d) for n, d in _tarfile_members(raw) if n.endswith(".json")]
    plain, packed, cut = tmp_path / "s.tar", tmp_path / "s.tar.gz", tmp_path / "cut.tar"
    plain.write_bytes(raw)
    packed.write_bytes(gzip.compress(raw))
    cut.write_bytes(raw[: 512 * 4 + 100])  # dir, a.json header + data, LONG's pax header: then cut in LONG's
    for path in (plain, packed):
        tally = SkipTally()
        assert list(iter_shard_payloads(ShardRef(str(path), rows=len(json_members)), tally)) == json_members
        assert tally.counts == {}
    tally = SkipTally()
    with pytest.warns(UserWarning, match="corrupt_tar"):
        got = list(iter_shard_payloads(ShardRef(f"file:{cut}", rows=len(json_members)), tally))
    assert got == json_members[:1] and tally.counts == {"corrupt_tar": 1}


def test_same_samples_as_webdataset(tmp_path):
    """Metadata members are skipped as WebDataset's own tar iterator skips them."""
    from webdataset.tariterators import tar_file_iterator

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("__meta__.json", "__dir__/k.json", "k.json", "k.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    path = Path(tmp_path / "m.tar")
    path.write_bytes(buf.getvalue())
    with open(path, "rb") as fh:
        expected = [m["fname"][: -len(".json")] for m in tar_file_iterator(fh, select_files=lambda n: n.endswith(".json"))]
    assert [k for k, _ in iter_shard_payloads(ShardRef(str(path), rows=2), SkipTally())] == expected
    assert expected == ["__meta__", "k"]


def test_malformed_pax_records_and_random_damage_end_with_an_error_or_members():
    """Bad pax records raise instead of looping; random byte damage anywhere either reads (members of the right
    count at most) or raises ReadError, never hangs or raises anything else."""
    import random

    from alignment.data.tario import _pax

    for bad in (b"abc", b"5 a=b\n", b"99 a=b\n", b" 3 a\n", b"0 a=b\n", b"1 \n"):
        with pytest.raises(tarfile.ReadError, match="pax"):
            _pax(bad, "p.tar")
    assert _pax(b"6 a=b\n\0\0", "p.tar") == {"a": "b"}
    raw = _tar(tarfile.PAX_FORMAT, {"comment": "c" * 600})
    count = len(_tarfile_members(raw))
    rng = random.Random(0)
    for _ in range(300):
        damaged = bytearray(raw)
        for _ in range(rng.randrange(1, 4)):
            damaged[rng.randrange(len(raw))] = rng.randrange(256)
        try:
            got = list(iter_tar(io.BytesIO(bytes(damaged)), "fuzz.tar"))
        except tarfile.ReadError:
            continue
        assert len(got) <= count + 1  # a damaged type flag may turn a link into a file, never loop
