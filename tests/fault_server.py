"""`python -m tests.fault_server [aengine flags]`: the real server, except that a step whose
prefill holds token FAULT_TOKEN raises inside the step, as a faulting kernel would. Tests drive the
fault path of a real server with it; production code carries no hook for them."""

from __future__ import annotations

import sys

from aengine.__main__ import main
from aengine.runtime.runner import ModelRunner
from aengine.runtime.step import StepInput

FAULT_TOKEN = 7
_step = ModelRunner.step


def faulting_step(self: ModelRunner, inp: StepInput) -> object:
    if FAULT_TOKEN in inp.input_ids:
        raise RuntimeError(f"injected fault (token {FAULT_TOKEN} in a prefill)")
    return _step(self, inp)


ModelRunner.step = faulting_step  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
