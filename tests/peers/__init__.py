"""Every peer implementation that mtmerge's tests and benchmarks compare with, kept once.

Each module's docstring starts with its label:

* **real package**: the peer's own code, loaded from the installed package (``peft``,
  ``mergekit``); the module says how to install it and why it may be unavailable;
* **local copy**: our transcription of a peer's math (no package to install, or one whose
  import chain is too heavy), naming the source file it follows; where the package exists
  too, ``tests/ops/merge/test_peers.py`` checks the copy against it bit for bit.

Modules: :mod:`tests.peers.peft_merge_utils` (real package), :mod:`tests.peers.mergekit_ties`
(real package), :mod:`tests.peers.mergekit_ties_copy` (local copy), :mod:`tests.peers.ties_paper`
(local copy), :mod:`tests.peers.peft_lora` (real package: PEFT's mixed-adapter LoRA batch).
Benchmarks import them as ``tests.peers.*`` with the repository root on ``sys.path``.
"""

from __future__ import annotations

MODULES = ("peft_merge_utils", "mergekit_ties", "mergekit_ties_copy", "ties_paper", "peft_lora")
