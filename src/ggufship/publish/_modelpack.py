"""The CNCF ModelPack layout of one export: media types, config, annotations, manifests (pure, no I/O).

One OCI 1.1 image manifest per release (``artifactType``
``application/vnd.cncf.model.manifest.v1+json``) holds every file of the export
as a raw layer; the ModelPack config (``application/vnd.cncf.model.config.v1+json``)
says ``format: gguf`` and lists the quantizations. Everything here is derived
from ``manifest.json`` alone, with no timestamps, so the same export always gives
byte-identical JSON and therefore the same manifest digest (what makes re-push
idempotent).

The signature bundle (``model.sig``) travels as a separate artifact manifest
whose ``subject`` is the model manifest; :func:`referrers_index` builds the
image index of the OCI referrers *tag schema* (tag ``sha256-<hex>``) for
registries without the referrers API.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ggufship.manifest import Manifest

# OCI image spec
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
ANNOTATION_TITLE = "org.opencontainers.image.title"

# CNCF ModelPack (github.com/modelpack/model-spec, specs-go/v1)
ARTIFACT_TYPE_MODEL = "application/vnd.cncf.model.manifest.v1+json"
MEDIA_TYPE_MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
MEDIA_TYPE_WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
MEDIA_TYPE_WEIGHT_CONFIG_RAW = "application/vnd.cncf.model.weight.config.v1.raw"
MEDIA_TYPE_DOC_RAW = "application/vnd.cncf.model.doc.v1.raw"
ANNOTATION_FILEPATH = "org.cncf.model.filepath"

# The signature: a Sigstore bundle written by OpenSSF model signing
ARTIFACT_TYPE_SIGNATURE = "application/vnd.dev.sigstore.bundle.v0.3+json"
SIGNATURE_FILE = "model.sig"

# Our own annotations
NS = "io.ggufship"
ANNOTATION_QUANTIZATION = f"{NS}.quantization"
ANNOTATION_FILE_KIND = f"{NS}.file.kind"


def canonical_json(data: Mapping[str, Any]) -> bytes:
    """Compact JSON with sorted keys: one byte sequence per value, so one digest."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class LayerFile:
    """One file of the export as it goes into the registry."""

    path: str  # relative to the export directory (also the filepath/title annotation)
    media_type: str
    digest: str  # "sha256:<hex>"
    size: int
    quantization: str | None = None
    kind: str = "file"

    def descriptor(self) -> dict[str, Any]:
        annotations = {
            ANNOTATION_TITLE: self.path,
            ANNOTATION_FILEPATH: self.path,
            ANNOTATION_FILE_KIND: self.kind,
        }
        if self.quantization:
            annotations[ANNOTATION_QUANTIZATION] = self.quantization
        return {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
            "annotations": annotations,
        }


