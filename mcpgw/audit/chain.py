# -*- test-case-name: tests.test_audit_chain -*-
"""
The audit hash chain (C{audit.integrity.chain}), its signed checkpoints, and their verification
(C{mcpgw audit verify}). The format is documented for third-party verifiers in docs/audit.md
("The chain, byte by byte"); in short (version 1):

  - A chained line is one JSON object that ends with C{,"seq":N,"hash":"<64 lowercase hex>"}}
    and a newline. Its I{head} is its bytes up to, not including, C{,"hash":"}: it ends with
    C{,"seq":N}.
  - C{hash_N = SHA-256(hash_{N-1} as 32 raw bytes || head_N)}; before the first line of a
    chain, C{hash_0} is 32 zero bytes. C{seq} goes up by one per line, across files.
  - Lines that are not requests carry C{"event"}: C{chain} (written when the writer opens a file:
    at start, and for a new file after rotation; it names the previous line's C{prev_seq} and
    C{prev_hash}, and how many bytes of an incomplete last line a crash left and were cut,
    C{torn_bytes}) and C{checkpoint} (every C{checkpoint.lines} lines or C{checkpoint.seconds}
    seconds, and at stop; C{signed_seq}/C{signed_hash} are the line before it, C{sig} an
    Ed25519 signature of L{checkpointMessage}, C{key_id} names the key).

The hashed bytes are the bytes on disk, so a verifier never re-serialises JSON.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
from binascii import Error as HexError
from binascii import unhexlify
from collections.abc import Iterator, Sequence
from typing import IO, Any, cast

import attr
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

#: The hash before the first line of a chain.
GENESIS = bytes(32)
_HASH_KEY = b',"hash":"'
_SEQ_KEY = b',"seq":'
#: A chained line ends with C{,"hash":"} + 64 hex digits + C{"}} + newline.
SUFFIX_LEN = len(_HASH_KEY) + 64 + 3
_EVENT = b'"event":"'


def checkpointMessage(seq: int, digest: str, ts: str, reason: str) -> bytes:
    """The bytes a checkpoint's signature covers (ASCII, space-separated)."""
    return f"mcpgw-audit-checkpoint/v1 {seq} {digest} {ts} {reason}".encode()


class Chain:
    """
    The sequencer: the last line's C{seq} and hash; L{seal} appends the next line's.

    One per canonical file, in the process that owns it (with C{listen.workers}, the supervisor).
    """

    __slots__ = ("digest", "seq")

    def __init__(self, seq: int = 0, digest: bytes = GENESIS) -> None:
        self.seq = seq
        self.digest = digest

    def seal(self, body: bytes) -> bytes:
        """
        @param body: one JSON object (C{{...}}, no newline, no C{seq}/C{hash} keys).
        @return: the chained line, newline included.
        """
        seq = self.seq + 1
        head = b'{"seq":%d' % seq if body == b"{}" else body[:-1] + b',"seq":%d' % seq
        digest = hashlib.sha256(self.digest + head).digest()
        self.seq = seq
        self.digest = digest
        return head + _HASH_KEY + digest.hex().encode() + b'"}\n'


def chainState(line: bytes) -> tuple[int, bytes] | None:
    """The C{(seq, hash)} a chained line ends with, or C{None} if it is not one."""
    if len(line) < SUFFIX_LEN + 8 or not line.endswith(b'"}\n'):
        return None
    if line[-SUFFIX_LEN : -SUFFIX_LEN + len(_HASH_KEY)] != _HASH_KEY:
        return None
    head = line[:-SUFFIX_LEN]
    i = head.rfind(_SEQ_KEY)
    if i < 0:
        return None
    try:
        return int(head[i + len(_SEQ_KEY) :]), bytes.fromhex(line[-67:-3].decode("ascii"))
    except ValueError:
        return None


