"""Property tests: every configuration value parser either accepts a string or raises
:class:`ConfigError` — never another exception, which would end start-up with a
traceback and exit code 1 instead of one line and exit code 2 (docs/configuration.md).

``HP_TRUSTED_PROXY_IPS`` is parsed in :mod:`harp.client_address` and tested in test_bans.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harp.config import ConfigError, Settings
from harp.config.redis_url import parse_redis_url
from harp.config.values import (
    parse_address,
    parse_bool,
    parse_duration,
    parse_float,
    parse_int,
    parse_nc_url,
)

BASE = {"HP_SHARED_KEY": "k3y", "NC_INSTANCE_URL": "https://cloud.example.com"}

#: Random text plus fragments the parsers care about, so the search reaches deep paths.
_FRAGMENTS = st.sampled_from([
    "http://", "https://", "redis://", "rediss://", "unix://", "[", "]", "::1", ":",
    "@", "/", "%", "?", "#", "127.0.0.1", "[::1]", ":8080", ":99999", ":0", "0", "9" * 30,
    "ms", "s", "us", "m", "h", "d", "²", "٨", "\n", " ", "\t", '"', "'", "user:pw@", "-",
    "+", "e", ".", "nan", "inf", "_",
])
TEXT = st.one_of(
    st.text(max_size=60),
    st.lists(st.one_of(_FRAGMENTS, st.text(max_size=4)), max_size=12).map("".join),
)

PARSERS: dict[str, Callable[[str], object]] = {
    "address": lambda raw: parse_address("HP_EXAPPS_ADDRESS", raw),
    "duration": lambda raw: parse_duration("HP_TIMEOUT_SERVER", raw),
    "duration_zero": lambda raw: parse_duration("HP_TIMEOUT_TUNNEL", raw, allow_zero=True),
    "bool": lambda raw: parse_bool("HP_FRP_DISABLE_TLS", raw),
    "int": lambda raw: parse_int("HP_BLACKLIST_COUNT", raw, 1, 1_000_000),
    "float": lambda raw: parse_float("HP_SESSION_LIFETIME", raw, 0, 10),
    "nc_url": parse_nc_url,
    "redis_url": parse_redis_url,
}

#: Variables fuzzed through the whole of ``Settings.from_env``.
VARIABLES = (
    "NC_INSTANCE_URL", "HP_REDIS_URL", "HP_EXAPPS_ADDRESS", "HP_EXAPPS_HTTPS_ADDRESS",
    "HP_FRP_ADDRESS", "HP_TIMEOUT_CONNECT", "HP_TIMEOUT_CLIENT", "HP_TIMEOUT_SERVER",
    "HP_TIMEOUT_TUNNEL", "HP_SESSION_LIFETIME", "HP_BLACKLIST_COUNT", "HP_BLACKLIST_WINDOW",
    "HP_FRP_CERT_VALIDITY_DAYS", "HP_FRP_DISABLE_TLS", "HP_VERBOSE_START", "HP_LOG_LEVEL",
    "HP_SHARED_KEY", "HP_HTTP2",
)


@pytest.mark.parametrize("name", sorted(PARSERS))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=TEXT)
def test_parser_accepts_or_raises_config_error(name: str, raw: str) -> None:
    try:
        PARSERS[name](raw)
    except ConfigError as exc:
        assert "\n" not in exc.allowed


@pytest.mark.parametrize("var", VARIABLES)
@settings(max_examples=150, deadline=None)
@given(raw=TEXT)
def test_settings_from_env_only_raises_config_error(var: str, raw: str) -> None:
    try:
        settings_ = Settings.from_env({**BASE, var: raw})
    except ConfigError as exc:
        assert exc.var.startswith(var.split("_")[0])
        return
    settings_.describe()  # printing the accepted configuration must not fail either
