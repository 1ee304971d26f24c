"""Triton kernels of mtmerge, one module per op family; installed as ``mtmerge.kernels``.

Importing a family module imports triton (an optional dependency: ``pip install mtmerge[triton]``).
"""
