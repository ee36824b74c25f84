"""``manifest.json``: what a bundle holds, and strict validation of an untrusted one.

The manifest is read only after its sha256 matched the signed statement, yet it is still parsed
as hostile input (a signer's bug, or a future format): size limit, no duplicate keys, no
NaN/Infinity, known format version, every path a plain relative name.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

from lepton_cli.errors import VerificationError

FORMAT = "lepton-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "model.sig"
PRIMARY_MODEL = "model.onnx"  # the bundle's main model; variants live under variants/
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
ROLES = frozenset({"model", "model_data", "report", "data"})
DATA_SUFFIX = ".data"  # a model's external data file: <model plain path>.data, encrypted like the model
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_SAFE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def fail(message: str, fix: str | None = None) -> VerificationError:
    return VerificationError(message, fix or "do not use this bundle; ask its publisher for a fresh copy")


def check_path(path: object, where: str) -> str:
    """A bundle path: relative, '/'-separated, no '..', backslash, NUL, empty or dot-leading part."""
    if not isinstance(path, str) or not path or len(path) > 255:
        raise fail(f"{where}: invalid file path {path!r}")
    if "\x00" in path or "\\" in path or path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise fail(f"{where}: unsafe file path {path!r} (absolute, backslash or NUL)")
    parts = path.split("/")
    if any(part in ("", ".", "..") or not _SAFE_PART.fullmatch(part) for part in parts):
        raise fail(f"{where}: unsafe file path {path!r}")
    return path


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise fail(f"{what} is not valid JSON ({str(exc).splitlines()[0][:120]})") from None


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise fail(f"manifest.json: {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_expires(value: str) -> datetime:
    """ISO 8601 with a time zone (a date alone means the end of that day in UTC)."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            return datetime.fromisoformat(value).replace(hour=23, minute=59, second=59, tzinfo=timezone.utc)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"invalid date {value!r}") from None
    if parsed.tzinfo is None:
        raise ValueError(f"date {value!r} has no time zone")
    return parsed


def validate(doc: Any) -> dict[str, Any]:
    """Check the structure the reader relies on; anything else in the manifest is informational."""
    _check_header(doc)
    files = doc.get("files")
    _require(isinstance(files, list) and files, "files must be a non-empty list")
    _check_files(files)
    _check_model_data(files)
    _validate_device_artifacts(doc.get("device_artifacts"), files)
    _check_encryption(doc.get("encryption"))
    return doc


def _check_header(doc: Any) -> None:
    _require(isinstance(doc, dict), "not a JSON object")
    _require(doc.get("format") == FORMAT, f"format is {doc.get('format')!r}, not {FORMAT!r}")
    version = doc.get("format_version")
    if version != FORMAT_VERSION or not _is_int(version):
        raise fail(
            f"unknown bundle format version {version!r} (this Lepton reads version {FORMAT_VERSION})",
            "upgrade Lepton, or recompile the bundle with this version",
        )
    _require(
        isinstance(doc.get("bundle_id"), str) and _HEX32.fullmatch(doc["bundle_id"]) is not None,
        "bundle_id must be 32 hex digits",
    )
    _require(_is_int(doc.get("version")) and 0 <= doc["version"] < 2**63, "version must be a non-negative integer")
    expires = doc.get("expires")
    if expires is not None:
        _require(isinstance(expires, str), "expires must be a string")
        try:
            parse_expires(expires)
        except ValueError as exc:
            raise fail(f"manifest.json: expires: {exc}") from None
    _require(isinstance(doc.get("model"), dict) and isinstance(doc["model"].get("name"), str), "model.name missing")
    _require(isinstance(doc.get("target"), dict) and isinstance(doc["target"].get("name"), str), "target.name missing")


def _check_files(files: list[Any]) -> None:
    """Each entry: a safe, unique path, a known role, size and sha256; an encrypted one a unique plain path."""
    seen: set[str] = set()
    plain_paths: set[str] = set()
    for index, entry in enumerate(files):
        where = f"manifest.json files[{index}]"
        _require(isinstance(entry, dict), f"files[{index}] is not an object")
        path = check_path(entry.get("path"), where)
        _require(
            path not in seen and path not in (MANIFEST, SIGNATURE),
            f"files[{index}]: duplicate or reserved path {path!r}",
        )
        seen.add(path)
        _require(entry.get("role") in ROLES, f"files[{index}]: unknown role {entry.get('role')!r}")
        _require(
            _is_int(entry.get("size")) and entry["size"] >= 0, f"files[{index}]: size must be a non-negative integer"
        )
        _require(
            isinstance(entry.get("sha256"), str) and _HEX64.fullmatch(entry["sha256"]) is not None,
            f"files[{index}]: sha256 must be 64 hex digits",
        )
        _require(isinstance(entry.get("encrypted"), bool), f"files[{index}]: encrypted must be true or false")
        if entry["encrypted"]:
            plain = check_path(entry.get("plain_path"), where)
            _require(plain not in plain_paths, f"files[{index}]: plain_path {plain!r} appears twice")
            plain_paths.add(plain)
            _require(
                _is_int(entry.get("plain_size")) and 0 <= entry["plain_size"] <= entry["size"],
                f"files[{index}]: plain_size invalid",
            )


