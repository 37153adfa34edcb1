"""Model registry and loaders (torch zone): ``load_model`` → train → ``save_model``."""

from core.models.loading import (
    LoadedModel,
    apply_tied_weights_policy,
    load_model,
    load_snippet,
    save_model,
    split_trainable,
)
from core.models.registry import ModelSource, resolve_source

__all__ = [
    "LoadedModel",
    "ModelSource",
    "apply_tied_weights_policy",
    "load_model",
    "load_snippet",
    "resolve_source",
    "save_model",
    "split_trainable",
]
