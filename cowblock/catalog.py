"""The user-facing snapshot metadata the Python layer keeps per device.

The C core stores it as opaque bytes beside the device's details and
commits it in the same transaction as the mappings, so a name can never
disagree with the device after a crash.  It holds what C does not need:
the device's name and its labels, as compact JSON.  Everything else a user
sees (origin, read-only flag, creation time, uuid, size) is in the C
device details.
"""
import json
import re

from . import format
from .errors import InvalidArgumentError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+:@-]{0,127}\Z")
MAX_BYTES = format.CATALOG_MAX


def check_name(name):
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidArgumentError(
            f"device name {name!r} is not valid: use 1 to 128 characters from "
            "A-Z a-z 0-9 . _ + : @ -, starting with a letter or digit")
    return name


def encode(name, labels):
    try:
        labels = {} if labels is None else dict(labels)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"labels {labels!r:.100} are not a dict of strings to strings") from None
    for k, v in labels.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidArgumentError(f"label {k!r}={v!r}: labels map strings to strings")
    blob = json.dumps({"name": name, "labels": labels}, separators=(",", ":"),
                      sort_keys=True).encode()
    if len(blob) > MAX_BYTES:
        raise InvalidArgumentError(
            f"name and labels of {name!r} take {len(blob)} bytes, more than {MAX_BYTES}")
    return blob


def decode(blob):
    doc = json.loads(blob.decode("utf-8"))
    return doc["name"], doc.get("labels", {})
