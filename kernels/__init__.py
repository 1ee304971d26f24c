"""Triton kernels of mtmerge, one package or module per op family; installed as ``mtmerge.kernels``.

``merge/``: the merge family (selection, trim, DARE, the fused merge, histograms, masks).
Importing a family imports triton (an optional dependency: ``pip install mtmerge[triton]``).
"""
