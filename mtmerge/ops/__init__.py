"""Typed wrappers of the ``torch.ops.mtmerge`` ops, one module per family."""
