"""Container images from archives: read them, apply their layers.

A library below the pool: it knows archives and directories, nothing of
devices.  archive.open_archive reads any of the four forms (docker save
of old and new Docker, oci-archive, an OCI layout directory) as Images of
checked, streamable Layers; apply.apply_layer puts one layer's tar onto a
directory by the OCI layer rules, never writing outside it.

    with open_archive("debian.tar") as archive:
        image = archive.image()                    # or image("ref", platform="linux/arm64")
        for layer in image.layers:                 # bottom first; layer.chain_id names it
            with layer.open() as stream:
                apply_layer(stream, "/mnt/layer")  # raises BlobError if the blob is bad
"""
from .apply import ApplyStats, apply_layer, clean_name, default_limits
from .archive import FORMS, Archive, Entry, Image, Layer, chain_ids, open_archive
from .errors import (BlobError, ImageError, LayerError, LayerIOError, LayerLimitError,
                     LayerSpaceError, MediaTypeError, UnsafeLayerError)
from .platforms import Platform
from .refs import Reference, device_stem, normalize

__all__ = ["ApplyStats", "apply_layer", "clean_name", "default_limits", "FORMS", "Archive",
           "Entry", "Image", "Layer", "chain_ids", "open_archive", "BlobError", "ImageError",
           "LayerError", "LayerIOError", "LayerLimitError", "LayerSpaceError",
           "MediaTypeError", "UnsafeLayerError", "Platform", "Reference", "device_stem",
           "normalize"]
