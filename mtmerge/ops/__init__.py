"""The op families: each registers its specs (``_<family>_ops.py``) and has a typed public
module (``<family>.py``). Importing this package registers every family, then loads
``mtmerge._C``, whose CPU kernels attach to the registered schemas."""

from mtmerge import _library
from mtmerge.ops._lowrank_ops import LOWRANK_OPS
from mtmerge.ops._merge_ops import MERGE_OPS
from mtmerge.ops._moe_ops import MOE_OPS

_library.register_family("merge", MERGE_OPS)
_library.register_family("moe", MOE_OPS)
_library.register_family("lowrank", LOWRANK_OPS)
_library.load_extension()
