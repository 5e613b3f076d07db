"""Settings parsing: defaults, reference quirks kept, our stricter validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from harp.config import Address, ConfigError, Settings, available_cpus
from harp.config.values import parse_address, parse_duration, strip_quotes

BASE = {"HP_SHARED_KEY": "k3y", "NC_INSTANCE_URL": "https://cloud.example.com"}


def test_defaults() -> None:
    s = Settings.from_env(BASE)
    assert s.exapps_address == Address("0.0.0.0", 8780)
    assert s.exapps_https_address == Address("0.0.0.0", 8781)
    assert s.frp_address == Address("0.0.0.0", 8782)
    assert (s.timeout_connect, s.timeout_client, s.timeout_server) == (30, 30, 1800)
    assert s.timeout_tunnel == 1800
    assert (s.blacklist_count, s.blacklist_window, s.session_lifetime) == (10, 300, 3.0)
    assert s.log_level == "warning" and s.verbose_start is True
    assert s.frp_disable_tls is False and s.frp_cert_validity_days == 5000
    assert s.certs_dir == Path("/certs") and s.redis_url is None
    assert s.trusted_proxies == ()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [('"abc"', "abc"), ("'abc'", "abc"), ("\"'abc'\"", "abc"), ('"abc', "abc"), ("a'b", "a'b")],
)
def test_strip_quotes(raw: str, expected: str) -> None:
    assert strip_quotes(raw) == expected


def test_key_quotes_stripped_and_repr_hides_it() -> None:
    s = Settings.from_env({**BASE, "HP_SHARED_KEY": "\"it's-mine\""})
    assert s.shared_key == "it's-mine"
    assert "it's-mine" not in repr(s)
    assert all("it's-mine" not in v for _, v in s.describe())


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("https://c.example/", "https://c.example"),
        ("https://c.example/index.php", "https://c.example"),
        ("https://c.example/nc/index.php/", "https://c.example/nc"),
        ('"http://c.example:8080"', "http://c.example:8080"),
    ],
)
def test_nc_url_normalised(url: str, base: str) -> None:
    assert Settings.from_env({**BASE, "NC_INSTANCE_URL": url}).nc_instance_url == base


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0.0.0.0:8780", Address("0.0.0.0", 8780)),
        ("[::]:8780", Address("::", 8780)),
        ("[::1]:1", Address("::1", 1)),
        ("::1:8780", Address("::1", 8780)),
        (":8780", Address("0.0.0.0", 8780)),
        ("localhost:80", Address("127.0.0.1", 80)),
    ],
)
def test_addresses(raw: str, expected: Address) -> None:
    assert parse_address("X", raw) == expected


@pytest.mark.parametrize("raw", ["8780", "host:80", "1.2.3.4:0", "1.2.3.4:65536", "1.2.3.4:x"])
def test_bad_addresses(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address("HP_EXAPPS_ADDRESS", raw)
    assert info.value.line().startswith("HP_EXAPPS_ADDRESS=")


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [("30s", 30), ("1800s", 1800), ("500ms", 0.5), ("2m", 120), ("1h", 3600), ("1d", 86400),
     ("1500", 1.5), ("10us", 1e-5)],
)
def test_durations(raw: str, seconds: float) -> None:
    assert parse_duration("X", raw) == pytest.approx(seconds)


@pytest.mark.parametrize("zero", ["0", "0s", "0ms", "0us", "0m", "0h", "0d"])
def test_tunnel_zero_is_unlimited(zero: str) -> None:
    assert Settings.from_env({**BASE, "HP_TIMEOUT_TUNNEL": zero}).timeout_tunnel is None
    with pytest.raises(ConfigError):
        Settings.from_env({**BASE, "HP_TIMEOUT_SERVER": zero})


def test_tunnel_defaults_to_server() -> None:
    s = Settings.from_env({**BASE, "HP_TIMEOUT_SERVER": "60s"})
    assert s.timeout_tunnel == 60


def test_trusted_proxies_and_warnings() -> None:
    raw = " '192.168.100.20/24' , 10.0.0.1,fd00::/8"
    s = Settings.from_env({**BASE, "HP_TRUSTED_PROXY_IPS": raw})
    assert [str(n) for n in s.trusted_proxies] == ["192.168.100.0/24", "10.0.0.1/32", "fd00::/8"]
    assert s.warnings


def test_secret_redacted_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, "HP_SHARED_KEY": 'abc"def'})
    assert "abc" not in info.value.line()
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, "HP_REDIS_URL": "ftp://:pw@h"})
    assert "pw" not in info.value.line()


def test_log_level_case_insensitive() -> None:
    assert Settings.from_env({**BASE, "HP_LOG_LEVEL": "DEBUG"}).log_level == "debug"


def test_redis_url() -> None:
    s = Settings.from_env({**BASE, "HP_REDIS_URL": "redis://:pw@127.0.0.1:6379/0"})
    assert s.redis_url is not None
    assert (s.redis_url.host, s.redis_url.port, s.redis_url.db) == ("127.0.0.1", 6379, 0)
    assert s.redis_url.password == "pw"
    assert dict(s.describe())["HP_REDIS_URL"] == "redis://:<redacted>@127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("NC_INSTANCE_URL", "http://[::1"),
        ("NC_INSTANCE_URL", "http://[::1]x/"),
        ("NC_INSTANCE_URL", "http://host:99999"),
        ("NC_INSTANCE_URL", "http://host:port"),
        ("NC_INSTANCE_URL", "http://bad host/"),
        ("HP_REDIS_URL", "redis://[::1"),
        ("HP_REDIS_URL", "redis://:s3cret@[::1:6379"),
        ("HP_REDIS_URL", "redis://host:70000/0"),
    ],
)
def test_malformed_urls_are_config_errors(var: str, value: str) -> None:
    """``urlsplit`` used to raise ValueError, i.e. a traceback and exit 1."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, var: value})
    line = str(info.value)
    assert line.startswith(var) and "\n" not in line
    assert "s3cret" not in line


