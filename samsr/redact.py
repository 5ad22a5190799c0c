"""Credentials never reach a file, a param or a message: the userinfo of URIs (`user:password@`) and
the signing parameters of presigned URLs are replaced by `***` before a config or a string is written.

    redact_uri("https://bob:p@s:s/w@mlflow.example:5000/x")  -> "https://***@mlflow.example:5000/x"
    redact_uri("s3://bucket/photo@2x.png")                    -> unchanged (no userinfo)
    redact_uri("https://b.s3.amazonaws.com/k?X-Amz-Signature=f00&X-Amz-Date=1")
        -> "https://b.s3.amazonaws.com/k?X-Amz-Signature=***&X-Amz-Date=1"
    redact_config(cfg)                                        -> the nested config dict, every string redacted

Where the userinfo ends:
- Every network URI (http, https, postgresql, …): at the LAST `@` of the URI. A password may hold `@`
  and `:` unencoded, and — though a URL parser reads it differently (RFC 3986 wants `%2F`) — `/`, `?`
  and `#` as well: such a password is hidden entirely too. The price is that an `@` in the path or
  query of a network URI hides what precedes it: a leaked password costs more than a shortened URL.
- Bucket URIs (s3://, gs://, …): bucket names hold neither `@` nor `:`, and an `@` in an object key
  is an ordinary character. Only when the part before the first `/` holds `@` or `:` is there userinfo
  (e.g. `s3://KEY:SECRET@bucket/key`, where an AWS secret often holds `/`), and it runs to the last `@`.
- Azure URIs (abfs://container@account…, az://, wasb://) carry no userinfo (their `@` is part of the
  address); their SAS signature (`sig=`) is a query value and is redacted as such.
- file://, hdfs://: RFC 3986 — userinfo is what precedes the last `@` before the first `/`.
- A string that starts with a URI is taken as one URI to its end (so a password with a space or a
  quote is hidden); in any other string, each `scheme://…` up to whitespace or a quote is redacted.
"""
from __future__ import annotations

import re
from typing import Any

MARK = "***"
BUCKET_SCHEMES = frozenset({"s3", "s3a", "s3n", "gs", "gcs", "oss", "r2"})
ADDRESS_AT_SCHEMES = frozenset({"az", "abfs", "abfss", "wasb", "wasbs"})      # container@account
RFC_SCHEMES = frozenset({"file", "hdfs", "viewfs", "webhdfs"})
# query parameters of presigned / SAS URLs (and plain token parameters) whose values are secrets
SECRET_PARAMS = ("X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "X-Goog-Signature",
                 "X-Goog-Credential", "Signature", "AWSAccessKeyId", "sig",
                 "access_token", "token", "password", "client_secret")

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_WHOLE = re.compile(r"\A\s*[A-Za-z][A-Za-z0-9+.-]*://")
_EMBEDDED = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]*")
_PARAMS = re.compile(r"([?&;](?:%s)=)[^&#\s'\"]*" % "|".join(map(re.escape, SECRET_PARAMS)),
                     re.IGNORECASE)


def _userinfo_end(scheme: str, rest: str) -> int:
    """Index of the `@` that ends the userinfo in `rest` (the URI after `://`), or -1 when there is none."""
    authority = rest.split("/", 1)[0]
    if scheme in ADDRESS_AT_SCHEMES:
        return -1
    if scheme in RFC_SCHEMES:
        return authority.rfind("@")
    if scheme in BUCKET_SCHEMES and not ("@" in authority or ":" in authority):
        return -1
    return rest.rfind("@")


def _one(uri: str) -> str:
    """Redact one URI (the whole string is the URI)."""
    m = _SCHEME.search(uri)
    if m is None:
        return uri
    head, rest = uri[:m.end()], uri[m.end():]
    end = _userinfo_end(head[:-3].strip().lower(), rest)
    if end >= 0:
        rest = f"{MARK}@{rest[end + 1:]}"
    return head + _PARAMS.sub(lambda p: p.group(1) + MARK, rest)


def redact_uri(text: str) -> str:
    """`text` with the userinfo of its URI(s) and the signature/credential query values replaced by `***`
    (module docstring: where userinfo ends). Strings without a URI come back unchanged."""
    if not isinstance(text, str) or "://" not in text:
        return text
    if _WHOLE.match(text):
        return _one(text)
    return _EMBEDDED.sub(lambda m: _one(m.group(0)), text)


def strip_userinfo(uri: str) -> str:
    """A usable URI without credentials, for handing on (e.g. to workers): `https://u:p@h/x` -> `https://h/x`;
    presigned query values are redacted as in `redact_uri`."""
    redacted = redact_uri(uri)
    return redacted.replace(f"://{MARK}@", "://", 1) if _WHOLE.match(uri) else redacted


def redact_value(value: Any) -> Any:
    """Strings redacted; dicts, lists and tuples walked; anything else as is."""
    if isinstance(value, str):
        return redact_uri(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value


def redact_config(cfg: Any) -> dict:
    """The config (a samsr Config or its dict form) as the nested dict that may be persisted: every
    URI-valued string without userinfo or signatures."""
    if not isinstance(cfg, dict):
        from samsr import config as config_mod

        cfg = config_mod.to_dict(cfg)
    return redact_value(cfg)


__all__ = ["redact_uri", "strip_userinfo", "redact_value", "redact_config", "MARK", "SECRET_PARAMS"]
