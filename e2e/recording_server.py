#!/usr/bin/env python3
"""pulumi_backend.py writing down every request it handles: benchmark only.

    CAPACITY_RECORD=FILE python3 e2e/recording_server.py [the flags of pulumi_backend.py]

Each request the app dispatches (routed and authenticated, body read) is
appended to FILE as one JSON line once it is answered: wall-clock start
``t`` (time.time()), ``seconds`` taken, method, path with its query string,
the headers a replay needs (not Host, Content-Length, Connection), the body
as it came over the wire (base64; gzipped when the client gzipped it), the
answer's status and, when it is a small uncompressed JSON, its body (a replay
takes update ids and lease tokens from it). e2e/bench_capacity.py records the
real CLI through it and replays the file. The file holds the client's token:
it is for a throwaway server only.
"""

import base64
import json
import os
import sys
import threading
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pulumi_backend as pb  # noqa: E402

#: Headers left out of a recording: the replay's connection sets its own.
SKIPPED_HEADERS = frozenset({"host", "content-length", "connection", "transfer-encoding"})
#: Largest answer body kept (update ids and lease tokens come in small answers).
MAX_ANSWER = 4096

_lock = threading.Lock()
_out = None
_real_dispatch = pb.App.dispatch


def _dispatch(app, req, handler=None):
    started = time.time()
    t = time.perf_counter()
    resp = _real_dispatch(app, req, handler)
    seconds = time.perf_counter() - t
    query = urllib.parse.urlencode(req.query, doseq=True)
    record = {
        "t": started, "seconds": seconds, "method": req.method,
        "path": req.path + (f"?{query}" if query else ""),
        "headers": {k: v for k, v in req.headers.items() if k.lower() not in SKIPPED_HEADERS},
        "body": base64.b64encode(req.wire or req.body).decode(),
        "status": resp.status,
        "answer": (resp.body.decode(errors="replace")
                   if not resp.gzipped and len(resp.body) <= MAX_ANSWER else None),
    }
    line = json.dumps(record, separators=(",", ":")) + "\n"
    with _lock:
        _out.write(line)
        _out.flush()
    return resp


if __name__ == "__main__":
    _out = open(os.environ["CAPACITY_RECORD"], "a", encoding="utf-8")
    pb.App.dispatch = _dispatch
    sys.exit(pb.main())
