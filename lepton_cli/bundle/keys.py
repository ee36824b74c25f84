"""Key pairs for bundles: an ECDSA P-256 signing pair and an X25519 encryption pair.

Checked first: cryptography's ``serialization`` reads and writes PKCS#8 / SubjectPublicKeyInfo
PEM, and its PEM reader skips text before ``-----BEGIN``, so each key file starts with one
comment line naming its purpose and key id (people and ``lepton`` can tell the files apart) and
stays readable by other tools — ``model_signing verify key`` reads our ``signing-public.pem``.

The two purposes are different key types, so a signing key can never be used to encrypt or the
reverse; loading checks the type and says which purpose the file actually has.

Where keys come from, in order: an explicit option, an environment variable
(``LEPTON_SIGNING_KEY``, ``LEPTON_RECIPIENT``, ``LEPTON_DECRYPTION_KEY``, ``LEPTON_TRUST``: a path
or the PEM text itself, for CI secrets), then the development set in the config folder
(``$LEPTON_HOME``, else ``$XDG_CONFIG_HOME/lepton``, else ``~/.config/lepton``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from lepton_cli.errors import BadInputError

SigningPrivateKey = ec.EllipticCurvePrivateKey
SigningPublicKey = ec.EllipticCurvePublicKey
EncryptionPrivateKey = x25519.X25519PrivateKey
EncryptionPublicKey = x25519.X25519PublicKey
AnyKey = Union[SigningPrivateKey, SigningPublicKey, EncryptionPrivateKey, EncryptionPublicKey]
Purpose = Literal["signing", "encryption"]

KEY_FILES = {
    ("signing", "private"): "signing-private.pem",
    ("signing", "public"): "signing-public.pem",
    ("encryption", "private"): "encryption-private.pem",
    ("encryption", "public"): "encryption-public.pem",
}
ENV = {
    "sign": "LEPTON_SIGNING_KEY",
    "recipient": "LEPTON_RECIPIENT",
    "decrypt": "LEPTON_DECRYPTION_KEY",
    "trust": "LEPTON_TRUST",
}
_ID_PREFIX = {"signing": "lepton-sign-", "encryption": "lepton-enc-"}


def config_dir() -> Path:
    """Lepton's per-user folder: ``$LEPTON_HOME``, else XDG config, else ``~/.config/lepton``."""
    if os.environ.get("LEPTON_HOME"):
        return Path(os.environ["LEPTON_HOME"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "lepton"


def default_key_dir() -> Path:
    return config_dir() / "keys"


def public_bytes(key: SigningPublicKey | EncryptionPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_pem(key: SigningPublicKey | EncryptionPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: AnyKey) -> str:
    """``lepton-sign-<hex>`` / ``lepton-enc-<hex>``: purpose plus the first 16 bytes of sha256(SPKI DER)."""
    public = key.public_key() if isinstance(key, (SigningPrivateKey, EncryptionPrivateKey)) else key
    return _ID_PREFIX[purpose_of(public)] + hashlib.sha256(public_bytes(public)).hexdigest()[:32]


def purpose_of(key: object) -> Purpose:
    if isinstance(key, (SigningPrivateKey, SigningPublicKey)):
        return "signing"
    if isinstance(key, (EncryptionPrivateKey, EncryptionPublicKey)):
        return "encryption"
    raise BadInputError(
        f"unsupported key type {type(key).__name__}",
        "use keys made by `lepton keys generate` (ECDSA P-256 signing, X25519 encryption)",
    )


def _header(purpose: Purpose, kind: str, kid: str) -> bytes:
    return f"# lepton {purpose} {kind} key, id {kid}\n".encode()


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start (no window where another user could read it).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


@dataclass
class KeySet:
    """Paths of a generated key set (the files hold the keys)."""

    folder: Path
    signing_id: str
    encryption_id: str

    def path(self, purpose: Purpose, kind: str) -> Path:
        return self.folder / KEY_FILES[(purpose, kind)]


def generate_keys(folder: Path, *, overwrite: bool = False) -> KeySet:
    """Write a signing pair and an encryption pair to ``folder``; private files are 0600."""
    folder = Path(folder)
    existing = [folder / name for name in KEY_FILES.values() if (folder / name).exists()]
    if existing and not overwrite:
        raise BadInputError(
            f"{existing[0]} already exists",
            "choose another --dir, or pass --force to replace the keys (bundles made for the old ones stop opening)",
        )
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise BadInputError(f"cannot create key folder {folder}: {exc.strerror}", "choose a writable --dir") from None
    signing = ec.generate_private_key(ec.SECP256R1())
    encryption = x25519.X25519PrivateKey.generate()
    ids = {}
    for purpose, private in (("signing", signing), ("encryption", encryption)):
        kid = key_id(private)
        ids[purpose] = kid
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write_private(folder / KEY_FILES[(purpose, "private")], _header(purpose, "private", kid) + pem)
        (folder / KEY_FILES[(purpose, "public")]).write_bytes(
            _header(purpose, "public", kid) + public_pem(private.public_key())
        )
    return KeySet(folder, ids["signing"], ids["encryption"])


def dev_keys(*, create: bool) -> tuple[KeySet | None, bool]:
    """The development key set in the config folder: (keys, created now). None when absent and not created."""
    folder = default_key_dir()
    if all((folder / name).is_file() for name in KEY_FILES.values()):
        pub = load_key(str(folder / KEY_FILES[("signing", "public")]), "signing", "public", origin="development key")
        enc = load_key(
            str(folder / KEY_FILES[("encryption", "public")]), "encryption", "public", origin="development key"
        )
        return KeySet(folder, key_id(pub), key_id(enc)), False
    if not create:
        return None, False
    return generate_keys(folder, overwrite=True), True


def _an(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _read_spec(spec: str, origin: str) -> bytes:
    """A key argument is a path, or the PEM text itself (CI secrets in environment variables)."""
    if "-----BEGIN" in spec:
        return spec.encode()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise BadInputError(
            f"{origin} {spec!r} is not a file", "pass the path of a PEM key file (see `lepton keys generate`)"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"cannot read {origin} {path}: {exc.strerror}", "check the file's permissions") from None
    if len(data) > 64 * 1024:
        raise BadInputError(f"{origin} {path} is too large to be a PEM key", "pass a PEM key file")
    return data


def load_key(spec: str, purpose: Purpose, kind: Literal["private", "public"], *, origin: str) -> AnyKey:
    """Load a PEM key and check that it has the purpose the caller needs (exit 2 otherwise)."""
    data = _read_spec(spec, origin)
    try:
        if kind == "private":
            key = serialization.load_pem_private_key(data, password=None)
        else:
            try:
                key = serialization.load_pem_public_key(data)
            except ValueError:
                # A private key where a public one is expected still names one public key: accept it.
                key = serialization.load_pem_private_key(data, password=None).public_key()
    except (ValueError, TypeError):
        what = "private" if kind == "private" else "public"
        raise BadInputError(
            f"{origin} is not a readable unencrypted PEM {what} key", "pass a key made by `lepton keys generate`"
        ) from None
    actual = (
        purpose_of(key)
        if isinstance(key, (SigningPrivateKey, SigningPublicKey, EncryptionPrivateKey, EncryptionPublicKey))
        else None
    )
    if actual is None:
        raise BadInputError(
            f"{origin} is a {type(key).__name__}, not a Lepton {purpose} key",
            "use keys made by `lepton keys generate` (ECDSA P-256 signing, X25519 encryption)",
        )
    if actual != purpose:
        raise BadInputError(
            f"{origin} is {_an(actual)} key, but {_an(purpose)} key is needed here",
            f"pass the {purpose} key (file {KEY_FILES[(purpose, kind)]} of a key set)",
        )
    if isinstance(key, (SigningPrivateKey, SigningPublicKey)) and key.curve.name != "secp256r1":
        raise BadInputError(
            f"{origin} is an EC key on {key.curve.name}; Lepton signs with P-256", "use `lepton keys generate`"
        )
    return key


def resolve(
    option: str | None, env_name: str, purpose: Purpose, kind: Literal["private", "public"], label: str
) -> AnyKey | None:
    """Option, else environment variable, else None (the caller decides about the dev key set)."""
    if option:
        return load_key(option, purpose, kind, origin=label)
    value = os.environ.get(env_name)
    if value:
        return load_key(value, purpose, kind, origin=f"{label} from ${env_name}")
    return None