@pytest.mark.parametrize("raw", ["127.0.0.1:²", "127.0.0.1:٨٠"])
def test_address_port_must_be_ascii_digits(raw: str) -> None:
    with pytest.raises(ConfigError):
        parse_address("HP_EXAPPS_ADDRESS", raw)


def test_huge_duration_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_duration("HP_TIMEOUT_SERVER", "9" * 400 + "s")


def test_workers_default_to_the_usable_cpus_and_validate() -> None:
    assert Settings.from_env(BASE).workers == available_cpus()
    assert Settings.from_env({**BASE, "HP_WORKERS": "3"}).workers == 3
    assert ("HP_WORKERS", "3") in Settings.from_env({**BASE, "HP_WORKERS": "3"}).describe()
    for bad in ("0", "-1", "two", "1.5", "100000"):
        with pytest.raises(ConfigError, match="HP_WORKERS"):
            Settings.from_env({**BASE, "HP_WORKERS": bad})


def test_http2_defaults_on_and_validates() -> None:
    assert Settings.from_env(BASE).http2 is True
    off = Settings.from_env({**BASE, "HP_HTTP2": "false"})
    assert off.http2 is False and ("HP_HTTP2", "false") in off.describe()
    for bad in ("yes please", "2", "h2"):
        with pytest.raises(ConfigError, match="HP_HTTP2"):
            Settings.from_env({**BASE, "HP_HTTP2": bad})


def test_available_cpus_honours_the_cgroup_quota(tmp_path: Path) -> None:
    import os

    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert available_cpus(cpu_max) == affinity
    cpu_max.write_text("50000 100000\n")  # half a CPU: still one process
    assert available_cpus(cpu_max) == 1
    cpu_max.write_text(f"{affinity * 100000 + 1} 100000\n")  # over the affinity: affinity
    assert available_cpus(cpu_max) == affinity
    cpu_max.write_text("garbage")
    assert available_cpus(cpu_max) == affinity
    assert available_cpus(tmp_path / "missing") == affinity
