"""Image archives in any of their four forms, read as one kind of Image.

  docker-save      a `docker save` tar of Docker before 25 (Debian's 20.10):
                   manifest.json, `<id>/layer.tar`, `<hex>.json` configs,
                   repositories.  A config must hash to its file name; each
                   layer.tar (or the tar inside it, if compressed) to its
                   diff_id.
  docker-save-oci  a `docker save` tar of Docker 25 and later: an OCI image
                   layout (oci-layout, index.json, blobs/) beside its
                   manifest.json.  Read as an OCI layout.
  oci-archive      a tar of an OCI image layout (skopeo's oci-archive).
  oci-layout       an OCI image layout directory; `DIR:TAG` selects by its
                   org.opencontainers.image.ref.name.

In an OCI layout the image is found from index.json: through nested
indexes, by platform (the host's unless one is asked for), skipping what
is not an image (attestation manifests, artifacts, unknown media types, as
image-index.md says implementations must).  Every manifest, index and
config read is checked against its descriptor's sha256 and size; layer
blobs are checked as they are streamed (blobs.LayerReader).
"""
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from . import blobs, platforms, refs
from .errors import BlobError, ImageError, MediaTypeError
from .platforms import Platform

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)

# Layer media types and their compression (None: tell from the bytes, as
# containerd does for Docker's uncompressed type, which old tools gzipped).
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    DOCKER_LAYER: None,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar": None,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
REFERENCE_TYPE = "vnd.docker.reference.type"     # "attestation-manifest" on buildx attestations
MAX_DEPTH = 8                                    # nested indexes

FORMS = ("docker-save", "docker-save-oci", "oci-archive", "oci-layout")


def chain_ids(diff_ids):
    """The OCI ChainIDs of a stack of layers (config.md): the first is its
    diff_id, each next sha256(previous + " " + diff_id)."""
    out = []
    for d in diff_ids:
        out.append(d if not out else
                   "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


@dataclass(frozen=True)
class Layer:
    """One layer of an Image, bottom first.  digest and size are the blob's
    as stored (digest None for a legacy docker-save layer.tar, which is
    checked against diff_id alone); open() streams its uncompressed tar."""

    index: int
    count: int
    media_type: str
    digest: Optional[str]
    size: int
    diff_id: str
    chain_id: str
    _open: Callable = field(repr=False, compare=False, default=None)

    @property
    def label(self):
        """How errors name it: `layer 2 of 5 (sha256:0123456789ab)`."""
        shown = (self.digest or self.diff_id)[:len("sha256:") + 12]
        return f"layer {self.index + 1} of {self.count} ({shown})"

    def open(self):
        """A blobs.LayerReader of the uncompressed tar: read it to the end
        (its last read raises BlobError if the blob is not what the image
        says).  Valid while the Archive is open."""
        return self._open(self)


@dataclass(frozen=True)
class Image:
    """One image of an archive: what `cowblock image load` needs."""

    archive: str
    form: str
    refs: tuple            # normalised references naming it in the archive
    tags: tuple            # bare tags naming it (an OCI layout's ref.name "v1")
    manifest_digest: Optional[str]    # None for a legacy docker-save image
    config_digest: str                # the image id
    config_bytes: bytes = field(repr=False)
    config: dict = field(repr=False)
    platform: Optional[Platform]
    layers: tuple

    @property
    def diff_ids(self):
        return tuple(layer.diff_id for layer in self.layers)

    @property
    def chain_ids(self):
        return tuple(layer.chain_id for layer in self.layers)

    @property
    def size(self):
        """Bytes of its layer blobs as stored."""
        return sum(layer.size for layer in self.layers)


@dataclass(frozen=True)
class Entry:
    """A top-level entry of an archive, as Archive.entries() lists them."""

    refs: tuple
    tags: tuple
    digest: Optional[str]          # its manifest or index (config for legacy docker-save)
    media_type: str
    platforms: tuple = ()          # those an index offers


@dataclass(frozen=True)
class _Descriptor:
    media_type: Optional[str]
    digest: str
    size: int
    platform: Optional[Platform]
    annotations: dict

    @classmethod
    def parse(cls, obj, where):
        if not isinstance(obj, dict):
            raise ImageError(f"{where}: a descriptor is not a JSON object")
        digest = blobs.check_digest(obj.get("digest"), where)
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{where}: descriptor of {digest} has no valid size ({size!r})")
        media_type = obj.get("mediaType")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict):
            annotations = {}
        return cls(media_type if isinstance(media_type, str) else None, digest, size,
                   Platform.from_json(obj.get("platform")), annotations)


