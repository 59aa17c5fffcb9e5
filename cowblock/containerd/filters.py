"""containerd's filter syntax, for List (containerd/filters, as its metadata
store applies it to snapshots).

    name==web                      a field equals a value
    labels."containerd.io/snapshot.ref"==sha256:12,parent!=""
    kind~=^(active|view)$          a regular expression searched in the field
    labels.gc                      the field is present (and not empty)

A filter is selectors joined by commas (all must hold); List gets several
filters and lists a snapshot matching any of them.  Field paths are dotted;
a part with dots or other punctuation in it is double-quoted.  Values are
bare (up to the next comma) or double-quoted with backslash escapes.
Fields of a snapshot: name, parent, kind (active, view, committed) and
labels.KEY.
"""
import json
import re
from dataclasses import dataclass

from .. import errors

_BARE_PART = re.compile(r"[A-Za-z0-9_]+")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_OP = re.compile(r"\s*(==|!=|~=)\s*")
_BARE_VALUE = re.compile(r"[^,]*")


@dataclass(frozen=True)
class Selector:
    path: tuple
    op: str = ""       # "": present
    value: str = ""

    def matches(self, fields):
        found = _lookup(fields, self.path)
        if self.op == "":
            return bool(found)
        if self.op == "==":
            return found == self.value
        if self.op == "!=":
            return found != self.value
        return found is not None and re.search(self.value, found) is not None


def _lookup(fields, path):
    value = fields
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value if isinstance(value, str) else None


def _unquote(text, filter_text):
    try:
        return json.loads(text)
    except ValueError:
        raise errors.InvalidArgumentError(
            f"filter {filter_text!r}: {text} is not a valid quoted string") from None


def parse(text):
    """The selectors of one filter (all must hold); InvalidArgumentError
    naming the place where it stops making sense."""
    if not isinstance(text, str):
        raise errors.InvalidArgumentError(f"filter {text!r:.80} is not text")
    selectors, at = [], 0
    while True:
        while at < len(text) and text[at] == " ":
            at += 1
        path = []
        while True:
            m = _QUOTED.match(text, at) or _BARE_PART.match(text, at)
            if not m:
                raise errors.InvalidArgumentError(
                    f"filter {text!r}: expected a field name at character {at + 1}")
            part = m.group(0)
            path.append(_unquote(part, text) if part.startswith('"') else part)
            at = m.end()
            if not text.startswith(".", at):
                break
            at += 1
        op = _OP.match(text, at)
        if op:
            at = op.end()
            m = _QUOTED.match(text, at) or _BARE_VALUE.match(text, at)
            raw = m.group(0)
            value = _unquote(raw, text) if raw.startswith('"') else raw.strip()
            at = m.end()
            if op.group(1) == "~=":
                try:
                    re.compile(value)
                except re.error as e:
                    raise errors.InvalidArgumentError(
                        f"filter {text!r}: {value!r} is not a regular expression: {e}") from None
            selectors.append(Selector(tuple(path), op.group(1), value))
        else:
            selectors.append(Selector(tuple(path)))
        while at < len(text) and text[at] == " ":
            at += 1
        if at == len(text):
            return selectors
        if text[at] != ",":
            raise errors.InvalidArgumentError(
                f"filter {text!r}: expected ',' or an operator (==, !=, ~=) at character "
                f"{at + 1}")
        at += 1


def matcher(filters):
    """A function of a snapshot's fields (a dict: name, parent, kind, labels)
    that says whether it matches any of filters (every snapshot if none)."""
    parsed = [parse(f) for f in filters if f != ""]
    if not parsed:
        return lambda fields: True
    return lambda fields: any(all(s.matches(fields) for s in sel) for sel in parsed)
