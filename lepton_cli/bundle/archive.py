"""Where a bundle's files come from: its folder, or a single-file archive read in place.

Checked first: Python's ``zipfile`` reads members as streams without extracting anything, and
writes uncompressed (``ZIP_STORED``) members, so the archive holds the exact bytes ``model.sig``
signs (``unzip`` recreates the folder, which the standard model-signing tool then accepts).
Because zip metadata is not signed, the reader refuses anything ambiguous: duplicate names,
folders, links or special files, compressed or encrypted members, data before the first member
or after the central directory.
"""

from __future__ import annotations

import os
import stat
import struct
import zipfile
from pathlib import Path
from typing import BinaryIO

from lepton_cli.bundle.manifest import fail

ARCHIVE_SUFFIX = ".zip"
_EPOCH = (1980, 1, 1, 0, 0, 0)
_FILE_ATTR = (stat.S_IFREG | 0o644) << 16
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01
_MAX_ENTRIES = 4096


def _check_metadata(info: zipfile.ZipInfo, offset: int) -> None:
    """The fixed metadata ``write_archive`` writes, the member starting at ``offset``."""
    if (
        info.date_time != _EPOCH
        or info.external_attr != _FILE_ATTR
        or info.extra
        or info.comment
        or info.flag_bits & ~0x800
        or info.header_offset != offset
        or info.internal_attr
        or info.volume
        or (info.create_system, info.create_version, info.extract_version) != (3, 20, 20)
    ):
        raise fail(f"archive entry {info.filename!r} has unexpected metadata (modified, or not written by Lepton)")


def _central_directory(infos: list[zipfile.ZipInfo], offset: int) -> bytes:
    """The central directory and end record as ``write_archive`` writes them for ``infos``, starting at
    ``offset`` (APPNOTE 4.3.12 / 4.3.16; no zip64, extra fields or comments)."""
    directory = b"".join(
        struct.pack(
            "<4s4B4HL2L5H2L",
            b"PK\x01\x02",
            20,
            3,
            20,
            0,
            info.flag_bits,
            0,
            0,
            _DOS_DATE,
            info.CRC,
            info.compress_size,
            info.file_size,
            len(info.orig_filename.encode()),
            0,
            0,
            0,
            0,
            _FILE_ATTR,
            info.header_offset,
        )
        + info.orig_filename.encode()
        for info in infos
    )
    return directory + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(infos), len(infos), len(directory), offset, 0)


class BundleSource:
    """A read-only view of a bundle's files: name → size, and a stream per name."""

    name: str

    def sizes(self) -> dict[str, int]:
        raise NotImplementedError

    def open(self, path: str) -> BinaryIO:
        raise NotImplementedError

    def read(self, path: str, limit: int) -> bytes:
        size = self.sizes()[path]
        if size > limit:
            raise fail(f"{path} is {size:,} bytes, over the {limit:,}-byte limit")
        with self.open(path) as stream:
            data = stream.read(limit + 1)
        if len(data) > limit:
            raise fail(f"{path} is over the {limit:,}-byte limit")
        return data

    def close(self) -> None:
        pass


class FolderSource(BundleSource):
    def __init__(self, root: Path):
        self.root = root
        self.name = root.name
        self._sizes: dict[str, int] = {}
        # Walk without following links; anything but a plain file or folder fails closed.
        pending = [("", root)]
        while pending:
            prefix, folder = pending.pop()
            with os.scandir(folder) as entries:
                for entry in entries:
                    rel = prefix + entry.name
                    info = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(info.st_mode):
                        pending.append((rel + "/", Path(entry.path)))
                    elif stat.S_ISREG(info.st_mode):
                        self._sizes[rel] = info.st_size
                    else:
                        raise fail(f"{rel!r} in the bundle is not a regular file (link or special file)")
                    if len(self._sizes) > _MAX_ENTRIES:
                        raise fail(f"the bundle holds more than {_MAX_ENTRIES} files")

    def sizes(self) -> dict[str, int]:
        return self._sizes

    def open(self, path: str) -> BinaryIO:
        full = self.root / path
        # O_NOFOLLOW: a file swapped for a link after listing is refused, not followed.
        try:
            fd = os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise fail(f"{path}: cannot be opened ({exc.strerror}); replaced after listing?") from None
        return os.fdopen(fd, "rb", buffering=0)


