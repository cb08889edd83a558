"""Secrets never reach a written file, a log line or MLflow: ``audio_models.tracking.redact``.

End to end (a run's and a sweep's files, console and MLflow records): tests/test_sweep.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from audio_models.tracking import REDACTED, redact


@pytest.mark.parametrize(
    ("uri", "masked"),
    [
        # a password with '/' (not percent-encoded): the user-info ends at the last '@'
        ("mysql://u:pa/ss@db/mlflow", "mysql://u:***@db/mlflow"),
        ("s3://KEY:se/cret@bucket/path", "s3://KEY:***@bucket/path"),
        # a password with '@': nothing of it is left after the mask
        ("https://u:p@ss@host/x", "https://u:***@host/x"),
        # a user part without a password may be a token: all of it goes
        ("https://ghp_x@github.com/o/r.git", "https://***@github.com/o/r.git"),
        (
            "postgresql://mlflow:pw@db-host:5432/mlflow",
            "postgresql://mlflow:***@db-host:5432/mlflow",
        ),
        ("postgresql+psycopg2://a:b@h/d", "postgresql+psycopg2://a:***@h/d"),
        ("see https://u:pw@h:5000, then retry", "see https://u:***@h:5000, then retry"),
    ],
)
def test_uri_user_info_is_masked(uri: str, masked: str) -> None:
    assert redact(uri) == masked
    assert redact(masked) == masked  # idempotent: redacting twice changes nothing


@pytest.mark.parametrize(
    "text",
    [
        "sqlite:///mlflow.db",
        "sqlite:////abs/path/mlflow.db",
        "http://127.0.0.1:5000",
        "s3://bucket/mlflow",
        "https://medium.com/@user/post",  # an '@' in the path, no credentials
        "https://host/x?mail=a@b.com",  # an '@' in the query
        "file:///data/corpus",
        "a plain sentence with an email a@b.com",
    ],
)
def test_uris_without_user_info_are_kept(text: str) -> None:
    assert redact(text) == text


SECRET_KEYS = [
    "token",
    "hf_token",
    "HF_TOKEN",
    "hfToken",
    "githubToken",
    "auth_token",
    "access_token",
    "password",
    "db_password",
    "passwd",
    "secret",
    "client_secret",
    "api_key",
    "apikey",
    "apiKey",
    "API-KEY",
    "access_key",
    "aws_secret_access_key",
    "private_key",
    "privateKey",
    "credential",
    "credentials",
    "auth",
    "oauth",
    "sweep.hf_token",
    "extra.api_key",
    "+hf_token",
    "++hf_token",
]
PLAIN_KEYS = [
    "max_new_tokens",
    "num_tokens",
    "n_tokens",
    "tokenizer",
    "tokenizers",
    "author",
    "authors",
    "authorship",
    "key",
    "monkey",
    "keyboard",
    "hf_token_env",  # names the variable that holds the token, not the token
    "extractor.hf_token_env",
    "sweep.extractor",
]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys_are_masked(key: str) -> None:
    assert redact({key: "s3cr3t"}) == {key: REDACTED}
    assert redact([f"{key}=s3cr3t"]) == [f"{key}={REDACTED}"]  # a Hydra override


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_plain_keys_are_kept(key: str) -> None:
    assert redact({key: "42"}) == {key: "42"}
    assert redact(f"{key}=42") == f"{key}=42"


def test_redact_walks_containers_and_free_text() -> None:
    config: dict[str, Any] = {
        "extractor": {"name": "s2t", "max_new_tokens": 64, "hf_token_env": "HF_TOKEN"},
        "tracking": {"uri": "postgresql://u:pw@db/mlflow"},
        "extra": {"api_key": "k", "token": None, "list": ["+hf_token=x", "author=me"]},
        "credentials": {"user": "u", "key": "k"},
    }
    assert redact(config) == {
        "extractor": {"name": "s2t", "max_new_tokens": 64, "hf_token_env": "HF_TOKEN"},
        "tracking": {"uri": "postgresql://u:***@db/mlflow"},
        "extra": {"api_key": REDACTED, "token": None, "list": ["+hf_token=***", "author=me"]},
        "credentials": REDACTED,
    }
    # Hydra's launch line, a JSON ledger line: every assignment to a secret key.
    line = "#0 : extractor=egemaps +hf_token=abc api_key='a b' device=cpu author=me"
    assert redact(line) == "#0 : extractor=egemaps +hf_token=*** api_key=*** device=cpu author=me"
    assert redact('["+hf_token=abc", "x=1"]') == '["+hf_token=***", "x=1"]'
    assert redact("hf_token='a b' x=1") == "hf_token=*** x=1"
    # Hydra's override_dirname and its escaped job overrides ("\\:", "\\ ", "\\,")
    assert (
        redact("mirror=https://u:pw@h/x,hf_token=y,n=1") == "mirror=https://u:***@h/x,hf_token=***"
    )
    assert redact(r"hf_token=a\ b\,c x=1") == "hf_token=*** x=1"
    assert redact(r"m=https\://u\:p\ w@h/x y") == r"m=https\://u\:***@h/x y"
