"""Where the speculative loop's round goes, inside the real loop: speculative_generate_step with the random
assistant at a fixed K, and plain generate_step beside it, each with its pieces timed in place (the draft steps'
building, the verify pass's building, each mx.async_eval, and what follows the last hand-over until the next round
starts: waiting for the GPU and reading the round's tokens until the draft policy records the round, the loop's
bookkeeping until it asks the policy for the next K, handing out the previous round's token). round_split.py timed
the same pieces alone with the GPU idle; this says whether the loop adds anything they do not.
    python bench/studies/host_bound_step/loop_split.py [--weights /tmp/w12b] [--draft-tokens 3] [--json OUT]
Medians over the rounds of every generation but the first (which traces and compiles)."""
import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/, for random_model and studies/
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlx_gemma4 import decoding, speculative  # noqa: E402
from mlx_gemma4.draft_policy import DraftPolicy  # noqa: E402
from mlx_gemma4.json_files import read_json  # noqa: E402
from mlx_gemma4.loading import load_model  # noqa: E402
from random_model import build_random_assistant  # noqa: E402
from study_result import write_study_result  # noqa: E402

events = []  # (name, perf_counter) in the order they happened


def timed(name: str, function):
    def wrapper(*args, **kwargs):
        events.append((name + "+", time.perf_counter()))
        result = function(*args, **kwargs)
        events.append((name + "-", time.perf_counter()))
        return result
    return wrapper


def timed_step_maker(make_step):
    return lambda *args, **kwargs: timed("pass", make_step(*args, **kwargs))


def run(generate, prompt, tokens: int) -> list:
    """The events of one generation, each yielded token marked."""
    events.clear()
    for _ in generate(prompt, tokens):
        events.append(("yield", time.perf_counter()))
    return list(events)


def spans(recorded: list, starts: str) -> list:
    """The events cut into rounds, each starting at an event named `starts`."""
    cuts = [i for i, (name, _) in enumerate(recorded) if name == starts]
    return [recorded[a:b + 1] for a, b in zip(cuts, cuts[1:])]


def durations(round_events: list) -> dict:
    """{piece: ms} of one round: from each "+" to its "-", "after" from the last hand-over to the next round,
    "to first token" from the last hand-over to the first token handed out after it, and (speculative rounds)
    "to record" from that token to the policy's record of the round: the wait for the GPU and reading its tokens."""
    times, opened, counts = {}, {}, {}
    for name, at in round_events[:-1]:
        if name.endswith("+"):
            opened[name[:-1]] = at
        elif name.endswith("-"):
            base = name[:-1]
            counts[base] = counts.get(base, 0) + 1
            times[f"{base} {counts[base]}"] = (at - opened[base]) * 1e3
    last_handover = max(at for name, at in round_events[:-1] if name == "async_eval-")
    after = [at for name, at in round_events if at > last_handover and name == "yield"]
    times["to first token"] = ((after[0] if after else round_events[-1][1]) - last_handover) * 1e3
    recorded = [at for name, at in round_events if at > last_handover and name == "record+"]
    if after and recorded:
        times["to record"] = (recorded[0] - after[0]) * 1e3
    times["after"] = (round_events[-1][1] - last_handover) * 1e3
    times["round"] = (round_events[-1][1] - round_events[0][1]) * 1e3
    return times


def medians(rounds: list) -> dict:
    keys = [key for key in rounds[0] if all(key in r for r in rounds)]
    return {key: statistics.median(r[key] for r in rounds) for key in keys}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="/tmp/w12b")
    parser.add_argument("--draft-tokens", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    model = load_model(Path(args.weights))
    drafter = build_random_assistant(read_json(Path(args.weights) / "config.json"), 4)
    prompt = mx.arange(512) % 200000 + 10
    mx.async_eval = timed("async_eval", mx.async_eval)
    speculative.draft = timed("draft", speculative.draft)
    speculative.decode_step = timed_step_maker(speculative.decode_step)
    decoding.decode_step = timed_step_maker(decoding.decode_step)
    DraftPolicy.record, DraftPolicy.next = timed("record", DraftPolicy.record), timed("next", DraftPolicy.next)
    loops = {
        "plain": (lambda p, n: decoding.generate_step(p, model, max_tokens=n), "pass+"),
        f"K={args.draft_tokens}": (lambda p, n: speculative.speculative_generate_step(
            p, model, drafter, max_tokens=n, num_draft_tokens=args.draft_tokens), "draft+"),
    }
    results = {name: [] for name in loops}
    for generation in range(args.generations):
        for name, (generate, starts) in loops.items():
            recorded = run(generate, prompt, args.tokens)
            if generation:
                results[name] += [durations(r) for r in spans(recorded, starts)[2:]]
    rows = []
    for name, rounds in results.items():
        row = {"loop": name, "rounds": len(rounds), **{k: round(v, 3) for k, v in medians(rounds).items()}}
        rows.append(row)
        print(name, ", ".join(f"{k} {v}" for k, v in row.items() if k != "loop"), flush=True)
    if args.json:
        write_study_result(args.json, "host_bound_step/loop_split.py", argv, rows)


if __name__ == "__main__":
    main()
