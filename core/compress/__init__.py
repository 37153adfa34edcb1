"""Compression recipes, one module per method, resolved through a whitelist.

Torch-free at import: ``RECIPES`` names ``"module:function"`` strings and
:func:`load_recipe` imports the recipe module (torch, opacus, transformers) only when a
worker runs it. Specs carry method *names*; a name that is not a key here never imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from core.errors import InvalidRequest

RECIPES: dict[str, str] = {
    "dp_finetune": "core.compress.dp_finetune:run",
    "dpkd": "core.compress.dpkd:run",
    "dpimp_structured": "core.compress.dpimp_structured:run",
    "dpimp_unstructured": "core.compress.dpimp_unstructured:run",
    "distildp": "core.compress.distildp:run",
}


def load_recipe(method: str) -> Callable[[Any], Any]:
    """The ``run(ctx: JobContext) -> RecipeResult`` function of ``method``.

    Raises:
        InvalidRequest: ``method`` has no recipe on this worker.
    """
    try:
        target = RECIPES[method]
    except KeyError:
        raise InvalidRequest(
            f"method {method!r} is not available on this worker (available: "
            f"{', '.join(sorted(RECIPES))})",
            param="method",
        ) from None
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)
