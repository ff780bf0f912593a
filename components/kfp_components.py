"""The KFP components, for scripts that load them from the repository (``components/smoke_image.py``).

They live in the package, :mod:`ggufship.pipeline.components` (with ``IMAGE`` and
``evaluate_model``, which needs a stable export and is not smoke-tested), so that
``ggufship pipeline compile`` works from an installed wheel; this file only re-exports them.
"""

from ggufship.pipeline.components import (
    deploy_and_await,
    export_model,
    publish_model,
    rollback_release,
    sign_model,
)

__all__ = ["deploy_and_await", "export_model", "publish_model", "rollback_release", "sign_model"]
