#!/usr/bin/env python3
"""pulumi_backend.py answering the CLI's per-step uploads at once: benchmark only.

    python3 e2e/instant_server.py [the flags of pulumi_backend.py]

BENCHMARK ONLY; ACKNOWLEDGES BEFORE STORING. Journal entries, checkpoints
(full, verbatim, delta), engine events and lease renewals get the real
handler's success answer as soon as the request is authenticated and its body
read; the real handler then runs on one worker thread, in arrival order. Every
other route (start, complete, export, GET stack, ...) first waits until that
queue is empty, so the stored state ends up the same as the real server's and
later operations see it. What a crash would lose is not kept: the point is to
show what the CLI takes when the server's answer time is zero (issue 17,
target 4). A queued call that fails is logged to stderr with INSTANT_FAILED,
and the comparison is void (bench_cli.py reports the case as failed).
"""

import queue
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pulumi_backend as pb  # noqa: E402

#: Handlers (by route name) answered at once; their real work is queued.
QUEUED = frozenset({"journal_entries", "checkpoint", "checkpoint_verbatim", "checkpoint_delta",
                    "events_batch", "renew_lease"})
#: Marks a queued call that failed in the log (bench_cli.py's INSTANT_FAILED).
FAILED = "INSTANT_FAILED"

_work: "queue.Queue" = queue.Queue()
_real_dispatch, _real_drain = pb.App.dispatch, pb.UpdateLifecycle.drain


def _answer(app, req) -> "pb.Response":
    """The success answer the real handler would give (all but renew_lease: ``{}``)."""
    if req.route.name != "renew_lease":
        return pb._json_response({})
    duration = pb._int_field(req.json(), "duration", app.cfg.lease_seconds)
    expires = pb._now() + max(1, min(duration, app.cfg.lease_seconds))
    return pb._json_response({"token": req.token, "tokenExpiration": expires})


def _dispatch(app, req, handler=None):
    if handler is not None and req.route.name in QUEUED:  # resolved, body read: acknowledge
        try:
            resp = _answer(app, req)
        except pb.HTTPError:  # e.g. a renewal body the real handler would refuse too
            return _real_dispatch(app, req, handler)
        _work.put((app, req, handler))
        return resp
    _work.join()  # every other route sees everything acknowledged so far stored
    return _real_dispatch(app, req, handler)


def _worker() -> None:
    while True:
        app, req, handler = _work.get()
        try:
            resp = _real_dispatch(app, req, handler)  # catches and logs its own errors
            if resp.status >= 300:
                print(f"{FAILED}: {req.method} {req.path} answered {resp.status} after it "
                      f"was acknowledged: {resp.body[:500]!r}", file=sys.stderr, flush=True)
        finally:
            _work.task_done()


def _drain(updates, timeout: float) -> None:
    _work.join()  # on shutdown, store what was acknowledged before the store closes
    _real_drain(updates, timeout)


if __name__ == "__main__":
    pb.App.dispatch, pb.UpdateLifecycle.drain = _dispatch, _drain
    threading.Thread(target=_worker, name="instant-worker", daemon=True).start()
    sys.exit(pb.main())
