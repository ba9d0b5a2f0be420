"""Which state protocol the server saw in each e2e test, and the README table of it (stdlib only).

With ``PULUMI_BACKEND_MATRIX_OUT=FILE`` set, every e2e test appends one JSON
line to FILE: its name, CLI variant and the protocols the server saw while it
ran (from ``/metrics``: ``pulumi_backend_checkpoints_total{form}`` and
``pulumi_backend_journal_entries_total``; the journal version from the
server's "started update ... (journal vN)" log lines).

    python3 e2e/matrix.py FILE      prints the version x scenario table (Markdown)
"""

import json
import re
import sys

FORMS = ("full", "verbatim", "delta")


def counters(server):
    """{form: count} of committed checkpoints and {"journal": entries}, from /metrics."""
    status, body = server.request("GET", "/metrics")
    if status != 200:
        return {}
    out = {}
    for line in body.decode().splitlines():
        m = re.fullmatch(r'pulumi_backend_checkpoints_total\{form="(\w+)"\} (\S+)', line)
        if m:
            out[m[1]] = float(m[2])
        m = re.fullmatch(r"pulumi_backend_journal_entries_total (\S+)", line)
        if m:
            out["journal"] = float(m[1])
    return out


def protocols(before, after, log_text):
    """The protocols of one test: e.g. ["journal v2"] or ["verbatim", "delta"]."""
    seen = [f for f in FORMS if after.get(f, 0) > before.get(f, 0)]
    if after.get("journal", 0) > before.get("journal", 0):
        versions = sorted(set(re.findall(r"\(version \d+, journal v(\d+)\)", log_text)))
        seen += [f"journal v{v}" for v in versions] or ["journal"]
    return seen


def record(path, test, cli, seen):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"test": test, "cli": cli, "protocols": seen}) + "\n")


def table(rows):
    """Markdown: a row per scenario, a column per CLI variant (newest first)."""
    def newest_first(cli):  # "cli=v3.214.0+journal" -> ((-3, -214, 0), "+journal")
        version, _, variant = cli.removeprefix("cli=v").partition("+")
        return tuple(-int(n) for n in version.split(".") if n.isdigit()), variant
    clis = sorted(dict.fromkeys(r["cli"] for r in rows), key=newest_first)
    cells = {}
    for r in rows:
        cells[(r["test"], r["cli"])] = ", ".join(r["protocols"]) or "none"
    tests = list(dict.fromkeys(r["test"] for r in rows))
    lines = ["| scenario | " + " | ".join(clis) + " |",
             "|---|" + "---|" * len(clis)]
    for t in tests:
        lines.append(f"| `{t}` | " + " | ".join(cells.get((t, c), "") for c in clis) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        print(table([json.loads(line) for line in f if line.strip()]))
