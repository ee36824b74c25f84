"""Key options shared by ``verify`` and ``run``: option, environment variable, then the dev key set (said so)."""

from __future__ import annotations

import os

from lepton_cli.bundle.keys import ENV, dev_keys
from lepton_cli.console import note
from lepton_cli.errors import BadInputError


def trust_spec(trust: str | None) -> str:
    if trust:
        return trust
    if os.environ.get(ENV["trust"]):
        return os.environ[ENV["trust"]]
    keys, _ = dev_keys(create=False)
    if keys is None:
        raise BadInputError(
            "no trusted signing key", "pass --trust signing-public.pem (the publisher's key) or set LEPTON_TRUST"
        )
    note(f"trusting the local development signing key {keys.signing_id} ({keys.folder})")
    return str(keys.path("signing", "public"))


def key_spec(key: str | None) -> str:
    if key:
        return key
    if os.environ.get(ENV["decrypt"]):
        return os.environ[ENV["decrypt"]]
    keys, _ = dev_keys(create=False)
    if keys is None:
        raise BadInputError("no decryption key", "pass --key encryption-private.pem or set LEPTON_DECRYPTION_KEY")
    note(f"decrypting with the local development key {keys.encryption_id} ({keys.folder})")
    return str(keys.path("encryption", "private"))