@dataclass(frozen=True)
class Blob:
    """A small JSON blob built in memory (config, empty config), with its descriptor."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}


@dataclass(frozen=True)
class Document:
    """A manifest or index: its exact bytes (what is pushed), media type and digest."""

    media_type: str
    data: bytes
    artifact_type: str | None = None

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
        desc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            desc["artifactType"] = self.artifact_type
        if annotations:
            desc["annotations"] = dict(annotations)
        return desc

    def json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.data)
        return result


def _precision(quants: Sequence[str]) -> str:
    upper = {q.upper() for q in quants}
    if upper == {"F16"}:
        return "fp16"
    if upper == {"BF16"}:
        return "bf16"
    if upper == {"F32"}:
        return "fp32"
    return "mixed"


def model_config(manifest: Manifest, layers: Sequence[LayerFile]) -> Blob:
    """The ModelPack config blob (``descriptor``, ``config``, ``modelfs``); raw layers: diffID = digest."""
    meta = manifest.metadata
    quants = [f.quantization or "" for f in manifest.gguf_files()]
    descriptor: dict[str, Any] = {"name": manifest.name, "version": manifest.version}
    if manifest.source.architecture:
        descriptor["family"] = manifest.source.architecture
    if meta.get("license"):
        descriptor["licenses"] = [str(meta["license"])]
    if meta.get("description"):
        descriptor["description"] = str(meta["description"])
    config = {
        "descriptor": descriptor,
        "config": {
            "architecture": "transformer",
            "format": "gguf",
            "precision": _precision(quants),
            "quantization": ",".join(q for q in quants if q),
            "capabilities": {"inputTypes": ["text"], "outputTypes": ["text"]},
        },
        "modelfs": {"type": "layers", "diffIds": [layer.digest for layer in layers]},
    }
    return Blob(MEDIA_TYPE_MODEL_CONFIG, canonical_json(config))


def _scalar(value: object) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def model_annotations(manifest: Manifest, manifest_json_digest: str) -> dict[str, str]:
    """Manifest annotations: ``org.opencontainers.image.*`` and the ``io.ggufship.*`` namespace.

    Hyperparameters come both as one JSON value and one key each; datasets and
    evaluations as JSON; dataset fingerprints also as ``name=fingerprint`` pairs.
    No creation time: the annotations, like the manifest, depend on the export only.
    """
    meta = manifest.metadata
    quants = [f.quantization for f in manifest.gguf_files() if f.quantization]
    annotations: dict[str, str] = {
        "org.opencontainers.image.title": manifest.name,
        "org.opencontainers.image.version": manifest.version,
        f"{NS}.name": manifest.name,
        f"{NS}.version": manifest.version,
        f"{NS}.quantizations": ",".join(quants),
        f"{NS}.manifest.digest": manifest_json_digest,
        f"{NS}.source.checkpoint_sha256": manifest.source.checkpoint_sha256,
        f"{NS}.source.architecture": manifest.source.architecture,
    }
    if meta.get("description"):
        annotations["org.opencontainers.image.description"] = str(meta["description"])
    if meta.get("license"):
        annotations["org.opencontainers.image.licenses"] = str(meta["license"])
    if manifest.base_model:
        annotations[f"{NS}.base_model"] = manifest.base_model
    if meta.get("base_model_relation"):
        annotations[f"{NS}.base_model_relation"] = str(meta["base_model_relation"])
    if manifest.source.adapter is not None:
        annotations[f"{NS}.source.adapter_sha256"] = manifest.source.adapter.sha256
    hyper = meta.get("hyperparameters") or {}
    if hyper:
        annotations[f"{NS}.hyperparameters"] = _scalar(hyper)
        for key, value in sorted(hyper.items()):
            annotations[f"{NS}.hyperparameter.{key}"] = _scalar(value)
    datasets = meta.get("datasets") or []
    if datasets:
        annotations[f"{NS}.datasets"] = _scalar(datasets)
        prints = [f"{d['name']}={d['fingerprint']}" for d in datasets if d.get("fingerprint")]
        if prints:
            annotations[f"{NS}.dataset.fingerprints"] = ",".join(prints)
    evaluations = meta.get("evaluations") or []
    if evaluations:
        annotations[f"{NS}.evaluations"] = _scalar(evaluations)  # declared in the release spec
    measured = manifest.evaluation  # measured by `ggufship evaluate`, covered by the signature
    if measured is not None:
        annotations[f"{NS}.evaluation.outcome"] = measured.outcome
        golden = measured.golden_set
        annotations[f"{NS}.evaluation.golden_set"] = f"{golden.name}={golden.fingerprint}"
        annotations[f"{NS}.evaluation.stable"] = f"{measured.stable.name}:{measured.stable.version}"
        annotations[f"{NS}.evaluation.metrics"] = _scalar(measured.metrics)
    return annotations


def model_manifest(config: Blob, layers: Sequence[LayerFile], annotations: Mapping[str, str]) -> Document:
    """The OCI 1.1 image manifest of one release."""
    body = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE_MODEL,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
        "annotations": dict(annotations),
    }
    return Document(MANIFEST_MEDIA_TYPE, canonical_json(body), ARTIFACT_TYPE_MODEL)


def signature_manifest(signature: LayerFile, subject: Document, annotations: Mapping[str, str]) -> Document:
    """The artifact manifest carrying ``model.sig``, pointing at the model manifest via ``subject``."""
    empty = Blob(EMPTY_MEDIA_TYPE, EMPTY_JSON)
    body = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE_SIGNATURE,
        "config": empty.descriptor(),
        "layers": [signature.descriptor()],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
        "annotations": dict(annotations),
    }
    return Document(MANIFEST_MEDIA_TYPE, canonical_json(body), ARTIFACT_TYPE_SIGNATURE)


def referrers_tag(subject_digest: str) -> str:
    """The referrers tag schema's tag for a subject: ``sha256:<hex>`` → ``sha256-<hex>``."""
    algorithm, _, hexpart = subject_digest.partition(":")
    return f"{algorithm}-{hexpart}"


def referrers_index(existing: Sequence[Mapping[str, Any]], referrer: Mapping[str, Any]) -> Document:
    """The fallback index: ``existing`` descriptors with ``referrer`` appended once (by digest)."""
    manifests = [dict(d) for d in existing if d.get("digest") != referrer.get("digest")]
    manifests.append(dict(referrer))
    body = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": manifests}
    return Document(INDEX_MEDIA_TYPE, canonical_json(body))


def empty_blob() -> Blob:
    return Blob(EMPTY_MEDIA_TYPE, EMPTY_JSON)
