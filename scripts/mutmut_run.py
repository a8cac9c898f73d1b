"""``make mutate``'s entry to mutmut 3.8.1: ``mutmut``'s own CLI with two changes.

1. mutmut's process writes bytecode (``sys.dont_write_bytecode`` off), so each test module's
   assertion-rewritten ``.pyc`` is cached in ``mutants/`` after the first mutant: that halves
   what a killed mutant costs. (The programs the tests start write none:
   ``PYTHONDONTWRITEBYTECODE=1`` in the Makefile, as in the suite's usual environment.)
2. A mutant of reconciliation (``tpu_registry/detection.py``) runs only the tests that call
   detection themselves (``detect``, ``reconcile`` or a helper of theirs), not every test that
   reaches it through another module of the package: nearly every ``resolve()`` in the suite
   calls ``detect(simulate=...)``, which makes those tests about 140 of the 276 that would be
   selected for each detection mutant and most of their time, for evidence (one explicit
   generation) that exercises almost none of the reconciliation rules. mutmut's own
   ``max_stack_depth`` cannot say this: it applies one depth to every module, and the overrides
   policy is reached only 7 to 9 frames below the tests that cover it.

How: mutmut records, while it runs the suite once unmutated, which test calls which mutated
function (``record_trampoline_hit``, called by each function's trampoline). For the modules in
``DIRECT_ONLY`` a call is recorded only when every frame of the package between the test and
the call is in that same module.
"""

from __future__ import annotations

import os
import sys

sys.dont_write_bytecode = False
if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    del sys.path[0]  # as with `python -c`: nothing is imported from scripts/ by accident

import mutmut.mutation.trampoline as trampoline  # noqa: E402
from mutmut.__main__ import cli  # noqa: E402
from mutmut.configuration import config  # noqa: E402

# Module (as mutmut names it) -> the file of the package its callers must be in.
DIRECT_ONLY = {"tpu_registry.detection.": "detection.py"}

_record = trampoline.record_trampoline_hit
_where: dict[str, str | None] = {}  # a frame's file -> its path in the package (None: outside)


def _in_package(filename: str) -> str | None:
    if filename not in _where:
        path = os.path.realpath(filename)
        _where[filename] = None
        for root in config().resolved_mutated_source_paths:
            prefix = str(root) + os.sep
            if path.startswith(prefix):
                _where[filename] = path[len(prefix) :]
    return _where[filename]


def _called_directly(own: str) -> bool:
    """Whether every frame of the package between the test and here is in ``own``."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if "pytest" in name:  # pytest's own frames: the test is below them (as mutmut stops)
            return True
        where = _in_package(name)
        if where is not None and where != own:
            return False
        f = f.f_back
    return True


def record_trampoline_hit(name: str, caller: str | None = None) -> None:
    for module, own in DIRECT_ONLY.items():
        if name.startswith(module) and not _called_directly(own):
            return
    _record(name, caller)


trampoline.record_trampoline_hit = record_trampoline_hit

if __name__ == "__main__":
    cli()
