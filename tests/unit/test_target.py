"""Request-target checks and path normalisation (docs/security.md, request-target)."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.web.target import endpoint_key, normalise_path, valid_target


@pytest.mark.parametrize(
    "target",
    [b"0/exapps/app/x", b"http://evil/exapps/app/x", b"*", b"exapps/app", b"",
     b"/a\x7fb", b"/a\x80", b"/a\x00", b"/a b", b"/a#frag", b"/\xff"],
)
def test_refused_targets(target: bytes) -> None:
    assert not valid_target(target)


@pytest.mark.parametrize("target", [b"/", b"/exapps/app/x?a=1&b={}|", b"/a/%20b"])
def test_accepted_targets(target: bytes) -> None:
    assert valid_target(target)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/exapps/app/%69nit", b"/exapps/app/init"),
        (b"/exapps/app//init", b"/exapps/app/init"),
        (b"/exapps/app/./init", b"/exapps/app/init"),
        (b"/exapps/app/%2e/init", b"/exapps/app/init"),
        (b"/exapps/app/init/", b"/exapps/app/init/"),
        (b"/exapps/%61pp/x", b"/exapps/app/x"),
        (b"/a/%2fb", b"/a/%2Fb"),
        (b"/", b"/"),
        (b"/x/.", b"/x/"),
        (b"/a/..", None),
        (b"/a/%2e%2e/b", None),
        (b"/a/%zz", None),
        (b"/a/%4", None),
    ],
)
def test_normalise(path: bytes, expected: bytes | None) -> None:
    assert normalise_path(path) == expected


@pytest.mark.parametrize(
    "target", [b"/init", b"/init/", b"//init", b"/init//", b"/%69nit", b"/./init", b"/%2Finit"],
)
def test_reserved_endpoint_in_any_spelling(target: bytes) -> None:
    normalised = normalise_path(target)
    assert normalised is not None and endpoint_key(normalised) == b"/init"


_PATH_BYTES = st.binary(max_size=40).map(lambda b: b"/" + b)


@settings(max_examples=500, deadline=None)
@given(_PATH_BYTES)
def test_normalise_never_raises_and_is_stable(path: bytes) -> None:
    if not valid_target(path):
        return
    normalised = normalise_path(path)
    if normalised is None:
        return
    assert valid_target(normalised)
    assert b"//" not in normalised
    assert b"/./" not in normalised and not normalised.endswith(b"/.")
    assert normalise_path(normalised) == normalised  # idempotent


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="/.%2eEinIT", max_size=20))
def test_no_spelling_of_init_slips_through(text: str) -> None:
    path = ("/" + text).encode()
    if not valid_target(path):
        return
    normalised = normalise_path(path)
    if normalised is None:
        return
    decoded = unquote_to_bytes(normalised)
    segments = [s for s in decoded.split(b"/") if s not in (b"", b".")]
    if segments == [b"init"]:
        assert endpoint_key(normalised) == b"/init"
