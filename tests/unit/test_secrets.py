"""Secret detection must not eat provenance: PWD / OLDPWD are paths, not passwords (issue 16)."""

from __future__ import annotations

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
