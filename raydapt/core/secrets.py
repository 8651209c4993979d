"""Keep secrets out of logs, MLflow params/tags/artifacts and printed configs.

Three layers, applied by :func:`redact` (nested configs) and :func:`scrub` (any text):

1. by key: a value under a key that looks secret (``hf_token``, ``password``, ``api_key``,
   ``AWS_SECRET_ACCESS_KEY``, ...) becomes ``***``;
2. by URL: the password in ``scheme://user:password@host`` becomes ``***``
   (e.g. ``postgresql://mlflow:pw@db/mlflow`` as a tracking URI);
3. by value: the value of every environment variable whose *name* looks secret (HF_TOKEN,
   AWS_SECRET_ACCESS_KEY, PGPASSWORD, MLFLOW_TRACKING_PASSWORD, ...) is replaced wherever it
   appears, e.g. after ``${HF_TOKEN}`` was expanded into a config value.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
# a key is secret when one of its _/-/. separated parts is one of these (so "hf_token" and
# "AWS_SECRET_ACCESS_KEY" are, "text_max_tokens" and "TOKENIZERS_PARALLELISM" are not)
_WORDS = r"token|secret|password|passwd|pwd|api[_-]?key|access[_-]?key|private[_-]?key|credentials?"
SECRET_KEY = re.compile(rf"(?:^|[_.\-])(?:{_WORDS})(?:$|[_.\-])", re.I)
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s]*:)(?P<pw>[^@/\s]+)(?=@)")
_YAML_SECRET_LINE = re.compile(
    rf"^(?P<key>\s*-?\s*(?:[\w.-]*[_.\-])?(?:{_WORDS})(?:[_.\-][\w.-]*)?\s*[:=]\s*)"
    r"(?P<value>\S.*)$", re.I | re.M)
_MIN_SECRET_LEN = 6  # shorter env values ("1", "true") would mask unrelated text
# shell-managed variables whose names match a secret word but hold a path ("pwd" = print
# working directory): masking them turns every path under the working directory into ***/...
_NOT_SECRET_ENV = frozenset({"PWD", "OLDPWD"})


def environ_snapshot() -> dict[str, str]:
    """A copy of the environment that is safe while another thread changes it.

    ``os.environ.items()`` and ``{**os.environ}`` list the keys, then read each one; MLflow's
    telemetry thread sets and unsets ``_MLFLOW_TELEMETRY_SESSION_ID`` at any time, so a key
    listed and then removed raised ``KeyError`` half way through a job's start (seen once in
    ``raydapt run``, while the parent run's params were being redacted). The key list is
    taken at once (``list`` of a dict) and a key gone since then is skipped."""
    out = {}
    for k in list(os.environ):
        v = os.environ.get(k)
        if v is not None:
            out[k] = v
    return out


def secret_env_values() -> list[str]:
    """Values of environment variables whose names look secret (longest first)."""
    vals = {v for k, v in environ_snapshot().items()
            if SECRET_KEY.search(k) and k.upper() not in _NOT_SECRET_ENV
            and len(v) >= _MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)


def scrub(text: str) -> str:
    """Mask URL passwords, ``key: value`` lines with secret-looking keys, and env secrets."""
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)
    text = _YAML_SECRET_LINE.sub(
        lambda m: m.group("key") + (m.group("value") if m.group("value").strip() in
                                    ("null", "None", "~", "''", '""') else MASK), text)
    for v in secret_env_values():
        text = text.replace(v, MASK)
    return text


def redact(obj: Any) -> Any:
    """A copy of a nested config with secrets masked (by key, URL password and env value)."""
    if isinstance(obj, dict):
        return {k: (MASK if SECRET_KEY.search(str(k)) and v else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return scrub(obj)
    return obj
