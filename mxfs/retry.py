"""Bounded exponential backoff: the retry policy of every layer that talks to another server.

Attempts and delays are finite, so a server that stays down becomes an error the caller can
report (EIO, a registry error), never a hang.  Each layer names its own policy next to the calls
it governs: the Hub's requests, an entry's download attempts, the Kubernetes API's answers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int  # tries in all, the first one included
    initial_delay: float  # seconds before the first retry; each next one waits twice as long
    max_delay: float
    # Wait a random half to all of each delay, so that clients turned away together (a server
    # shedding load) do not all come back at the same instant.
    jitter: bool = False

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0: the first retry, after one failure)."""
        delay = min(self.max_delay, self.initial_delay * 2.0**retry)
        return delay * random.uniform(0.5, 1.0) if self.jitter else delay

    def gives_up_after(self, failures: int) -> bool:
        """Whether ``failures`` failed tries in a row use up the attempts."""
        return failures >= self.attempts
