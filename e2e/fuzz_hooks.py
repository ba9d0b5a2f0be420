"""schemathesis hooks of test_faults.py: hostile text in the generated JSON bodies.

``run_schemathesis`` loads this module (``SCHEMATHESIS_HOOKS=fuzz_hooks``). In the
fuzzing phase each JSON body schemathesis generates may also go out with a lone
surrogate in a key or a value, or with a value nested past the server's
MAX_JSON_DEPTH; the check ``hostile_json_refused`` wants a 4xx for those.
"""

import json

import schemathesis
from hypothesis import strategies as st

MAX_JSON_DEPTH = 512  # pulumi_backend.MAX_JSON_DEPTH
DEEP = MAX_JSON_DEPTH + 8  # within the recursion limit of json.dumps in this process


def nested(levels):
    value = 0
    for i in range(levels):
        value = {"d": value} if i % 2 else [value]
    return value


@schemathesis.hook
def flatmap_body(context, body):
    if isinstance(body, dict):
        variants = [{**body, "\ud800": "x"}, {**body, "x": "lone \udfff"},
                    {**body, "x": nested(DEEP)}]
    elif isinstance(body, list):
        variants = [body + ["\udbff"], body + [nested(DEEP)]]
    else:
        return st.just(body)
    return st.sampled_from([body] + variants)


def depth(text):
    """How deep arrays and objects nest in JSON ``text``."""
    level = top = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            level += 1
            top = max(top, level)
        elif ch in "]}":
            level -= 1
    return top


@schemathesis.check
def hostile_json_refused(ctx, response, case):
    """A JSON body with a lone surrogate or nested past MAX_JSON_DEPTH gets a 4xx."""
    if not isinstance(case.body, (dict, list)):
        return None
    text = json.dumps(case.body, ensure_ascii=False)
    try:
        text.encode("utf-8")
        hostile = depth(text) > MAX_JSON_DEPTH
    except UnicodeEncodeError:  # only a lone surrogate cannot be encoded
        hostile = True
    if hostile and not 400 <= response.status_code < 500:
        raise AssertionError(f"a body with a lone surrogate or nested deeper than "
                             f"{MAX_JSON_DEPTH} got {response.status_code}, not a 4xx")
    return None
