"""mtmerge's tests (a package, so `tests.peers` and the helpers import the same way from pytest and
from the benchmarks, whatever else on sys.path is called `tests`)."""
