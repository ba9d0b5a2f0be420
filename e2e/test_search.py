"""Resource search with the real (newest) CLI: `pulumi org search` over stacks made by
`pulumi up`, its table, JSON and CSV output, a refused query, and `pulumi insights
resource search` (the v2 API)."""

import csv
import io
import json

from test_cli import spec


def names(results):
    return sorted((r["stack"], r["name"]) for r in results)


def test_org_search_finds_resources_of_stacks_made_by_up(e2e):
    e2e.up(e2e.stack("dev"), spec(e2e, {"alpha": {"content": "1", "protect": True},
                                        "beta": {"content": "2"}}, components=1))
    e2e.up(e2e.stack("prod"), spec(e2e, {"gamma": {"content": "3", "fname": "g.txt"}}))
    project = e2e.project

    table = e2e.run("org", "search", "-q", f"project:{project}", "-q", "name:alpha").stdout
    assert "Displaying 1 of 1 total results." in table, table
    row = [line for line in table.splitlines() if line.startswith("│") and "alpha" in line]
    assert len(row) == 1 and "dev" in row[0] and "pulumi-python:dynamic:Resource" in row[0]
    assert "pulumi-python" in row[0] and "dynamic" in row[0]  # package and module columns
    assert "Resources displayed are the result of the following Pulumi query:\n" \
        f"project:{project} name:alpha" in table

    def found(*query):
        out = e2e.run("org", "search", "--output", "json", *[
            arg for q in query for arg in ("-q", q)]).stdout
        return json.loads(out) if out.strip() else []

    files = f"project:{project} type:dynamic:Resource"
    assert names(found(files)) == [("dev", "alpha"), ("dev", "beta"), ("prod", "gamma")]
    assert names(found(files, "protected:true")) == [("dev", "alpha")]
    assert names(found(files, "-stack:dev")) == [("prod", "gamma")]
    assert names(found(f"project:{project}", "(name:gamma OR name:beta)")) == [
        ("dev", "beta"), ("prod", "gamma")]
    assert names(found(f"project:{project} custom:false type:Stack")) == [
        ("dev", f"{project}-dev"), ("prod", f"{project}-prod")]
    assert names(found(f"project:{project} modified:>=2020-01-01 name:gamma")) == [
        ("prod", "gamma")]
    assert found(f"project:{project} modified:<2020-01-01") == []
    (alpha,) = found(files, "name:alpha")
    assert alpha["project"] == project and alpha["protected"] is True
    assert alpha["urn"] == (f"urn:pulumi:dev::{project}::pulumi-python:dynamic:Resource::alpha")
    assert alpha["package"] == "pulumi-python" and alpha["module"] == "dynamic"
    assert alpha["id"].endswith("alpha.txt") and alpha["modified"].endswith("Z")

    rows = list(csv.reader(io.StringIO(e2e.run(
        "org", "search", "--output", "csv", "-q", files, "-q", "stack:prod").stdout)))
    assert rows[0] == ["Project", "Stack", "Name", "Type", "Package", "Module", "Modified"]
    assert [r[:3] for r in rows[1:]] == [[project, "prod", "gamma"]]

    e2e.fails("org", "search", "-q", "name:", match=(
        r"querying search failed: .*invalid search query at character 6: name: needs a "
        r"value right after the colon"))

    # The v2 API, as `pulumi insights resource search` calls it (sorted, paged).
    out = json.loads(e2e.run("insights", "resource", "search", "--query", files, "--sort",
                             "name", "--asc", "--page-size", "2", "--output", "json").stdout)
    assert out["total"] == 3 and [r["name"] for r in out["resources"]] == ["alpha", "beta"]
    assert "page=2" in out["pagination"]["next"]
    table = e2e.run("insights", "resource", "search", "--query", files, "--sort", "name",
                    "--page-size", "2").stdout
    assert "Showing 2 of 3 resources." in table and "--page 2 --page-size 2" in table


def test_org_search_shows_a_member_only_readable_stacks(e2e, make_server):
    from conftest import TOKEN
    from test_access import admin, as_user, use_project

    srv = make_server("--auth-token", TOKEN)
    admin(srv, "user", "add", "boss", "--role", "admin")
    admin(srv, "user", "add", "member")
    admin(srv, "team", "create", "devs")
    admin(srv, "team", "add-member", "devs", "member")
    admin(srv, "team", "grant", "devs", "app/*", "read")
    tokens = {u: admin(srv, "token", "create", "--user", u).strip() for u in ("boss", "member")}
    e2e.use_server(srv, token=tokens["boss"])
    for project in ("app", "ops"):
        use_project(e2e, project)
        e2e.up(e2e.stack("prod"), spec(e2e, {f"{project}-file": {"fname": f"{project}.txt"}}))

    def stacks(token):
        as_user(e2e, token)
        out = e2e.run("org", "search", "--output", "json", "-q", "type:pulumi:pulumi:Stack").stdout
        return sorted({(r["project"], r["stack"]) for r in json.loads(out)})

    assert stacks(tokens["boss"]) == [("app", "prod"), ("ops", "prod")]
    assert stacks(tokens["member"]) == [("app", "prod")]