def _json(data, what):
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ImageError(f"{what} is not valid JSON ({e})") from None
    if not isinstance(obj, (dict, list)):
        raise ImageError(f"{what} is not a JSON object")
    return obj


@dataclass
class _Top:
    """A top-level entry: an index.json descriptor or a manifest.json item."""

    digest: Optional[str]
    media_type: str
    refs: list
    tags: list
    descriptor: Optional[_Descriptor] = None
    legacy: Optional[dict] = None      # the manifest.json item

    def matches(self, selector):
        if refs.DIGEST_RE.match(selector):
            return selector == self.digest
        if refs.is_tag(selector) and (selector in self.tags
                                      or any(refs.parse(r).tag == selector for r in self.refs)):
            return True
        try:
            return refs.normalize(selector) in self.refs
        except ImageError:
            return False

    def names(self):
        return self.refs + self.tags or [self.digest or "(unnamed)"]


def _names(values):
    """Normalised references and bare tags among VALUES (others ignored)."""
    out_refs, out_tags = [], []
    for v in values:
        if not isinstance(v, str) or not v:
            continue
        if refs.is_tag(v):
            if v not in out_tags:
                out_tags.append(v)
            continue
        try:
            r = refs.normalize(v)
        except ImageError:
            continue
        if r not in out_refs:
            out_refs.append(r)
    return out_refs, out_tags


LOCATION_PREFIXES = ("oci:", "oci-archive:", "docker-archive:")   # skopeo's transports


def split_transport(location):
    """(skopeo's transport prefix or "", the rest) of LOCATION."""
    location = os.fspath(location)
    for prefix in LOCATION_PREFIXES:
        if location.startswith(prefix) and not os.path.exists(location):
            return prefix, location[len(prefix):]
    return "", location


def absolute_location(location):
    """LOCATION with its path made absolute (its transport prefix and
    `:TAG` kept): what another process, with another working directory,
    can open."""
    prefix, rest = split_transport(location)
    return prefix + os.path.abspath(rest)


def split_location(location):
    """(path, tag-or-None) of `PATH`, `PATH:TAG`, or skopeo's
    `oci:PATH[:TAG]`, `oci-archive:PATH[:TAG]`, `docker-archive:PATH[:REF]`."""
    _, location = split_transport(location)
    if os.path.exists(location):
        return location, None
    colon = location.find(":")
    while colon > 0:
        if os.path.exists(location[:colon]) and location[colon + 1:]:
            return location[:colon], location[colon + 1:]
        colon = location.find(":", colon + 1)
    raise ImageError(f"{location}: no such file or directory")


def open_archive(location):
    """The Archive at LOCATION (a path, `PATH:TAG`); close it when done."""
    path, tag = split_location(location)
    if os.path.isdir(path):
        store = blobs.DirStore(path)
        if not store.exists("index.json"):
            raise ImageError(f"{path} is a directory but not an OCI image layout: it has no "
                             "index.json")
        form = "oci-layout"
    else:
        store = blobs.TarStore(path)
        if store.exists("manifest.json"):
            form = "docker-save-oci" if store.exists("index.json") else "docker-save"
        elif store.exists("index.json"):
            form = "oci-archive"
        else:
            store.close()
            raise ImageError(f"{path} is a tar but not an image archive: it has neither "
                             "manifest.json (docker save) nor index.json (OCI)")
    return Archive(path, form, store, tag)


