"""Fault injection for tests: `LLAMA4DPO_FAULT=POINT:N` kills the process with SIGKILL at that point.

Points: `step:N` (after optimizer step N, before its eval/checkpoint), `save:N` (while writing the
checkpoint of step N, after its files are written and before the rename that publishes it),
`eval:N` (in the middle of the evaluation after step N). Unset in normal use: one env lookup per call.
"""

import os
import signal


def fault_point(kind: str, step: int) -> None:
    spec = os.environ.get("LLAMA4DPO_FAULT")
    if spec and spec == f"{kind}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
