"""How many tokens to draft in the next speculative round: a fixed K, or the K that pays best on this machine.

The adaptive policy picks the K that maximises expected tokens per second of wall time:
- tokens(K) = 1 + a1 + a1 a2 + ... + a1...aK, where ai is how often the i-th draft token is accepted once the ones
  before it were. Measured per position because an assistant that chains its own guesses is good at the first and
  much worse after it: a single rate would overrate long drafts.
- seconds(K) is the measured time of a round of K drafts here: K assistant steps, a (K + 1)-token verify pass and
  the loop's own overhead. How a verify pass's cost grows with its length depends on the backend and the model (at
  the 12B shape on an H100, 2 tokens cost 1.5 one-token passes; on a CPU it grows near linearly), so it is
  measured, not assumed.
K = 0 is a plain decoding step: an assistant that does not pay for itself is set aside.

The search climbs from INITIAL_DRAFT_TOKENS: every length next to the best one measured so far is tried for a few
rounds, so it settles on the measured optimum rather than a schedule's guess. Only a round that follows one of the
same length is timed: the first round at a new length may compile its shapes, and when the length changes the
rounds overlap in the pipeline differently (a plain step's successor is queued before the step is waited for).
Now and then it runs a few rounds at a neighbouring length, so times and acceptance stay current as the context grows
or the text changes, and a set-aside assistant gets to show it pays again: after PROBE_INTERVAL rounds at first,
twice as long after each probe that left the best length where it was (up to MAX_PROBE_INTERVAL), so a settled
choice costs next to nothing.
"""

import statistics
from collections import deque
from typing import Optional

from .errors import Gemma4Error

# A verify pass is the drafts and the token before them: at most 16 rows, the most the CUDA kernels take
# (quantized_matvec, decode_attention, fused_norms), so that every pass gives one-token steps' logits bit for bit.
MAX_DRAFT_TOKENS = 15
INITIAL_DRAFT_TOKENS = 1
PROBE_INTERVAL, MAX_PROBE_INTERVAL = 16, 256
# Weight the acceptance estimate gives to what came before each new observation (about the last 50 rounds count).
ACCEPTANCE_MEMORY = 0.98
# A length's round time is the median of its last few rounds: one slow round (a pause, a new kernel) is ignored.
# It is trusted once TIMED_ROUNDS_NEEDED rounds were timed, and a probe runs that many timed rounds too.
TIMED_ROUNDS_KEPT, TIMED_ROUNDS_NEEDED = 5, 2
# The first position starts from an even chance; a later one from the rate of the position before it, worth two
# observations, since chained guesses are rarely better than the guess they extend.
FIRST_PRIOR, PRIOR_WEIGHT = 0.5, 2.0


class AcceptanceByPosition:
    """Running estimate of a_i, the acceptance of the i-th draft token given the earlier ones were accepted."""

    def __init__(self):
        self.reached = [0.0] * (MAX_DRAFT_TOKENS + 1)
        self.kept = [0.0] * (MAX_DRAFT_TOKENS + 1)

    def record(self, drafted: int, accepted: int):
        # Positions after the first rejection were never judged: they say nothing about their own rate.
        for position in range(1, min(drafted, accepted + 1) + 1):
            self.reached[position] = self.reached[position] * ACCEPTANCE_MEMORY + 1
            self.kept[position] = self.kept[position] * ACCEPTANCE_MEMORY + (position <= accepted)

    def rates(self, drafts: int) -> list:
        rates, prior = [], FIRST_PRIOR
        for position in range(1, drafts + 1):
            prior = (self.kept[position] + prior * PRIOR_WEIGHT) / (self.reached[position] + PRIOR_WEIGHT)
            rates.append(prior)
        return rates

    def expected_tokens(self, drafts: int) -> float:
        total, reach = 1.0, 1.0
        for rate in self.rates(drafts):
            reach *= rate
            total += reach
        return total


class DraftPolicy:
    """next(remaining) -> K for the coming round; record(...) after each round. `fixed` K, or None to adapt."""

    def __init__(self, fixed: Optional[int] = None):
        if fixed is not None and not 1 <= fixed <= MAX_DRAFT_TOKENS:
            raise Gemma4Error(f"num_draft_tokens must be between 1 and {MAX_DRAFT_TOKENS}")
        self.fixed = fixed
        self.acceptance = AcceptanceByPosition()
        self.round_times = {}  # K -> its last few round times
        self.previous = None  # K of the last round
        self.current = fixed or INITIAL_DRAFT_TOKENS
        self.rounds = self.probes = self.probe_rounds_left = 0
        self.probe_interval, self.next_probe, self.best_at_last_probe = PROBE_INTERVAL, PROBE_INTERVAL, None

    def begin(self):
        """A new generation: what was learned stays, but its first round follows a prefill, not a round."""
        self.previous = None

    def next(self, remaining: int) -> int:
        """K for the next round; a verify pass always adds one token of the target's own, so never draft past
        max_tokens."""
        return max(0, min(self.current, remaining - 1))

    def record(self, drafted: int, accepted: int, seconds: Optional[float] = None):
        """One finished round: its draft length, the drafts kept, and its wall time if it was measured."""
        if self.fixed is not None:
            return
        if drafted:
            self.acceptance.record(drafted, accepted)
        if seconds is not None and drafted == self.previous:
            self.round_times.setdefault(drafted, deque(maxlen=TIMED_ROUNDS_KEPT)).append(seconds)
        self.previous = drafted
        self.rounds += 1
        self.current = self.choose()

    def tokens_per_second(self, drafts: int) -> float:
        return self.acceptance.expected_tokens(drafts) / statistics.median(self.round_times[drafts])

    def timed(self, drafts: int) -> int:
        return len(self.round_times.get(drafts, ()))

    def choose(self) -> int:
        if self.timed(self.current) < TIMED_ROUNDS_NEEDED:
            return self.current  # still measuring this length
        if self.probe_rounds_left:
            self.probe_rounds_left -= 1
            return self.current
        measured = [k for k in self.round_times if self.timed(k) >= TIMED_ROUNDS_NEEDED]
        best = max(measured, key=self.tokens_per_second)
        neighbours = [k for k in (best - 1, best + 1) if 0 <= k <= MAX_DRAFT_TOKENS]
        unmeasured = [k for k in neighbours if k not in measured]
        if unmeasured:
            return unmeasured[0]
        if self.rounds >= self.next_probe:
            unchanged = best == self.best_at_last_probe
            self.probe_interval = min(2 * self.probe_interval, MAX_PROBE_INTERVAL) if unchanged else PROBE_INTERVAL
            self.best_at_last_probe, self.next_probe = best, self.rounds + self.probe_interval
            self.probes += 1
            # The round that changes length is not timed: stay for TIMED_ROUNDS_NEEDED more that are.
            self.probe_rounds_left = TIMED_ROUNDS_NEEDED
            return neighbours[self.probes % len(neighbours)]
        return best
