"""What loading an image archive or applying a layer raises.

Each class sits under the cowblock error it means, so the CLI's exit codes
(cowblock.cli.common.EXIT_CODES) follow: a bad archive or layer is an
invalid argument (5), a full target filesystem is no space (6), an I/O
error on the archive or the target is an error on a host file (11).
Every message names the archive, blob, layer or entry at fault.
"""
from ..errors import HostFileError, InvalidArgumentError, NoSpaceError


class ImageError(InvalidArgumentError):
    """An image archive that cannot be read: not one of the known forms,
    malformed JSON, a missing blob, a reference or platform it does not hold."""

    hint = ("give a `docker save` tar, an oci-archive tar or an OCI image layout "
            "directory (PATH:TAG selects an image in it)")


class BlobError(ImageError):
    """A blob whose bytes are not what its descriptor says: another sha256,
    another size (truncated), or uncompressed bytes that do not match the
    config's diff_id; or compressed data that does not decompress."""

    hint = "the archive is damaged or was altered: make it again (docker save, skopeo copy)"


class MediaTypeError(ImageError):
    """A manifest, config or layer of a media type this loader does not know."""


class LayerError(ImageError):
    """A layer tar that cannot be applied: not a tar, an entry type or a
    combination of entries the OCI layer rules do not allow."""


class UnsafeLayerError(LayerError):
    """A layer entry that would reach outside the layer's root: a name with
    '..' above the root, a path through a symlink that leaves it, a hard
    link to outside, a whiteout of '..'."""

    hint = "the image is hostile or broken; nothing outside the layer was written"


class LayerLimitError(LayerError):
    """A layer over the limits of decompressed bytes or entries (a
    decompression bomb)."""

    hint = "raise the limit (max_bytes=, max_entries=) if the image is trusted"


class LayerSpaceError(NoSpaceError):
    """The filesystem a layer is applied onto ran out of blocks or inodes."""

    hint = "make the image's filesystem larger (--size)"


class LayerIOError(HostFileError):
    """Any other OS error writing a layer's entries onto the target."""


__all__ = ["ImageError", "BlobError", "MediaTypeError", "LayerError", "UnsafeLayerError",
           "LayerLimitError", "LayerSpaceError", "LayerIOError", "HostFileError"]
