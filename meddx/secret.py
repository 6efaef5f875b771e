"""Secrets from the environment, or from files the environment names.

Every secret meddx reads (the DICOMweb password or token, the pseudonym key) goes
through :func:`value`: ``NAME`` holds it, or ``NAME_FILE`` names a file that does (a
Kubernetes Secret mounted as a file, a systemd credential), so the value itself need
not pass through a Ray job's ``runtime_env``, which Ray keeps in the job's metadata
(the dashboard, ``ray job list``). Errors name the variables, never a value.

Imports nothing heavy: the CLI's config checks and Ray's start-up read from here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from meddx import MeddxError

FILE_SUFFIX = "_FILE"
# The secrets meddx reads itself (the DICOMweb client, the pseudonym key) ...
MEDDX_SECRETS = ("MEDDX_DICOMWEB_PASSWORD", "MEDDX_DICOMWEB_TOKEN", "MEDDX_PSEUDONYM_KEY")
# ... and those of the AWS chain, which the same job metadata would show as plainly.
AWS_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def value(name: str, environ: Mapping[str, str] | None = None) -> str:
    """The secret ``name``: the variable's value, or the content of the file that
    ``name``_FILE names (one trailing line break dropped, as ``echo`` and editors leave
    one); "" when neither is set. Both set, an unreadable file, an empty one or one
    that is not UTF-8 text: a one-line MeddxError naming the variable and the path."""
    env = os.environ if environ is None else environ
    direct, path = env.get(name, ""), env.get(name + FILE_SUFFIX, "")
    if direct and path:
        raise MeddxError(f"set {name} or {name}{FILE_SUFFIX}, not both")
    if not path:
        return direct
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise MeddxError(
            f"cannot read {name}{FILE_SUFFIX} ({path}): {exc.strerror or type(exc).__name__}"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MeddxError(f"{name}{FILE_SUFFIX} ({path}) is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        # A mount that went wrong (an empty key of the Secret) must not read as "unset".
        raise MeddxError(f"{name}{FILE_SUFFIX} ({path}) is empty")
    return text


PSEUDONYM_KEY_ENV = "MEDDX_PSEUDONYM_KEY"


def pseudonym_key() -> bytes | None:
    """The site's HMAC key for DICOM UID and path pseudonyms (never logged; no key, no
    UIDs): MEDDX_PSEUDONYM_KEY, or the file MEDDX_PSEUDONYM_KEY_FILE names."""
    key = value(PSEUDONYM_KEY_ENV)
    return key.encode() if key else None


def in_runtime_env(runtime_env: Mapping | None) -> list[str]:
    """The names of the secrets set in a Ray runtime_env's ``env_vars`` (the ``_FILE``
    variables, which hold paths, are not secrets)."""
    env_vars = (runtime_env or {}).get("env_vars") or {}
    return sorted(name for name in env_vars if name in MEDDX_SECRETS + AWS_SECRETS)


def runtime_env_warning(runtime_env: Mapping | None) -> str | None:
    """One line naming the secrets a Ray job carries in its runtime_env (None when it
    carries none): never their values."""
    found = in_runtime_env(runtime_env)
    if not found:
        return None
    return (
        f"{', '.join(found)} {'is' if len(found) == 1 else 'are'} set in this Ray job's "
        "runtime_env, which Ray keeps in the job's metadata (the dashboard, ray job list): "
        f"set {'it' if len(found) == 1 else 'them'} on the nodes instead (docs/pacs.md)"
    )