class ZipSource(BundleSource):
    def __init__(self, path: Path):
        self.name = path.name[: -len(ARCHIVE_SUFFIX)] if path.name.endswith(ARCHIVE_SUFFIX) else path.name
        try:
            self._handle = open(path, "rb")
        except OSError as exc:
            raise fail(f"cannot read bundle archive {path}: {exc.strerror}") from None
        try:
            self._check_framing(path)
            self._zip = zipfile.ZipFile(self._handle)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, NotImplementedError):
            self._handle.close()
            raise fail(f"{path.name} is not a readable bundle archive") from None
        except BaseException:
            self._handle.close()
            raise
        self._sizes: dict[str, int] = {}
        infos = self._zip.infolist()
        if len(infos) > _MAX_ENTRIES:
            self.close()
            raise fail(f"the archive holds more than {_MAX_ENTRIES} entries")
        for info in infos:
            problem = None
            if info.filename in self._sizes:
                problem = "appears twice"
            elif info.is_dir():
                problem = "is a folder entry"
            elif info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                problem = "is compressed or encrypted"
            elif (info.external_attr >> 16) and not stat.S_ISREG(info.external_attr >> 16):
                problem = "is not a regular file"
            if problem:
                self.close()
                raise fail(f"archive entry {info.filename!r} {problem}")
            self._sizes[info.filename] = info.file_size
        try:
            self._check_layout(infos)
        except BaseException:
            self.close()
            raise

    def _check_layout(self, infos: list[zipfile.ZipInfo]) -> None:
        """Exactly the layout ``write_archive`` produces: members back to back from offset 0, the
        central directory right after them, fixed metadata, local headers equal to the central ones.
        Zip metadata is not signed, so an edit there must fail too."""
        offset = 0
        for info in sorted(infos, key=lambda i: i.header_offset):
            _check_metadata(info, offset)
            offset += self._check_local_header(info, offset) + info.compress_size
        directory = _central_directory(infos, offset)
        self._handle.seek(offset)
        if self._handle.read(len(directory) + 1) != directory:
            raise fail("archive directory differs from its members (modified, or not written by Lepton)")

    def _check_local_header(self, info: zipfile.ZipInfo, offset: int) -> int:
        """The local header at ``offset`` must repeat ``info``; returns its length (name included)."""
        self._handle.seek(offset)
        header = self._handle.read(30)
        if len(header) != 30:
            raise fail("archive truncated")
        (magic, version, system, flags, method, mtime, mdate, crc, csize, usize, nlen, elen) = struct.unpack(
            "<4s2B4HL2L2H", header
        )
        name = self._handle.read(nlen)
        expected_name = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
        if (
            magic != b"PK\x03\x04"
            or (version, system) != (20, 0)
            or flags != info.flag_bits
            or method != info.compress_type
            or crc != info.CRC
            or csize != info.compress_size
            or usize != info.file_size
            or elen != 0
            or name != expected_name
            or (mtime, mdate) != (0, _DOS_DATE)
        ):
            raise fail(f"archive entry {info.filename!r}: local header differs from the directory (modified)")
        return 30 + nlen

    def _check_framing(self, path: Path) -> None:
        size = os.fstat(self._handle.fileno()).st_size
        if size < 22:
            raise zipfile.BadZipFile("too short")
        self._handle.seek(0)
        if self._handle.read(4) != b"PK\x03\x04":
            raise fail(f"{path.name}: data before the first archive member")
        self._handle.seek(size - 22)
        tail = self._handle.read(22)
        if tail[:4] != b"PK\x05\x06" or tail[20:22] != b"\0\0":
            raise fail(f"{path.name}: data after the archive's end record (or an archive comment)")
        self._handle.seek(0)

    def sizes(self) -> dict[str, int]:
        return self._sizes

    def open(self, path: str) -> BinaryIO:
        try:
            return _GuardedStream(self._zip.open(path), path)  # type: ignore[return-value]
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as exc:
            raise fail(f"archive entry {path!r} cannot be read ({exc})") from None

    def close(self) -> None:
        try:
            self._zip.close()
        except AttributeError:
            pass
        self._handle.close()


class _GuardedStream:
    """A zip member stream whose read errors (bad CRC, truncated member) are verification failures."""

    def __init__(self, stream: BinaryIO, path: str):
        self._stream, self._path = stream, path

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
            raise fail(f"archive entry {self._path!r} is corrupt ({str(exc)[:100]})") from None

    def __enter__(self) -> "_GuardedStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stream.close()


def open_source(path: Path) -> BundleSource:
    """A bundle folder or archive; a missing path is a usage error (exit 2), a bad one a verification failure."""
    from lepton_cli.errors import BadInputError

    if not path.exists():
        raise BadInputError(
            f"bundle {path} does not exist", "pass a <model>.<target>.lepton folder or its .zip archive"
        )
    if path.is_dir():
        try:
            return FolderSource(path)
        except OSError as exc:
            raise fail(f"cannot read bundle folder {path}: {exc.strerror}") from None
    return ZipSource(path)


def write_archive(bundle_dir: Path, dest: Path) -> Path:
    """An uncompressed zip of the bundle folder, built beside ``dest`` and renamed into place."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for file in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
                info = zipfile.ZipInfo(file.relative_to(bundle_dir).as_posix(), date_time=_EPOCH)
                info.external_attr = _FILE_ATTR
                with file.open("rb") as src, zf.open(info, "w", force_zip64=file.stat().st_size > 2**31) as out:
                    while block := src.read(1 << 20):
                        out.write(block)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest
