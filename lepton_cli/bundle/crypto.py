"""Bundle encryption: one random content key, Cobblestone per file, HPKE key wrap per recipient.

Checked first, and used as is (nothing hand-rolled): cryptography's ``cobblestone`` (C2SP
chunked encryption, AES-256-GCM; each chunk authenticated, the last chunk flagged so truncation
and appending are detected at ``finalize()``) and ``hazmat.primitives.hpke`` (RFC 9180 base
mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM; an all-zero X25519 share is refused
by the library).

Binding: the Cobblestone context is ``FORMAT/VERSION \\0 bundle_id \\0 path``, and the HPKE
``info`` is ``FORMAT/VERSION key-wrap \\0 bundle_id \\0 recipient key id``: a file moved to
another path or another bundle, or a wrapped key copied to another bundle, does not decrypt.

Plaintext: ``decrypt_stream`` writes into one buffer and hands it out only after
``finalize()`` and the ciphertext's sha256 both passed; on any failure the buffer is zeroed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import queue
import threading
from typing import BinaryIO, Iterable

from cryptography.cobblestone import Cobblestone256Decryptor, Cobblestone256Encryptor
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke

from lepton_cli.bundle.keys import EncryptionPrivateKey, EncryptionPublicKey, key_id
from lepton_cli.bundle.manifest import FORMAT, FORMAT_VERSION, fail

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
BLOCK = 1 << 20  # streaming block: bounded memory, large enough to keep AES-GCM at full speed
_SLACK = 4096  # update_into wants room for one more chunk than it writes
_PRESIZE = 33 << 20  # above glibc's largest mmap threshold (32 MiB): growth beyond it is mremap, not copy


def new_content_key() -> bytes:
    return Cobblestone256Encryptor.generate_key()


def file_context(bundle_id: str, path: str) -> bytes:
    return f"{FORMAT}/{FORMAT_VERSION}\0{bundle_id}\0{path}".encode()


def _wrap_info(bundle_id: str, recipient_id: str) -> bytes:
    return f"{FORMAT}/{FORMAT_VERSION} key-wrap\0{bundle_id}\0{recipient_id}".encode()


def wrap_key(content_key: bytes, recipients: Iterable[EncryptionPublicKey], bundle_id: str) -> list[dict[str, str]]:
    """One HPKE-sealed copy of the content key per recipient, labelled with the recipient's key id."""
    out = []
    for public in recipients:
        rid = key_id(public)
        sealed = SUITE.encrypt(content_key, public, info=_wrap_info(bundle_id, rid))
        out.append({"key_id": rid, "wrapped_key": base64.b64encode(sealed).decode()})
    return out


def unwrap_key(entries: list[dict[str, str]], private: EncryptionPrivateKey, bundle_id: str) -> bytes:
    """The content key, from the entry addressed to ``private`` (fails closed: exit 4)."""
    rid = key_id(private)
    mine = [e for e in entries if e.get("key_id") == rid]
    if not mine:
        raise fail(
            f"the bundle is not encrypted to your key {rid} (recipients: {', '.join(e.get('key_id', '?') for e in entries)[:300]})",
            "pass the matching --key, or recompile with --recipient YOUR-encryption-public.pem",
        )
    try:
        sealed = base64.b64decode(mine[0]["wrapped_key"], validate=True)
        key = SUITE.decrypt(sealed, private, info=_wrap_info(bundle_id, rid))
    except (binascii.Error, InvalidTag, ValueError):
        raise fail(
            "the wrapped content key for your key does not decrypt (tampered or bound to another bundle)"
        ) from None
    if len(key) != 32:
        raise fail("the wrapped content key has the wrong length")
    return key