class Archive:
    """An open image archive.  entries() lists what it holds, image()
    selects one; an Image's layers stream while the Archive is open."""

    def __init__(self, path, form, store, tag=None):
        self.path, self.form, self.tag = path, form, tag
        self._store = store
        self._tops = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._store.close()

    # ---- the top-level entries ----
    def _top_entries(self):
        if self._tops is None:
            self._tops = self._legacy_tops() if self.form == "docker-save" else self._oci_tops()
        return self._tops

    def _oci_tops(self):
        where = f"{self.path}: index.json"
        index = _json(blobs.read_small(self._store, "index.json", "index.json"), where)
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list):
            raise ImageError(f"{where} has no \"manifests\" list")
        tops = []
        for i, obj in enumerate(manifests):
            d = _Descriptor.parse(obj, f"{where} entry {i}")
            found_refs, found_tags = _names([d.annotations.get(CONTAINERD_NAME),
                                             d.annotations.get(REF_NAME)])
            tops.append(_Top(d.digest, d.media_type or "", found_refs, found_tags, d))
        return tops

    def _legacy_tops(self):
        where = f"{self.path}: manifest.json"
        items = _json(blobs.read_small(self._store, "manifest.json", "manifest.json"), where)
        if not isinstance(items, list):
            raise ImageError(f"{where} is not a list of images")
        tops = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("Config"), str) or \
                    not isinstance(item.get("Layers"), list):
                raise ImageError(f"{where} item {i} has no Config and Layers")
            tags = item.get("RepoTags") or []
            found_refs, _ = _names(tags if isinstance(tags, list) else [])
            tops.append(_Top(_named_digest(item["Config"]), DOCKER_CONFIG, found_refs, [],
                             legacy=item))
        return tops

    def entries(self):
        """Every image the archive names at its top, as Entry records."""
        out = []
        for top in self._top_entries():
            offered = ()
            if top.media_type in INDEX_TYPES:
                try:
                    offered = tuple(self._platforms(top.descriptor, 0))
                except ImageError:
                    offered = ()
            out.append(Entry(tuple(top.refs), tuple(top.tags), top.digest, top.media_type,
                             offered))
        return out

    def _platforms(self, desc, depth):
        out = []
        for child in self._children(desc, depth):
            if child.media_type in INDEX_TYPES:
                out.extend(self._platforms(child, depth + 1))
            elif child.platform is not None and not _is_attestation(child):
                out.append(child.platform)
        return out

    # ---- choosing one ----
    def image(self, ref=None, platform=None):
        """The Image named REF (a reference, a bare tag, or a manifest
        digest; default: the archive's `:TAG`, else its only image) for
        PLATFORM (`os/arch[/variant]`, a Platform, or None: the host's).
        ImageError when nothing or more than one image matches."""
        selector = ref or self.tag
        explicit = platform is not None
        want = platforms.parse(platform) if isinstance(platform, str) else \
            (platform or platforms.host())
        tops = self._top_entries()
        if selector:
            chosen = [t for t in tops if t.matches(selector)]
            if not chosen:
                raise ImageError(f"{self.path} holds no image {selector!r}; it holds: "
                                 f"{_listing(tops)}")
        else:
            chosen = tops
        found = {}        # manifest (or config) digest -> (Image, tops)
        skipped = []
        for top in chosen:
            image = self._load_top(top, want, explicit, skipped)
            if image is None:
                continue
            key = image.manifest_digest or image.config_digest
            if key in found:
                found[key][1].append(top)
            else:
                found[key] = (image, [top])
        if not found:
            what = f" {selector!r}" if selector else ""
            offered = f"; it offers {', '.join(sorted(set(skipped)))}" if skipped else ""
            raise ImageError(f"{self.path} holds no image{what} for platform {want}{offered}")
        if len(found) > 1:
            raise ImageError(f"{self.path} holds {len(found)} images: "
                             f"{_listing(t for _, ts in found.values() for t in ts)}; "
                             "choose one (PATH:TAG or a reference)")
        image, named_by = next(iter(found.values()))
        same = {t.digest for t in named_by}
        named_by += [t for t in tops if t.digest in same and t not in named_by]
        all_refs = list(dict.fromkeys(r for t in named_by for r in t.refs))
        all_tags = list(dict.fromkeys(g for t in named_by for g in t.tags))
        return replace(image, refs=tuple(all_refs), tags=tuple(all_tags))

    def _load_top(self, top, want, explicit, skipped):
        if top.legacy is not None:
            image = self._legacy_image(top)
            if explicit and image.platform and not want.matches(image.platform):
                skipped.append(str(image.platform))
                return None
            return image
        top_platform = top.descriptor.platform
        if top_platform is not None and top.media_type in MANIFEST_TYPES and \
                not want.matches(top_platform):
            skipped.append(str(top_platform))     # index.json listing one per platform
            return None
        for desc in self._leaves(top.descriptor, want, 0, skipped):
            image = self._oci_image(desc, want, explicit, skipped)
            if image is not None:
                return image
        return None

    def _children(self, desc, depth):
        if depth >= MAX_DEPTH:
            raise ImageError(f"{self.path}: indexes nested deeper than {MAX_DEPTH}")
        what = f"{self.path}: index {desc.digest}"
        index = _json(blobs.read_blob(self._store, desc.digest, desc.size, "index"), what)
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list):
            raise ImageError(f"{what} has no \"manifests\" list")
        return [_Descriptor.parse(m, f"{what} entry {i}") for i, m in enumerate(manifests)]

    def _leaves(self, desc, want, depth, skipped):
        """The manifest descriptors under DESC that may be for WANT, in order."""
        if desc.media_type in MANIFEST_TYPES:
            yield desc
        elif desc.media_type in INDEX_TYPES:
            for child in self._children(desc, depth):
                if _is_attestation(child):
                    continue
                if child.platform is not None and child.media_type in MANIFEST_TYPES \
                        and not want.matches(child.platform):
                    skipped.append(str(child.platform))
                    continue
                yield from self._leaves(child, want, depth + 1, skipped)
        elif desc.media_type in DOCKER_SCHEMA1:
            raise MediaTypeError(f"{self.path}: manifest {desc.digest} is Docker's schema 1, "
                                 "which is not supported (pull and save it again)")
        # anything else (artifacts, unknown types) is not an image: skipped

    def _oci_image(self, desc, want, explicit, skipped):
        what = f"{self.path}: manifest {desc.digest}"
        manifest = _json(blobs.read_blob(self._store, desc.digest, desc.size, "manifest"), what)
        if not isinstance(manifest, dict):
            raise ImageError(f"{what} is not a JSON object")
        inner = manifest.get("mediaType")
        if isinstance(inner, str) and inner not in MANIFEST_TYPES:
            raise MediaTypeError(f"{what}: its mediaType {inner!r} is not an image manifest's")
        config = _Descriptor.parse(manifest.get("config"), f"{what} config")
        if config.media_type not in CONFIG_TYPES:
            return None      # an artifact, not an image
        layer_list = manifest.get("layers")
        if not isinstance(layer_list, list):
            raise ImageError(f"{what} has no \"layers\" list")
        layers = [_Descriptor.parse(m, f"{what} layer {i}") for i, m in enumerate(layer_list)]
        for i, layer in enumerate(layers):
            if layer.media_type not in LAYER_TYPES:
                raise MediaTypeError(
                    f"{what}: layer {i + 1} of {len(layers)} ({layer.digest}) has media type "
                    f"{layer.media_type!r}, which is not a tar, tar+gzip or tar+zstd layer")
        config_bytes = blobs.read_blob(self._store, config.digest, config.size, "config")
        cfg, diff_ids = _config(config_bytes, f"{self.path}: config {config.digest}",
                                len(layers))
        image_platform = Platform.from_json(cfg) or desc.platform
        if explicit and image_platform and not want.matches(image_platform):
            skipped.append(str(image_platform))
            return None
        chains = chain_ids(diff_ids)
        built = []
        for i, (d, diff_id, chain) in enumerate(zip(layers, diff_ids, chains)):
            built.append(Layer(i, len(layers), d.media_type, d.digest, d.size, diff_id, chain,
                               self._open_oci_layer))
        for layer in built:   # present and of the right size, before anything is applied
            blobs.open_blob(self._store, layer.digest, layer.size, layer.label).close()
        return Image(self.path, self.form, (), (), desc.digest, config.digest, config_bytes,
                     cfg, image_platform, tuple(built))

    def _open_oci_layer(self, layer):
        region = blobs.open_blob(self._store, layer.digest, layer.size, layer.label)
        return blobs.LayerReader(region, compression=LAYER_TYPES[layer.media_type],
                                 digest=layer.digest, size=layer.size, diff_id=layer.diff_id,
                                 label=f"{self.path}: {layer.label}")

    def _legacy_image(self, top):
        item = top.legacy
        where = f"{self.path}: {item['Config']}"
        config_bytes = blobs.read_small(self._store, item["Config"], "config")
        digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        if top.digest is not None and digest != top.digest:
            raise BlobError(f"{where}: the config's sha256 is {digest}, not the one its name "
                            "says")
        paths = item["Layers"]
        if not all(isinstance(p, str) for p in paths):
            raise ImageError(f"{self.path}: manifest.json Layers are not file names")
        cfg, diff_ids = _config(config_bytes, where, len(paths))
        chains = chain_ids(diff_ids)
        built = []
        for i, (p, diff_id, chain) in enumerate(zip(paths, diff_ids, chains)):
            region = self._store.open(p)
            region.close()
            built.append(Layer(i, len(paths), DOCKER_LAYER, _named_digest(p), region.size,
                               diff_id, chain, self._open_legacy_layer(p)))
        return Image(self.path, self.form, (), (), None, digest, config_bytes, cfg,
                     Platform.from_json(cfg), tuple(built))

    def _open_legacy_layer(self, path):
        def open_layer(layer):
            region = self._store.open(path)
            return blobs.LayerReader(region, compression=None, digest=layer.digest,
                                     size=layer.size, diff_id=layer.diff_id,
                                     label=f"{self.path}: {layer.label} {path}")
        return open_layer


