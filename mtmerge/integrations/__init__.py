"""Integrations of mtmerge's kernels with other libraries.

* :mod:`mtmerge.integrations.transformers`: ``register()`` adds ``"mtmerge"`` to transformers'
  experts implementations (``experts_implementation="mtmerge"``).

Submodules import their library on use; importing this package imports none of them.
"""
