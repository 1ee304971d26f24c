"""Real package: mergekit's ``ties`` merge method, called through ``mergekit.merge_methods.api.merge_tensors``.

mergekit 0.1.5's merge-method import chain needs pydantic but not transformers; install with
``pip install --no-deps mergekit==0.1.5 pydantic pydantic-core annotated-types typing-inspection``
(the Makefile does). :data:`AVAILABLE` says whether it imported; :data:`UNAVAILABLE` says why not.
The math it runs is ``GeneralizedTaskArithmeticMerge.merge_group`` with sign consensus "sum"
(mergekit/merge_methods/generalized_task_arithmetic.py) and ``sparsify.magnitude``
(mergekit/sparsify.py); :mod:`tests.peers.mergekit_ties_copy` transcribes it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

try:
    from mergekit.merge_methods.api import merge_tensors as _merge_tensors
except ImportError as exc:  # pragma: no cover - depends on the environment
    _merge_tensors = None
    UNAVAILABLE = (f"mergekit.merge_methods not importable ({exc}): pip install --no-deps mergekit pydantic "
                   "pydantic-core annotated-types typing-inspection")
else:
    UNAVAILABLE = ""

AVAILABLE = _merge_tensors is not None


def _label() -> str:
    if not AVAILABLE:
        return ""
    from importlib.metadata import version

    return f"mergekit {version('mergekit')} (merge_methods.api.merge_tensors, method 'ties')"


LABEL = _label()


def ties_merge(base: Tensor, finetuned: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
               lam: float = 1.0, normalize: bool = True) -> Tensor:
    """mergekit's ``ties`` on one tensor: ``base + lam * merged`` in the inputs' dtype."""
    parameters = {"weight": list(weights), "density": list(densities), "lambda": lam, "normalize": normalize}
    return _merge_tensors([base, *finetuned], "ties", base_index=0, parameters=parameters)
