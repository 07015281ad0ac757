"""A Redis worker whose Nth model call is held until the test releases it (test support only).

    python tests/server/held_worker.py HOLD_DIR N -- [python -m server.worker flags]

Exactly `python -m server.worker`, except that the Nth call of each model's predict (1-based)
creates HOLD_DIR/entered and then waits until HOLD_DIR/release exists. The test thereby forces the
state "this worker is inside a batch and holds its entries" before it signals or kills the worker,
instead of hoping to catch it there.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def hold_nth_call(load, hold_dir: Path, n: int):
    """load_served_model -> the same, whose models hold their nth predict call."""
    def load_held(*args, **kwargs):
        model = load(*args, **kwargs)
        predict, calls = model.predict, [0]

        def held(x):
            calls[0] += 1
            if calls[0] == n:
                (hold_dir / "entered").touch()
                while not (hold_dir / "release").exists():   # the test's release; a file, so any process can
                    time.sleep(0.01)
            return predict(x)
        model.predict = held
        return model
    return load_held


def main(argv: list[str]) -> int:
    hold_dir, n, sep, *worker_argv = argv
    if sep != "--":
        raise SystemExit("usage: held_worker.py HOLD_DIR N -- [worker flags]")
    sys.path[:0] = [str(REPO), str(REPO / "python")]   # this checkout's server package, run as a script
    import server.worker as worker

    worker.load_served_model = hold_nth_call(worker.load_served_model, Path(hold_dir), int(n))
    return worker.main(worker_argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
