"""Plain-PyTorch references: the math that defines each op, readable first."""