def _named_digest(path):
    """The digest a file name states: `blobs/sha256/HEX` or `HEX.json`."""
    base = os.path.basename(path)
    hexpart = base[:-len(".json")] if base.endswith(".json") else base
    if path.startswith("blobs/sha256/") or base.endswith(".json"):
        candidate = "sha256:" + hexpart
        if refs.DIGEST_RE.match(candidate):
            return candidate
    return None


def _config(data, what, layer_count):
    """The parsed config and its diff_ids, which must be one per layer."""
    cfg = _json(data, what)
    if not isinstance(cfg, dict):
        raise ImageError(f"{what} is not a JSON object")
    rootfs = cfg.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers" or \
            not isinstance(rootfs.get("diff_ids"), list):
        raise ImageError(f"{what} has no rootfs of type \"layers\" with diff_ids")
    diff_ids = [blobs.check_digest(d, f"{what} diff_id {i}")
                for i, d in enumerate(rootfs["diff_ids"])]
    if len(diff_ids) != layer_count:
        raise ImageError(f"{what} lists {len(diff_ids)} diff_ids for {layer_count} layers")
    return cfg, diff_ids


def _is_attestation(desc):
    return desc.annotations.get(REFERENCE_TYPE) == "attestation-manifest" or (
        desc.platform is not None and desc.platform.os == "unknown"
        and desc.platform.architecture == "unknown")


def _listing(tops):
    names = []
    for t in tops:
        names.extend(n for n in t.names() if n not in names)
    return ", ".join(names) or "nothing"


