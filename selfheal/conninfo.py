"""
Connection strings as operators write them: validated whole, shown without secrets.

libpq parses a DSN (key=value or URL) only for its syntax; a value it cannot
use (``port=5432:5``, ``sslmode=bogus``) fails later, when that database is
connected to, after others may have been changed. `validate` checks every
value libpq would check, so that the command line refuses bad input before
it touches anything. `redact` and `scrub` keep passwords out of everything
selfheal prints, whatever the input, parseable or not.
"""

from __future__ import annotations

import re

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .errors import SelfhealError

__all__ = ["InvalidDSN", "redact", "scrub", "validate"]


class InvalidDSN(SelfhealError):
    """A connection string libpq would refuse (its message shows no password)."""


#: Options whose values libpq reads as one integer (``port``: a list of them).
_INTEGERS = frozenset({
    "connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval",
    "keepalives_count", "tcp_user_timeout",
})

#: Options with a fixed set of values, as documented for libpq 17.
_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby",
                             "prefer-standby"),
    "load_balance_hosts": ("disable", "random"),
    "sslnegotiation": ("postgres", "direct"),
    "sslcertmode": ("disable", "allow", "require"),
    "replication": ("true", "on", "yes", "1", "false", "off", "no", "0", "database"),
}

_URL = re.compile(r"^postgres(ql)?://", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(^|&)((?:ssl)?password)=[^&]*")
_KV_PASSWORD = re.compile(r"\b((?:ssl)?password)\s*=\s*(?:'(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
# user:password@ anywhere: in a URL however misspelt its scheme (after //,
# the password may hold anything but @), or bare (up to a /), also in a
# message that quotes one.
_URL_USERINFO = re.compile(r"(//[^\s:/@\"']*):[^\s@\"']*@")
_USERINFO = re.compile(r"(^|[\s\"'(=,])([^\s:/@\"'(),=]+):[^\s@\"'/]*@")
# password=... in a URL's query (up to the next &), and in key=value text.
_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password=)[^&\s\"']*", re.IGNORECASE)
_BARE_PASSWORD = re.compile(r"(?<![?&])\b((?:ssl)?password)\s*=\s*(?!\*\*\*)"
                            r"(?:'(?:[^'\\]|\\.)*'|'.*|\S+)", re.IGNORECASE)


def validate(dsn: str) -> dict[str, str]:
    """The options of `dsn`, each one checked as libpq will; raises `InvalidDSN`."""
    try:
        params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except psycopg.Error as ex:
        raise InvalidDSN(scrub(_first_line(ex))) from None
    for key, value in params.items():
        if key == "port":
            for port in value.split(","):
                if port.strip() and not _port(port.strip()):
                    raise InvalidDSN(f"invalid port {port.strip()!r}: expected a number"
                                     " from 1 to 65535")
        elif key in _INTEGERS:
            if not re.fullmatch(r"\s*-?\d+\s*", value):
                raise InvalidDSN(f"invalid {key} {value!r}: expected a whole number")
        elif key in _CHOICES and value.lower() not in _CHOICES[key]:
            raise InvalidDSN(f"invalid {key} {value!r}: expected one of"
                             f" {', '.join(_CHOICES[key])}")
    return params


def _port(text: str) -> bool:
    return text.isdigit() and 0 < int(text) < 65536


def redact(conninfo: str) -> str:
    """`conninfo` (URL or key=value) with its password replaced by ``***``."""
    if _URL.match(conninfo):
        scheme, _, rest = conninfo.partition("://")
        netloc, sep, tail = _split_netloc(rest)
        if "@" in netloc:
            userinfo, hosts = netloc.rsplit("@", 1)
            if ":" in userinfo:
                netloc = f"{userinfo.split(':', 1)[0]}:***@{hosts}"
        path, qmark, query = tail.partition("?")
        query = _URL_PASSWORD.sub(r"\1\2=***", query)
        return f"{scheme}://{netloc}{sep}{path}{qmark}{query}"
    try:
        conninfo_to_dict(conninfo)
    except psycopg.Error:
        return scrub(conninfo)
    # Edit the text rather than rebuild it, so the DSN reads as it was written.
    return _KV_PASSWORD.sub(r"\1=***", conninfo)


def _split_netloc(rest: str) -> tuple[str, str, str]:
    # The authority ends at the first / or ? after the last @ (a password may hold either).
    at = rest.rfind("@")
    end = min((i for i in (rest.find("/", at + 1), rest.find("?", at + 1)) if i >= 0),
              default=len(rest))
    return rest[:end], "", rest[end:]


def scrub(text: str) -> str:
    """`text` with anything that looks like a password masked: ``user:***@``, ``password=***``."""
    text = _URL_USERINFO.sub(r"\1:***@", text)
    text = _USERINFO.sub(r"\1\2:***@", text)
    text = _QUERY_PASSWORD.sub(r"\1***", text)
    return _BARE_PASSWORD.sub(r"\1=***", text)


def _first_line(ex: BaseException) -> str:
    return (str(ex).strip().splitlines() or [type(ex).__name__])[0]
