"""DID names ↔ file-name components: readable, reversible, injective, and never a way out."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from datalakefs.errors import InvalidNameError, NotFoundError
from datalakefs.model import DID
from datalakefs.namespace.escaping import (
    MAX_COMPONENT_BYTES,
    component_for,
    component_for_scope,
    components_for,
    did_for,
    is_shortened,
    scope_for,
)

# Names are drawn from an alphabet rich in the characters that matter, plus any unicode (lone
# surrogates included: JSON can carry them), and sometimes very long.
SPECIAL = st.sampled_from(["%", "/", "\0", ":", ".", "..", "%2E", "%~", "é", "\U0001f600", "\udc80", "a"])
TEXT = st.one_of(
    st.lists(SPECIAL, min_size=1, max_size=8).map("".join),
    st.text(st.characters(), min_size=1, max_size=40),
    st.text(st.characters(codec="utf-8"), min_size=200, max_size=400),
    st.builds(
        lambda n, ext: "x" * n + ext, st.integers(240, 300), st.sampled_from(["", ".root", ".h5", ".%"])
    ),
)
SCOPES = st.sampled_from(["data", "mc", "user.jdoe", ".", "..", "a:b", "s/x"])
PARENT = "data"


def assert_safe(component: str) -> None:
    assert component not in ("", ".", "..")
    assert "/" not in component
    assert "\0" not in component
    assert len(component.encode("utf-8")) <= MAX_COMPONENT_BYTES  # also proves it is valid UTF-8
    mount = "/lake/data"
    assert posixpath.dirname(posixpath.normpath(posixpath.join(mount, component))) == mount


@pytest.mark.parametrize(
    ("did", "component"),
    [
        (DID("data", "file_001.root"), "file_001.root"),
        (DID("mc", "file_001.root"), "mc:file_001.root"),
        (DID("mc", "a:b"), "mc:a:b"),
        (DID("data", "a:b"), "a%3Ab"),
        (DID("data", "100%.txt"), "100%25.txt"),
        (DID("data", "/belle/MC/x.root"), "%2Fbelle%2FMC%2Fx.root"),
        (DID("data", "."), "%2E"),
        (DID("data", ".."), "%2E%2E"),
        (DID("data", "..."), "..."),
        (DID("data", ".hidden"), ".hidden"),
        (DID("mc", ".."), "mc:.."),
        (DID("data", "nul\0byte"), "nul%00byte"),
        (DID("data", "été"), "été"),
    ],
)
def test_examples(did: DID, component: str) -> None:
    assert component_for(did, PARENT) == component
    assert did_for(component, PARENT) == did


def test_over_long_names_are_shortened_keeping_the_extension() -> None:
    did = DID("data", "run_" + "x" * 300 + ".root")
    component = component_for(did, PARENT)
    assert len(component.encode()) == MAX_COMPONENT_BYTES
    assert component.startswith("run_xxx")
    assert component.endswith(".root")
    assert is_shortened(component)
    with pytest.raises(NotFoundError, match="shortened"):
        did_for(component, PARENT)
    assert component_for(DID("data", "x" * 255), PARENT) == "x" * 255  # exactly 255 bytes fits
    assert is_shortened(component_for(DID("data", "é" * 128), PARENT))  # 256 bytes does not


@given(scope=SCOPES, name=TEXT)
@example(scope="data", name="x" * 300)
@example(scope="mc", name="é" * 200)
def test_components_are_safe_and_round_trip(scope: str, name: str) -> None:
    did = DID(scope, name)
    component = component_for(did, PARENT)
    assert_safe(component)
    if not is_shortened(component):
        assert did_for(component, PARENT) == did


@given(a=st.tuples(SCOPES, TEXT), b=st.tuples(SCOPES, TEXT))
@example(a=("data", "a:b"), b=("a", "b"))
@example(a=("data", "x" * 300 + "1"), b=("data", "x" * 300 + "2"))
@example(a=("data", "%2E"), b=("data", "."))
def test_distinct_dids_get_distinct_components(a: tuple[str, str], b: tuple[str, str]) -> None:
    assume(a != b)
    assert component_for(DID(*a), PARENT) != component_for(DID(*b), PARENT)


@given(
    component=st.text(st.characters(), min_size=1, max_size=30) | st.lists(SPECIAL, max_size=6).map("".join)
)
@example(component="%2e")
@example(component="%41bc")
@example(component="data:f")
@example(component=":f")
@example(component="f:")
@example(component="50%off")
@example(component="%C3")
def test_did_for_accepts_only_canonical_components(component: str) -> None:
    try:
        did = did_for(component, PARENT)
    except (InvalidNameError, NotFoundError):
        return
    assert component_for(did, PARENT) == component


@pytest.mark.parametrize(
    "component", ["%2e", "%41bc", "data:f", ":f", "f:", "50%off", "%C3", "%2Ea", "a\udc80"]
)
def test_non_canonical_components_name_no_did(component: str) -> None:
    with pytest.raises(InvalidNameError):
        did_for(component, PARENT)


@pytest.mark.parametrize("did", [DID("", "x"), DID("data", "")])
def test_empty_scope_or_name_is_not_a_did(did: DID) -> None:
    with pytest.raises(InvalidNameError):
        component_for(did, PARENT)


@given(scope=TEXT)
@example(scope=".")
@example(scope="..")
@example(scope=".datalakefs")
def test_scope_directories(scope: str) -> None:
    component = component_for_scope(scope)
    assert_safe(component)
    assert not component.startswith("."), "the root's dot-names belong to the mount's own directories"
    if not is_shortened(component):
        assert scope_for(component) == scope


def test_scope_directory_examples() -> None:
    assert component_for_scope("user.jdoe") == "user.jdoe"
    assert component_for_scope("..") == "%2E%2E"
    assert component_for_scope(".query") == "%2Equery"
    assert scope_for("%2Equery") == ".query"
    with pytest.raises(InvalidNameError):
        scope_for("%2e")
    with pytest.raises(InvalidNameError):
        component_for_scope("")


# Names a listing mostly holds (no escaping needed), up to and just past the component limit, and
# the few plain-looking ones that do need it (a colon, "." and "..", non-ASCII near the limit).
PLAIN = st.one_of(
    st.text(st.sampled_from("abcXYZ019._-~ "), min_size=1, max_size=12),
    st.sampled_from([".", "..", "a:b", "é"]),
    st.builds(lambda n: "p" * n, st.integers(MAX_COMPONENT_BYTES - 2, MAX_COMPONENT_BYTES + 2)),
    st.builds(lambda n: "é" * n, st.integers(MAX_COMPONENT_BYTES // 2 - 2, MAX_COMPONENT_BYTES // 2 + 2)),
)
PLAIN_DIDS = st.builds(DID, st.just(PARENT), PLAIN)
ANY_DIDS = st.builds(DID, st.one_of(st.just(PARENT), SCOPES), st.one_of(PLAIN, TEXT))


@given(st.one_of(st.lists(PLAIN_DIDS, max_size=8),
                 st.lists(st.one_of(PLAIN_DIDS, PLAIN_DIDS, ANY_DIDS), max_size=8)))
def test_the_components_of_a_listing_are_those_of_each_did(dids: list[DID]) -> None:
    assert components_for(dids, PARENT) == [component_for(did, PARENT) for did in dids]


def test_the_components_of_a_listing_with_an_invalid_did_fail_as_for_the_did_alone() -> None:
    with pytest.raises(InvalidNameError):
        components_for([DID(PARENT, "a"), DID(PARENT, "")], PARENT)
    with pytest.raises(InvalidNameError):
        components_for([DID("", "a")], "")

