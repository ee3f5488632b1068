"""torch and transformers: optional dependencies (the `verify` extra), imported only by the features that need them."""

from __future__ import annotations

from .errors import SurgeryError

INSTALL = 'pip install "weight-surgery[verify]"'


def torch_and_transformers(purpose: str, error: type[SurgeryError] = SurgeryError) -> tuple[object, object]:
    """The torch and transformers modules (transformers' logging and progress bars quietened), or `error` saying
    that `purpose` needs them and how to install them."""
    try:
        import torch
        import transformers
    except ImportError:
        raise error(f"{purpose} needs torch and transformers: {INSTALL} (for torch, the CPU build is enough)") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers
