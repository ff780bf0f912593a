"""ggufship: fine-tuned checkpoint → verified, signed GGUF → canary-gated API.

The public front of the library. Each stage is a plain function; the CLI and
the KFP components are thin layers over these.
"""

from __future__ import annotations

from ggufship.errors import GgufshipError
from ggufship.export import ExportRequest, ExportResult, export_checkpoint
from ggufship.integrity import VerifyReport, verify_export
from ggufship.manifest import Manifest, ManifestFile
from ggufship.release import ReleaseSpec, load_release_spec

__version__ = "0.1.0"

__all__ = [
    "ExportRequest",
    "ExportResult",
    "GgufshipError",
    "Manifest",
    "ManifestFile",
    "ReleaseSpec",
    "VerifyReport",
    "__version__",
    "export_checkpoint",
    "load_release_spec",
    "verify_export",
]