def encrypt_bytes(content_key: bytes, context: bytes, data: bytes | memoryview) -> tuple[bytes, str]:
    """Encrypt ``data`` block by block into one buffer sized once; returns (ciphertext, its sha256).

    The hash is taken of each block just written, while it is still in cache, and the buffer is
    handed over by ``BytesIO.getvalue()`` without a copy.
    """
    view = memoryview(data)
    out = io.BytesIO()
    out.seek(len(view) + len(view) // 4096 + 2 * BLOCK + _SLACK - 1)
    out.write(b"\0")
    buf = out.getbuffer()
    digest = hashlib.sha256()
    enc = Cobblestone256Encryptor(content_key, context)
    pos = 0
    try:
        for start in range(0, len(view), BLOCK):
            wrote = enc.update_into(view[start : start + BLOCK], buf[pos:])
            digest.update(buf[pos : pos + wrote])
            pos += wrote
        tail = enc.finalize()
        buf[pos : pos + len(tail)] = tail
        digest.update(tail)
        pos += len(tail)
    finally:
        buf.release()
    out.truncate(pos)
    return out.getvalue(), digest.hexdigest()


def encrypt_stream(content_key: bytes, context: bytes, blocks: Iterable[bytes], out: BinaryIO) -> tuple[str, int, int]:
    """Encrypt ``blocks`` into ``out`` through one small buffer (a model's external data, any size);
    returns (ciphertext sha256, ciphertext size, plaintext size). Same ciphertext as ``encrypt_bytes``."""
    scratch = bytearray(2 * BLOCK + _SLACK)
    view = memoryview(scratch)
    digest = hashlib.sha256()
    enc = Cobblestone256Encryptor(content_key, context)
    cipher = plain = 0
    try:
        for block in blocks:
            block_view = memoryview(block)
            for start in range(0, len(block_view), BLOCK):
                piece = block_view[start : start + BLOCK]
                wrote = enc.update_into(piece, view)
                out.write(view[:wrote])
                digest.update(view[:wrote])
                cipher += wrote
                plain += len(piece)
        tail = enc.finalize()
        out.write(tail)
        digest.update(tail)
        cipher += len(tail)
    finally:
        view.release()
    return digest.hexdigest(), cipher, plain


def hash_stream(stream: BinaryIO, expected_size: int) -> tuple[str, int]:
    digest, total = hashlib.sha256(), 0
    while block := stream.read(BLOCK):
        total += len(block)
        if total > expected_size:
            break  # longer than signed: stop reading, the caller reports the mismatch
        digest.update(block)
    return digest.hexdigest(), total


class _HashingReader:
    """Reads and hashes blocks in a helper thread, ``depth`` blocks ahead of the decryptor.

    File reads and ``hashlib`` release the GIL, so on two cores the hash costs no wall time
    beside the decryption. Blocks are read into a fixed ring of reused buffers (``readinto``):
    no fresh allocation, hence no page faults, per block.
    """

    def __init__(self, stream: BinaryIO, limit: int, depth: int = 4):
        self.digest = hashlib.sha256()
        self.total = 0
        self.too_long = False
        self._stream, self._limit = stream, limit
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        # depth queued + one being decrypted + one being filled, plus a spare.
        self._ring = [bytearray(BLOCK) for _ in range(depth + 3)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lepton-bundle-hash", daemon=True)
        self._thread.start()

    def _fill(self, buf: bytearray) -> memoryview:
        view = memoryview(buf)
        readinto = getattr(self._stream, "readinto", None)
        if readinto is None:  # e.g. a zip member stream without readinto
            block = self._stream.read(BLOCK)
            view[: len(block)] = block
            return view[: len(block)]
        filled = 0
        while filled < BLOCK:
            n = readinto(view[filled:])
            if not n:
                break
            filled += n
        return view[:filled]

    def _run(self) -> None:
        try:
            index = 0
            while not self._stop.is_set():
                block = self._fill(self._ring[index % len(self._ring)])
                index += 1
                if not block:
                    break
                self.total += len(block)
                if self.total > self._limit:
                    self.too_long = True
                    break
                self.digest.update(block)
                self._queue.put(block)
            self._queue.put(None)
        except BaseException as exc:  # handed to the consumer, raised there
            self._queue.put(exc)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


def _presized_buffer(plain_size: int) -> io.BytesIO:
    """A ``BytesIO`` sized up front to min(plaintext, 33 MiB).

    glibc's realloc copies (and frees a copy of the plaintext) only below its mmap threshold, at most
    32 MiB; above it the buffer grows by mremap, moving pages, leaving no copy behind. So a failure's
    wipe reaches every byte that was decrypted."""
    buffer = io.BytesIO()
    presize = min(plain_size, _PRESIZE)
    if presize:
        buffer.seek(presize - 1)
        buffer.write(b"\0")
        buffer.seek(0)
    return buffer


def _decrypt_blocks(
    reader: _HashingReader, dec: Cobblestone256Decryptor, scratch: memoryview, buffer: io.BytesIO
) -> tuple[int, bool]:
    """Decrypt every block into ``buffer``; (bytes written, whether authentication failed).

    After a failed block the rest is still read and hashed: a modified file is reported as such."""
    pos, auth_failed = 0, False
    for block in reader:
        if not auth_failed:
            try:
                written = dec.update_into(block, scratch)
                buffer.write(scratch[:written])
                pos += written
            except InvalidTag:
                auth_failed = True
    return pos, auth_failed


def _check_signed_cipher(reader: _HashingReader, path: str, cipher_size: int, cipher_sha256: str) -> None:
    if reader.too_long:
        raise fail(f"{path}: longer than the signed size ({cipher_size} bytes): trailing data")
    if reader.total != cipher_size or reader.digest.hexdigest() != cipher_sha256:
        raise fail(f"{path}: content does not match the signed sha256 (modified or truncated)")


def decrypt_stream(
    stream: BinaryIO,
    *,
    content_key: bytes,
    context: bytes,
    cipher_size: int,
    cipher_sha256: str,
    plain_size: int,
    path: str,
) -> bytes:
    """Hash and decrypt in one pass; return the plaintext only if both the hash and the AEAD check pass.

    Each block is decrypted into a small reused buffer and appended to a ``BytesIO``, whose
    ``getvalue()`` CPython hands over without a copy: peak memory is one model. Growing the buffer
    as blocks arrive (rather than sizing all of it up front, which zero-fills every page before the
    first block is read) lets the kernel's page faults for the plaintext overlap the reading thread.
    """
    buffer = _presized_buffer(plain_size)
    scratch = bytearray(2 * BLOCK + _SLACK)  # update_into wants room for one more chunk than it writes
    scratch_view = memoryview(scratch)
    ok = False
    reader = _HashingReader(stream, cipher_size)
    try:
        dec = Cobblestone256Decryptor(content_key, context)
        pos, auth_failed = _decrypt_blocks(reader, dec, scratch_view, buffer)
        _check_signed_cipher(reader, path, cipher_size, cipher_sha256)
        if auth_failed:
            raise InvalidTag()
        tail = dec.finalize()
        buffer.write(tail)
        pos += len(tail)
        buffer.truncate(pos)  # a pre-sized buffer longer than what was decrypted
        if pos != plain_size:
            raise fail(f"{path}: decrypted size {pos} differs from the signed plain size {plain_size}")
        ok = True
    except InvalidTag:
        raise fail(f"{path}: decryption failed authentication (wrong key, context or tampered data)") from None
    except ValueError as exc:  # update_into on malformed input
        raise fail(f"{path}: malformed ciphertext ({exc})") from None
    finally:
        reader.close()
        if not ok:  # unauthenticated plaintext never outlives the failure
            _wipe(scratch_view)
            view = buffer.getbuffer()
            _wipe(view)
            view.release()
        scratch_view.release()
    return buffer.getvalue()


def _wipe(view: memoryview) -> None:
    """Zero a buffer in place, a block at a time (no second buffer of its size)."""
    zeros = bytes(min(BLOCK, len(view)))
    for start in range(0, len(view), BLOCK):
        end = min(start + BLOCK, len(view))
        view[start:end] = zeros[: end - start]