def readTail(fd: int) -> tuple[bytes | None, int, int]:
    """
    The last complete line of the file open on C{fd}, the number of bytes after it (an
    incomplete line a crash left), and the offset where that incomplete line starts.
    """
    size = os.fstat(fd).st_size
    pos = size
    buf = b""
    while True:
        nl = buf.rfind(b"\n")
        if nl >= 0:
            prev = buf.rfind(b"\n", 0, nl)
            if prev >= 0 or pos == 0:
                return buf[prev + 1 : nl + 1], len(buf) - nl - 1, size - (len(buf) - nl - 1)
        elif pos == 0:
            return None, len(buf), 0
        step = min(65536, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf


def _openAny(path: str) -> IO[bytes]:
    f: IO[bytes] = open(path, "rb", buffering=1 << 20)  # noqa: SIM115
    if f.read(2) == b"\x1f\x8b":
        f.close()
        return io.BufferedReader(cast(Any, gzip.open(path, "rb")), buffer_size=1 << 20)
    f.seek(0)
    return f


def lastChainState(path: str) -> tuple[int, bytes] | None:
    """The chain state at the end of a (possibly gzip-compressed) audit file, or C{None}."""
    if not path.endswith(".gz"):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            line, _, _ = readTail(fd)
        finally:
            os.close(fd)
        return chainState(line) if line else None
    last = None
    with _openAny(path) as f:
        for line in f:
            if line.endswith(b"\n"):
                last = line
    return chainState(last) if last else None


def previousFile(path: str) -> str | None:
    """
    The most recently modified rotated sibling of C{path} (C{audit.jsonl.1},
    C{audit.jsonl-20261124.gz}, ...): where the chain came from when a restart finds the file
    itself empty or missing.
    """
    directory = os.path.dirname(path) or "."
    base = os.path.basename(path)
    best: tuple[float, str] | None = None
    try:
        names = os.listdir(directory)
    except OSError:
        return None
    for name in names:
        if name == base or not name.startswith(base) or name[len(base)] not in ".-_":
            continue
        full = os.path.join(directory, name)
        try:
            mtime = os.stat(full).st_mtime
        except OSError:
            continue
        if best is None or mtime > best[0]:
            best = (mtime, full)
    return best[1] if best else None


def firstSeq(path: str) -> int:
    """The C{seq} of the first chained line of an audit file (-1 if it has none)."""
    with _openAny(path) as f:
        for line in f:
            state = chainState(line)
            if state is not None:
                return state[0]
    return -1


def bySeq(paths: Sequence[str]) -> list[str]:
    """
    Audit files in chain order, by the C{seq} of their first chained line: for the objects a
    sink shipped (batches of consecutive lines), downloaded in any order.
    """
    return sorted(paths, key=firstSeq)


# -- keys ------------------------------------------------------------------------------


def keyId(key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the SHA-256 of the raw public key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def loadSigningKey(path: str) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file; C{ValueError} saying why not."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 key (mcpgw audit keygen writes one)")
    return key


def loadPublicKey(path: str) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (a private key's file works too)."""
    with open(path, "rb") as f:
        data = f.read()
    if b"PRIVATE KEY" in data:
        return loadSigningKey(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def keygen(privatePath: str, publicPath: str) -> str:
    """
    Write a new Ed25519 pair: the private key (PKCS#8 PEM, mode 0600, never overwritten) and the
    public key (SubjectPublicKeyInfo PEM). @return: the key id.
    """
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(privatePath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    fd = os.open(publicPath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(public)
    return keyId(key.public_key())


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message)).decode("ascii")


# -- verification ----------------------------------------------------------------------

#: What a break can be.
KINDS = ("removed", "altered", "inserted", "reordered", "truncated", "bad_signature")


@attr.s(auto_attribs=True, frozen=True)
class Break:
    """The first place the trail is not intact."""

    file: str
    line: int
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.kind}: {self.detail}"


@attr.s(auto_attribs=True)
class Report:
    """What L{verify} found."""

    files: int = 0
    lines: int = 0
    unchained: int = 0
    firstSeq: int | None = None
    lastSeq: int = 0
    lastHash: str = ""
    checkpoints: int = 0
    signatures: int = 0
    crashes: int = 0
    lastSignedSeq: int = 0
    cleanEnd: bool = False
    brk: Break | None = None


class _Stop(Exception):
    pass


class Verifier:
    """
    Checks a series of audit files, oldest first (L{verify}).

    @param publicKey: checkpoint signatures are checked with it (and every checkpoint must be
        signed by it); C{None}: signatures are not checked.
    @param live: the last file is still being written, so it need not end with the checkpoint
        written at stop.
    """

    def __init__(self, publicKey: Ed25519PublicKey | None = None, live: bool = False) -> None:
        self.publicKey = publicKey
        self.keyId = keyId(publicKey) if publicKey is not None else None
        self.live = live
        self.report = Report()
        self._seq: int | None = None
        self._digest = GENESIS
        self._stopped = False  # the last line seen is a checkpoint written at stop
        self._seen = False  # a chained line was seen (so _stopped means something)
        self._file = ""
        self._line = 0

    def _break(self, kind: str, detail: str, line: int | None = None) -> None:
        self.report.brk = Break(self._file, self._line if line is None else line, kind, detail)
        raise _Stop()

    def verify(self, paths: Sequence[str]) -> Report:
        try:
            for path in paths:
                self._file = path
                self._line = 0
                try:
                    with _openAny(path) as f:
                        self._verifyFile(f)
                except (OSError, EOFError, gzip.BadGzipFile) as e:
                    self._break("truncated", f"cannot read the file: {e}")
                self.report.files += 1
            if self._seq is None:
                self._file, self._line = (paths[-1] if paths else "-"), 0
                self._break("truncated", "no chained line at all (is audit.integrity.chain on?)")
            if not self._stopped and not self.live:
                self._break(
                    "truncated",
                    f"the last line (seq {self._seq}) is not the checkpoint written at stop: "
                    "lines were cut from the end, or the gateway is still running (verify a file "
                    "in use with --live) or was killed",
                )
        except _Stop:
            pass
        r = self.report
        r.lastSeq = self._seq or 0
        r.lastHash = self._digest.hex()
        r.cleanEnd = self._stopped
        return r

    def _verifyFile(self, f: IO[bytes]) -> None:
        sha = hashlib.sha256
        lines = iter(f)
        report = self.report
        seq = self._seq
        digest = self._digest
        n = self._line
        for line in lines:
            n += 1
            self._line = n
            if line[-3:] != b'"}\n' or line[-SUFFIX_LEN : -SUFFIX_LEN + 9] != _HASH_KEY:
                if not line.endswith(b"\n"):
                    self._break("truncated", "the line is incomplete (cut in the middle)")
                if seq is None:
                    report.unchained += 1  # lines from before the chain was turned on
                    continue
                self._seq, self._digest = seq, digest
                self._break("inserted", "a line without seq and hash inside the chain")
            head = line[:-SUFFIX_LEN]
            i = head.rfind(_SEQ_KEY)
            try:
                lineSeq = int(head[i + 7 :]) if i > 0 else -1
            except ValueError:
                lineSeq = -1
            if lineSeq < 0:
                self._seq, self._digest = seq, digest
                self._break("altered", "the seq field is not a number")
            hexed = line[-67:-3]
            isEvent = _EVENT in head
            if seq is None:
                # The first chained line: anchored by its own chain line's prev_hash if it is
                # one, else taken on trust (an earlier file was not given).
                prev = self._anchor(line) if isEvent else None
                report.firstSeq = lineSeq
                if prev is not None:
                    seq, digest = prev
                    if lineSeq != seq + 1:
                        self._break("altered", f"seq {lineSeq} does not follow prev_seq {seq}")
                else:
                    seq, digest = lineSeq, bytes.fromhex(hexed.decode("ascii"))
                    report.lines += 1
                    obj = orjson.loads(line) if isEvent else {}
                    self._stopped = obj.get("event") == "checkpoint" and obj.get("reason") == "stop"
                    self._seen = True
                    continue
            if lineSeq != seq + 1:
                self._seq, self._digest = seq, digest
                self._misordered(lineSeq, seq + 1, lines)
            h = sha(digest)
            h.update(head)
            lineDigest = h.digest()
            try:
                stated = unhexlify(hexed)
            except HexError:
                stated = b""
            if lineDigest != stated:
                self._seq, self._digest = seq, digest
                self._break(
                    "altered",
                    f"seq {lineSeq}: the line's bytes do not hash to its hash (edited, or "
                    "replaced)",
                )
            prevSeq, prevDigest = seq, digest
            seq, digest = lineSeq, lineDigest
            report.lines += 1
            if isEvent:
                self._seq, self._digest = prevSeq, prevDigest
                self._event(line, lineSeq, n)
                self._seq, self._digest = seq, digest
            else:
                self._stopped = False
            self._seen = True
        self._seq, self._digest, self._line = seq, digest, n

    def _anchor(self, line: bytes) -> tuple[int, bytes] | None:
        obj = orjson.loads(line)
        if obj.get("event") != "chain":
            return None
        try:
            return int(obj["prev_seq"]), bytes.fromhex(obj["prev_hash"])
        except (KeyError, TypeError, ValueError):
            return None

    def _misordered(self, got: int, expected: int, rest: Iterator[bytes]) -> None:
        atFileStart = self._line == 1
        if got > expected:
            for _ in range(16):
                nxt = next(rest, None)
                if nxt is None:
                    break
                state = chainState(nxt)
                if state is not None and state[0] == expected:
                    self._break(
                        "reordered", f"seq {got} comes before seq {expected}; lines were moved"
                    )
            if atFileStart:
                self._break(
                    "truncated",
                    f"this file starts at seq {got} but the previous file ends at seq "
                    f"{expected - 1}: lines {expected}..{got - 1} were cut from the end of the "
                    "previous file (or a file of the series is missing)",
                )
            self._break("removed", f"seq {expected}..{got - 1} missing before this line")
        self._break(
            "inserted",
            f"seq {got} after seq {expected - 1}: a line was inserted (or copied) here",
        )

    def _event(self, line: bytes, lineSeq: int, n: int) -> None:
        """Check a chain or checkpoint line (already hash-checked); C{_seq} is the line before."""
        obj = orjson.loads(line)
        event = obj.get("event")
        report = self.report
        if event == "chain":
            if obj.get("reason") == "start" and self._seen and not self._stopped:
                report.crashes += 1  # restarted without the stop checkpoint: killed
            self._stopped = False
            prevSeq, prevHash = obj.get("prev_seq"), obj.get("prev_hash")
            if (prevSeq, prevHash) != (self._seq, self._digest.hex()):
                self._break(
                    "altered", "the chain line's prev_seq/prev_hash are not the line before"
                )
            return
        if event != "checkpoint":
            self._stopped = False
            return
        report.checkpoints += 1
        signedSeq, signedHash = obj.get("signed_seq"), obj.get("signed_hash")
        if (signedSeq, signedHash) != (lineSeq - 1, self._digest.hex()):
            self._break("altered", "the checkpoint does not name the line before it")
        if self.publicKey is not None:
            sig, kid = obj.get("sig"), obj.get("key_id")
            if not isinstance(sig, str):
                self._break("bad_signature", f"checkpoint seq {lineSeq} is not signed")
            if kid != self.keyId:
                self._break(
                    "bad_signature",
                    f"checkpoint seq {lineSeq} is signed by key {kid}, not by {self.keyId}",
                )
            message = checkpointMessage(
                lineSeq - 1, str(signedHash), str(obj.get("ts")), str(obj.get("reason"))
            )
            try:
                self.publicKey.verify(base64.b64decode(sig), message)
            except (InvalidSignature, ValueError):
                self._break("bad_signature", f"checkpoint seq {lineSeq}: the signature is wrong")
            report.signatures += 1
            report.lastSignedSeq = lineSeq
        self._stopped = obj.get("reason") == "stop"


def verify(
    paths: Sequence[str], publicKey: Ed25519PublicKey | None = None, live: bool = False
) -> Report:
    """Check the audit files C{paths}, oldest first; the report holds the first break, if any."""
    return Verifier(publicKey, live).verify(paths)


def describe(report: Report, publicKey: Any) -> str:
    """The human summary of an intact report."""
    parts = [
        f"intact: {report.lines} chained line(s) in {report.files} file(s), "
        f"seq {report.firstSeq}..{report.lastSeq}, last hash {report.lastHash}",
        f"{report.checkpoints} checkpoint(s)"
        + (
            f", {report.signatures} signature(s) verified"
            if publicKey is not None
            else " (signatures not checked: no --public-key)"
        ),
    ]
    if report.unchained:
        parts.append(f"{report.unchained} line(s) before the chain started are not covered")
    if report.crashes:
        parts.append(f"{report.crashes} restart(s) after the gateway stopped without a checkpoint")
    if publicKey is not None and report.lastSignedSeq < report.lastSeq:
        parts.append(
            f"lines after seq {report.lastSignedSeq} are not covered by a signed checkpoint yet"
        )
    return "; ".join(parts)