def _check_encryption(enc: Any) -> None:
    _require(isinstance(enc, dict), "encryption header missing")
    _require(enc.get("scheme") == ENCRYPTION_SCHEME, f"unknown encryption scheme {enc.get('scheme')!r}")
    recipients = enc.get("recipients")
    _require(
        isinstance(recipients, list) and 0 < len(recipients) <= 64, "encryption.recipients must list 1 to 64 recipients"
    )
    for index, entry in enumerate(recipients):
        _require(
            isinstance(entry, dict)
            and isinstance(entry.get("key_id"), str)
            and isinstance(entry.get("wrapped_key"), str),
            f"encryption.recipients[{index}] needs key_id and wrapped_key",
        )


def _check_model_data(files: list[dict[str, Any]]) -> None:
    """A model's external data file and the model name each other, one to one, both encrypted."""
    models = {e["plain_path"]: e for e in files if e.get("role") == "model" and e["encrypted"]}
    linked: set[str] = set()
    for index, entry in enumerate(files):
        if entry["role"] == "model_data":
            owner = models.get(entry.get("model")) if isinstance(entry.get("model"), str) else None
            _require(
                entry["encrypted"] and owner is not None,
                f"files[{index}]: model_data must be encrypted and name an encrypted model",
            )
            _require(
                entry["plain_path"] == owner["plain_path"] + DATA_SUFFIX
                and owner.get("external_data") == entry["plain_path"],
                f"files[{index}]: model_data {entry['plain_path']!r} and model {owner['plain_path']!r} do not name each other",
            )
            linked.add(owner["plain_path"])
    for path, entry in models.items():
        if "external_data" in entry:
            _require(
                path in linked,
                f"model {path!r} names external data {entry['external_data']!r} that the bundle does not list",
            )


DEVICE_FORMATS = frozenset({"ort", "tflite"})


def _validate_device_artifacts(listed: Any, files: list[dict[str, Any]]) -> None:
    """``device_artifacts`` (optional): each entry an encrypted model of a known format, made from a listed ONNX model."""
    if listed is None:
        return
    _require(isinstance(listed, list), "device_artifacts must be a list")
    models = {entry["plain_path"] for entry in files if entry["encrypted"]}
    plain = {entry["path"] for entry in files if not entry["encrypted"]}
    seen: set[str] = set()
    for index, entry in enumerate(listed):
        where = f"device_artifacts[{index}]"
        _require(isinstance(entry, dict), f"{where} is not an object")
        _require(entry.get("format") in DEVICE_FORMATS, f"{where}: unknown format {entry.get('format')!r}")
        path = check_path(entry.get("path"), f"manifest.json {where}")
        _require(
            path in models and path not in seen,
            f"{where}: {path!r} is not an encrypted model of the bundle, or is listed twice",
        )
        seen.add(path)
        _require(entry.get("from") in models, f"{where}: 'from' {entry.get('from')!r} is not a model of the bundle")
        _require(isinstance(entry.get("runtime"), str), f"{where}: runtime must be a string")
        config = entry.get("ops_config")
        _require(config is None or config in plain, f"{where}: ops_config {config!r} is not a plain file of the bundle")
        if entry["format"] == "tflite":
            names = entry.get("io_names")
            _require(
                isinstance(names, dict)
                and all(
                    isinstance(names.get(k), dict)
                    and all(isinstance(a, str) and isinstance(b, str) for a, b in names[k].items())
                    for k in ("inputs", "outputs")
                ),
                f"{where}: io_names must map inputs and outputs (ONNX name -> TFLite signature name)",
            )


ENCRYPTION_SCHEME = "lepton-c2sp-chunked-aes256gcm+hpke-x25519-hkdfsha256-aes256gcm/1"


def now_utc() -> datetime:
    return datetime.now(timezone.utc)
