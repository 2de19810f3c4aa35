"""`python web_demo.py ...` with every answer held after HOLD_AFTER new tokens until the page's Stop is clicked: the
web demo's Stop test runs its server through this file, so that the answer is still being written when Stop comes,
however fast the machine generates. The hold is a stopping criterion in front of web_demo.StopOnEvent (the one the
Stop button sets): it waits for the same event, then lets StopOnEvent end the answer."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import web_demo  # noqa: E402

HOLD_AFTER = 8  # new tokens shown before the hold
HOLD_SECONDS = 300  # a test that never clicks Stop fails on its own timeout, not here


class HeldStopOnEvent(web_demo.StopOnEvent):
    def __init__(self, event):
        super().__init__(event)
        self.tokens = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.tokens += 1  # generate() asks once per new token
        if self.tokens >= HOLD_AFTER:
            self.event.wait(timeout=HOLD_SECONDS)
        return super().__call__(input_ids, scores, **kwargs)


if __name__ == "__main__":
    web_demo.StopOnEvent = HeldStopOnEvent
    sys.exit(web_demo.main())
