"""The reversible mapping between DIDs and file-name components (SPEC §2).

A DID is shown in a directory that belongs to ``parent_scope`` as

* its **bare name** when it is in that scope: ``data_001.root``;
* **``scope:name``** otherwise: ``other:data_001.root``.

Names are kept as they are except for what cannot or must not appear in a component. Those
characters are percent-encoded as the ``%XX`` bytes of their UTF-8 form (upper-case hex):

=====================  ================================================================
``%``                  always (the escape character itself): ``100%.txt`` → ``100%25.txt``
``/`` and NUL          always: ``a/b`` → ``a%2Fb``
``:``                  in a bare name and in a scope, so that the first raw ``:`` of a
                       component is always the scope separator: ``a:b`` → ``a%3Ab``
                       (the name after the separator keeps its colons: ``s:a:b``)
lone surrogates        always (they cannot be written as UTF-8): ``\\udc80`` → ``%ED%B2%80``
``.`` and ``..``       when they are the whole component: ``%2E``, ``%2E%2E``
a scope's leading ``.``  always: the mount root keeps names starting with ``.`` for its own
                       directories (``.datalakefs``, ``.query``), so scope ``.query`` is ``%2Equery``
=====================  ================================================================

A component longer than 255 **bytes** (UTF-8) once escaped is **shortened**: its first bytes
(cut between characters and escapes), then ``%~`` and 32 hex digits of the SHA-256 of the full
escaped component, then its file extension when it has a short plain one (``.root``), so that
programs that look at extensions still work. ``%~`` never appears in an unshortened component
(there every ``%`` starts a hex escape), which is how :func:`is_shortened` tells them apart.

Invariants (property-tested): every component is non-empty, not ``.`` or ``..``, has no ``/`` or
NUL, is valid UTF-8 of at most 255 bytes, so no DID can make a path leave its directory; distinct
DIDs get distinct components under the same parent scope (for shortened ones, up to a 128-bit hash
collision); :func:`did_for` inverts :func:`component_for` on every unshortened component and
refuses anything else, so each DID has exactly one name in a directory (no aliases).

A shortened component cannot be decoded: :func:`did_for` raises ``NotFoundError`` for it, and the
directory layer keeps the components it handed out in listings to resolve them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Final

from datalakefs.errors import InvalidNameError, NotFoundError
from datalakefs.model import DID

#: Linux NAME_MAX: the longest component, in bytes.
MAX_COMPONENT_BYTES: Final = 255
#: Marks a shortened component; cannot occur in an escaped one.
SHORTENED_MARK: Final = "%~"
_HASH_HEX: Final = 32
_EXTENSION = re.compile(r"\.[A-Za-z0-9_+-]{1,16}\Z")
_ESCAPED_ALWAYS = frozenset("%/\0")
_TOKEN = re.compile(r"%[0-9A-F]{2}|[^%]", re.DOTALL)


def component_for(did: DID, parent_scope: str) -> str:
    """The file-name component of ``did`` in a directory of ``parent_scope``.

    Raises ``InvalidNameError`` for a DID with an empty scope or name (no such DID can exist).
    """
    if not did.scope or not did.name:
        raise InvalidNameError(f"{did.scope!r}:{did.name!r} is not a DID: scope and name must be non-empty")
    if did.scope == parent_scope:
        full = _escape_whole(did.name)
    else:
        full = f"{_escape(did.scope, colon=True)}:{_escape(did.name, colon=False)}"
    return _fit(full)


def components_for(dids: Sequence[DID], parent_scope: str) -> list[str]:
    """:func:`component_for` of each of ``dids`` (a listing). When they are all of ``parent_scope``
    and their names need no escaping and fit, the names are the components: one regular-expression
    pass over all the names decides that, instead of one per name (100,000 in a large dataset)."""
    names = [did.name for did in dids]
    joined = "\n".join(names)  # a newline is kept as it is, so it hides nothing from the search
    if (
        parent_scope
        and all(names)
        and {did.scope for did in dids} <= {parent_scope}
        and _NEEDS_ESCAPE_OR_COLON.search(joined) is None
        and not names.count(".")
        and not names.count("..")
        and joined.isascii()
        and max(map(len, names), default=0) <= MAX_COMPONENT_BYTES
    ):
        return names
    return [component_for(did, parent_scope) for did in dids]


def did_for(component: str, parent_scope: str) -> DID:
    """The DID whose component in a directory of ``parent_scope`` is ``component``.

    Raises ``NotFoundError`` for a shortened component (see :func:`is_shortened`: only a table of
    the components a listing produced can resolve it), and ``InvalidNameError`` for a component that
    no DID maps to (a malformed or unneeded escape, an empty scope or name, a non-canonical form such
    as ``scope:name`` for a DID of ``parent_scope`` itself).
    """
    if is_shortened(component):
        raise NotFoundError(f"{component!r} is a shortened name: it is known only from a listing")
    scope_part, sep, name_part = component.partition(":")
    did = DID(_unescape(scope_part), _unescape(name_part)) if sep else DID(parent_scope, _unescape(component))
    if component_for(did, parent_scope) != component:
        raise InvalidNameError(f"{component!r} is not the file name of any DID (it is not escaped as such)")
    return did


def is_shortened(component: str) -> bool:
    """Whether ``component`` is the shortened form of an over-long name (it cannot be decoded)."""
    return SHORTENED_MARK in component


def component_for_scope(scope: str) -> str:
    """The component of a scope's directory at the mount root: escaped like a bare name, and never
    starting with ``.`` (those names belong to the mount's own directories)."""
    if not scope:
        raise InvalidNameError("a scope name cannot be empty")
    escaped = _escape_whole(scope)
    return _fit("%2E" + escaped[1:] if escaped.startswith(".") else escaped)


def scope_for(component: str) -> str:
    """The scope whose root directory is ``component``; errors as in :func:`did_for`."""
    if is_shortened(component):
        raise NotFoundError(f"{component!r} is a shortened name: it is known only from a listing")
    scope = _unescape(component)
    if not scope or component_for_scope(scope) != component:
        raise InvalidNameError(f"{component!r} is not the directory name of any scope")
    return scope


# What _escape changes; most names contain none of it and are returned as they are (a listing of
# 100,000 names escapes each one).
_NEEDS_ESCAPE = re.compile("[%/\0\ud800-\udfff]")
_NEEDS_ESCAPE_OR_COLON = re.compile("[%/:\0\ud800-\udfff]")


def _escape(text: str, *, colon: bool) -> str:
    if (_NEEDS_ESCAPE_OR_COLON if colon else _NEEDS_ESCAPE).search(text) is None:
        return text
    return "".join(
        _percent(ch) if ch in _ESCAPED_ALWAYS or (colon and ch == ":") or "\ud800" <= ch <= "\udfff" else ch
        for ch in text
    )


def _escape_whole(name: str) -> str:
    """A name standing alone as a component: colons escaped, and never ``.`` or ``..``."""
    escaped = _escape(name, colon=True)
    return escaped.replace(".", "%2E") if escaped in (".", "..") else escaped


def _percent(ch: str) -> str:
    return "".join(f"%{byte:02X}" for byte in ch.encode("utf-8", "surrogatepass"))


def _unescape(text: str) -> str:
    """Decode ``%XX`` escapes; a ``%`` not followed by two upper-case hex digits is malformed."""
    out: list[str] = []
    pending = bytearray()
    position = 0
    for match in _TOKEN.finditer(text):
        if match.start() != position:
            break
        position = match.end()
        token = match.group()
        if token.startswith("%"):
            pending.append(int(token[1:], 16))
            continue
        if pending:
            out.append(_decode(pending, text))
            pending.clear()
        out.append(token)
    if position != len(text):
        raise InvalidNameError(f"{text!r} has a malformed escape at offset {position}")
    if pending:
        out.append(_decode(pending, text))
    return "".join(out)


def _decode(raw: bytearray, text: str) -> str:
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise InvalidNameError(f"{text!r} escapes bytes that are not UTF-8") from None


def _fit(full: str) -> str:
    """``full`` if it fits in a component, else its shortened form (see module docstring)."""
    raw = full.encode("utf-8")
    if len(raw) <= MAX_COMPONENT_BYTES:
        return full
    mark = SHORTENED_MARK + hashlib.sha256(raw).hexdigest()[:_HASH_HEX]
    extension = _EXTENSION.search(full)
    tail = extension.group() if extension else ""
    budget = MAX_COMPONENT_BYTES - len(mark) - len(tail)
    head: list[str] = []
    for token in _TOKEN.findall(full):
        budget -= len(token.encode("utf-8"))
        if budget < 0:
            break
        head.append(token)
    return "".join(head) + mark + tail
