"""Image references, normalised as docker does, and device names for them.

`debian` is `docker.io/library/debian:latest`, `user/app` is
`docker.io/user/app:latest`, `ghcr.io/x/y:tag` stays as it is, and
`name@sha256:...` keeps its digest (no `latest` is added to it): the rules
of the distribution project's reference grammar
(github.com/distribution/reference, ParseNormalizedNamed).  The first
component of a name is a registry when it holds a `.` or a `:`, is
`localhost`, or has an upper-case letter; `index.docker.io` is `docker.io`.
"""
import hashlib
import re
from dataclasses import dataclass
from typing import Optional

from .errors import ImageError

DEFAULT_DOMAIN = "docker.io"
_LEGACY_DOMAIN = "index.docker.io"
_OFFICIAL = "library/"
MAX_NAME = 255

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
PATH_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*\Z")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
DOMAIN_RE = re.compile(rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?\Z")
TAG_RE = re.compile(r"[\w][\w.-]{0,127}\Z", re.ASCII)
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")
_IDENTIFIER_RE = re.compile(r"[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class Reference:
    """A normalised reference: domain/path[:tag][@digest]."""

    domain: str
    path: str
    tag: Optional[str] = None
    digest: Optional[str] = None

    @property
    def name(self):
        """The repository: domain/path."""
        return f"{self.domain}/{self.path}"

    def __str__(self):
        return (self.name + (f":{self.tag}" if self.tag else "")
                + (f"@{self.digest}" if self.digest else ""))

    def familiar(self):
        """The short form docker prints: `debian:latest`, `user/app:1`,
        `ghcr.io/x/y:tag` (parse() of it gives this reference back)."""
        name = self.name
        if self.domain == DEFAULT_DOMAIN:
            name = self.path
            if name.startswith(_OFFICIAL) and "/" not in name[len(_OFFICIAL):]:
                name = name[len(_OFFICIAL):]
        return (name + (f":{self.tag}" if self.tag else "")
                + (f"@{self.digest}" if self.digest else ""))


def _split_domain(name):
    first, slash, rest = name.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost"
                     and first.lower() == first):
        domain, path = DEFAULT_DOMAIN, name
    else:
        domain, path = first, rest
    if domain == _LEGACY_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = _OFFICIAL + path
    return domain, path


def parse(text):
    """The normalised Reference of TEXT; ImageError when it is not one."""
    if not isinstance(text, str) or not text:
        raise ImageError(f"image reference {text!r} is not valid: it is empty")

    def bad(why):
        return ImageError(f"image reference {text!r} is not valid: {why}")

    rest, at, digest = text.partition("@")
    if at and not DIGEST_RE.match(digest):
        raise bad("a digest is sha256: and 64 lower-case hex digits")
    tag = None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        rest, tag = rest[:colon], rest[colon + 1:]
        if not TAG_RE.match(tag):
            raise bad("a tag is 1 to 128 letters, digits, '_', '.' or '-', not starting "
                      "with '.' or '-'")
    if _IDENTIFIER_RE.match(rest):
        raise bad("a 64-digit hexadecimal string is an image id, not a repository name")
    domain, path = _split_domain(rest)
    if not DOMAIN_RE.match(domain):
        raise bad(f"{domain!r} is not a registry host[:port]")
    if path.lower() != path:
        raise bad("the repository name must be lower-case")
    if not PATH_RE.match(path):
        raise bad("a repository name is '/'-separated components of lower-case letters "
                  "and digits joined by '.', '_', '__' or '-'")
    if len(domain) + 1 + len(path) > MAX_NAME:
        raise bad(f"the repository name is longer than {MAX_NAME} characters")
    if tag is None and not digest:
        tag = "latest"
    return Reference(domain, path, tag, digest or None)


def normalize(text):
    """TEXT normalised as docker does: `debian` -> `docker.io/library/debian:latest`."""
    return str(parse(text))


def is_tag(text):
    """Whether TEXT is a bare tag (`v1`, `latest`) rather than a reference:
    what an OCI layout's org.opencontainers.image.ref.name often holds."""
    return isinstance(text, str) and ":" not in text and "/" not in text and \
        "@" not in text and bool(TAG_RE.match(text))


_STEM_HASH = 16


def device_stem(ref, max_length=100):
    """A device-name stem for REF (a Reference or a string): valid for
    cowblock.catalog.NAME_RE, stable, and distinct for distinct references.

    It is the familiar form with '/' as '+' (no reference holds a '+', so
    this is one-to-one): `debian:latest`, `ghcr.io+x+y:tag`.  One longer
    than max_length is cut and ends with '@' and 16 hex digits of the
    sha256 of the full reference (a short form never ends so: a digest's
    '@' is followed by 'sha256:')."""
    if not isinstance(ref, Reference):
        ref = parse(ref)
    if max_length < _STEM_HASH + 2 or max_length > 128:
        raise ValueError("max_length must be between 18 and 128")
    stem = ref.familiar().replace("/", "+")
    if len(stem) <= max_length:
        return stem
    digest = hashlib.sha256(str(ref).encode()).hexdigest()[:_STEM_HASH]
    return stem[:max_length - _STEM_HASH - 1] + "@" + digest
