"""Secret detection must not eat provenance: PWD / OLDPWD are paths, not passwords (issue 16)."""

from __future__ import annotations

import pytest

from raydapt.core.secrets import redact, scrub, secret_env_values


def test_working_directory_env_vars_are_not_secrets(monkeypatch, tmp_path):
    cwd = str(tmp_path / "project")
    monkeypatch.setenv("PWD", cwd)
    monkeypatch.setenv("OLDPWD", cwd + "-old")
    monkeypatch.setenv("DB_PWD", "s3cr3t-value")  # a password variable that happens to say pwd
    assert cwd not in secret_env_values() and cwd + "-old" not in secret_env_values()
    assert scrub(f"data.root={cwd}/data") == f"data.root={cwd}/data"
    assert redact({"data": {"root": f"{cwd}/data"}}) == {"data": {"root": f"{cwd}/data"}}
    assert scrub("password is s3cr3t-value") == "password is ***"


def test_an_env_var_removed_while_the_secrets_are_read_is_skipped(monkeypatch):
    """MLflow's telemetry thread sets and unsets a variable at any time: a key that is listed
    and then gone when it is read must not stop a job (it once raised KeyError in
    ``raydapt run`` while the run's params were redacted). The environment here lists a key
    it no longer has, deterministically, as that race does."""
    import os
    from collections.abc import MutableMapping

    from raydapt.core.secrets import environ_snapshot

    class RacingEnviron(MutableMapping):
        def __init__(self, data):
            self.data = dict(data)

        def __iter__(self):  # the key list still has the variable another thread just unset
            return iter([*self.data, "_MLFLOW_TELEMETRY_SESSION_ID"])

        def __getitem__(self, k):
            return self.data[k]

        def __setitem__(self, k, v):
            self.data[k] = v

        def __delitem__(self, k):
            del self.data[k]

        def __len__(self):
            return len(self.data) + 1

    env = RacingEnviron({"HF_TOKEN": "hf_abcdefgh12345", "HOME": "/root"})
    monkeypatch.setattr(os, "environ", env)
    with pytest.raises(KeyError):  # what the old code did: os.environ.items()
        dict(env.items())
    assert environ_snapshot() == {"HF_TOKEN": "hf_abcdefgh12345", "HOME": "/root"}
    assert secret_env_values() == ["hf_abcdefgh12345"]
    assert scrub("token hf_abcdefgh12345 here") == "token *** here"
