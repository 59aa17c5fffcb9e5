"""Platforms (os/architecture/variant) as OCI names them, and matching.

Architectures use Go's GOARCH names (image-spec image-index.md): the
host's `platform.machine()` is mapped to them, as containerd's platforms
package does (x86_64 -> amd64, aarch64 -> arm64, armv7l -> arm/v7).
`arm64` with variant `v8` is `arm64`; `arm` without a variant is `arm/v7`.
"""
import platform as _host
import sys
from dataclasses import dataclass
from typing import Optional

from .errors import ImageError

_ARCH_ALIASES = {
    "x86_64": "amd64", "x86-64": "amd64", "amd64": "amd64",
    "aarch64": "arm64", "arm64": "arm64", "armv8l": "arm64",
    "i386": "386", "i486": "386", "i586": "386", "i686": "386", "386": "386",
    "armhf": "arm", "armel": "arm", "arm": "arm",
    "armv7l": "arm", "armv7": "arm", "armv6l": "arm", "armv6": "arm", "armv5tel": "arm",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64", "mips64": "mips64",
    "mips64le": "mips64le", "loong64": "loong64", "loongarch64": "loong64",
}
_MACHINE_VARIANT = {"armv7l": "v7", "armv7": "v7", "armhf": "v7", "armv6l": "v6",
                    "armv6": "v6", "armel": "v6", "armv5tel": "v5", "armv8l": "v8"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: Optional[str] = None

    def __str__(self):
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    def normalized(self):
        """The same platform in canonical form (lower case, arm64/v8 ->
        arm64, arm -> arm/v7)."""
        arch = _ARCH_ALIASES.get(self.architecture.lower(), self.architecture.lower())
        variant = (self.variant or "").lower() or _MACHINE_VARIANT.get(self.architecture.lower())
        if arch == "arm64" and variant == "v8":
            variant = None
        if arch == "arm" and not variant:
            variant = "v7"
        if arch == "amd64" and variant == "v1":
            variant = None
        return Platform(self.os.lower(), arch, variant or None)

    def matches(self, other):
        """Whether an image for OTHER runs where SELF is asked for: same os
        and architecture; a variant asked for must be the same."""
        want, have = self.normalized(), other.normalized()
        if (want.os, want.architecture) != (have.os, have.architecture):
            return False
        return want.variant is None or want.variant == have.variant

    @classmethod
    def from_json(cls, obj):
        """The platform of a descriptor's "platform" object or of an image
        config (its "os", "architecture" and "variant" fields); None if it
        names none."""
        if not isinstance(obj, dict):
            return None
        os_, arch = obj.get("os"), obj.get("architecture")
        if not isinstance(os_, str) or not isinstance(arch, str) or not os_ or not arch:
            return None
        variant = obj.get("variant")
        return cls(os_, arch, variant if isinstance(variant, str) and variant else None)


def parse(text):
    """A Platform from `os/arch[/variant]` (or `arch` alone, meaning linux)."""
    parts = text.split("/") if isinstance(text, str) else []
    if len(parts) == 1 and parts[0]:
        parts = ["linux"] + parts
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise ImageError(f"platform {text!r} is not valid: write os/arch[/variant], "
                         "e.g. linux/amd64 or linux/arm/v7")
    return Platform(*parts)


def host():
    """The platform this machine runs: linux and platform.machine()."""
    machine = _host.machine().lower()
    os_ = "linux" if sys.platform.startswith("linux") else sys.platform
    return Platform(os_, _ARCH_ALIASES.get(machine, machine),
                    _MACHINE_VARIANT.get(machine)).normalized()
