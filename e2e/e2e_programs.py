"""Pulumi programs and a dynamic provider for the end-to-end tests.

A program is described by a JSON-able spec so that the same program can run
inline in the pytest process or, for the cancel and concurrency scenarios, in a
separate process (``python e2e_programs.py SPEC.json``):

    {"dir": "/tmp/x",                 # where the file resources live
     "files": {"a": {"content": "1", "secret": false, "fname": "a.txt",
                     "sleep": 0, "fail": false, "protect": false}},
     "components": 3,                 # component resources (no provider)
     "outputs": {"k": "v"}, "secret_outputs": {"s": "v"},
     "refs": {"out": ["organization/proj/stack", "key"]},
     "holder": {"child": "b", "renamed_from": "a"}}   # a component with one file

``holder`` registers component ``holder`` with one ``FileResource`` child;
with ``renamed_from`` the component carries a state migration (journal version
2 on a Pulumi Cloud backend) that renames the child's prior state, so the
renamed child is the same resource, neither created nor deleted.

``FileResource`` is a Python dynamic resource that writes one small file, so a
test can create drift by editing the file and ``refresh`` notices it. The
provider class lives in this importable module (not in a test file) because the
provider runs in a separate ``pulumi-resource-pulumi-python`` process that
unpickles it by reference: the harness puts this folder on PYTHONPATH.
"""

import json
import os
import sys
import time

import pulumi
from pulumi import dynamic

FAIL_MESSAGE = "e2e provider failure requested"


class FileProvider(dynamic.ResourceProvider):
    """One file ``dir/fname`` whose text is ``content``."""

    def _write(self, props):
        path = os.path.join(props["dir"], props["fname"])
        if props.get("sleep"):
            open(path + ".started", "w").close()  # tests wait for this
            time.sleep(float(props["sleep"]))
        if props.get("fail"):
            raise Exception(FAIL_MESSAGE)
        with open(path, "w", encoding="utf-8") as f:
            f.write(props["content"])
        return {**props, "path": path}

    def create(self, props):
        outs = self._write(props)
        return dynamic.CreateResult(id_=outs["path"], outs=outs)

    def update(self, _id, _olds, news):
        return dynamic.UpdateResult(outs=self._write(news))

    def diff(self, _id, olds, news):
        keys = ("dir", "fname", "content", "sleep", "fail")
        changed = [k for k in keys if olds.get(k) != news.get(k)]
        replaces = [k for k in changed if k in ("dir", "fname")]
        return dynamic.DiffResult(
            changes=bool(changed), replaces=replaces, delete_before_replace=True
        )

    def read(self, id_, props):
        try:
            with open(id_, encoding="utf-8") as f:
                content = f.read()
        except FileNotFoundError:
            return dynamic.ReadResult(None, {})
        return dynamic.ReadResult(id_, {**props, "content": content})

    def delete(self, id_, _props):
        try:
            os.remove(id_)
        except FileNotFoundError:
            pass


class FileResource(dynamic.Resource):
    path: pulumi.Output[str]
    content: pulumi.Output[str]

    def __init__(self, name, directory, fname, content, sleep=0, fail=False, opts=None):
        props = {"dir": directory, "fname": fname, "content": content,
                 "sleep": sleep, "fail": fail, "path": None}
        super().__init__(FileProvider(), name, props, opts)


def rename_child(old, new):
    """A state migration renaming the component's child ``old`` to ``new``."""

    def migrate(args):
        states = {s["urn"]: s for s in args.old_state}
        renamed = {urn: urn[:-len(old)] + new for urn in states if urn.endswith("::" + old)}
        if not renamed:
            return None  # already migrated: steady state
        new_state = [{**s, "urn": renamed.get(s["urn"], s["urn"])} for s in args.old_state]
        return pulumi.StateMigrationResult(new_state, successors=renamed)

    return migrate


def build(spec):
    """Return the inline program (a no-argument function) for a spec."""

    def program():
        for i in range(spec.get("components", 0)):
            group = pulumi.ComponentResource("e2e:index:Group", f"group-{i}")
            group.register_outputs({})
        for name, f in spec.get("files", {}).items():
            content = f.get("content", name)
            if f.get("secret"):
                content = pulumi.Output.secret(content)
            res = FileResource(
                name, spec["dir"], f.get("fname", name + ".txt"), content,
                sleep=f.get("sleep", 0), fail=f.get("fail", False),
                opts=pulumi.ResourceOptions(protect=f.get("protect", False)))
            pulumi.export(f"path-{name}", res.path)
        holder = spec.get("holder")
        if holder:
            migrations = ([rename_child(holder["renamed_from"], holder["child"])]
                          if holder.get("renamed_from") else None)
            comp = pulumi.ComponentResource(
                "e2e:index:Holder", "holder", opts=pulumi.ResourceOptions(
                    state_migrations=migrations))
            FileResource(holder["child"], spec["dir"], "child.txt", "child",
                         opts=pulumi.ResourceOptions(parent=comp))
            comp.register_outputs({})
        for key, value in spec.get("outputs", {}).items():
            pulumi.export(key, value)
        for key, value in spec.get("secret_outputs", {}).items():
            pulumi.export(key, pulumi.Output.secret(value))
        refs = {}
        for key, (stack, out) in spec.get("refs", {}).items():
            if stack not in refs:
                refs[stack] = pulumi.StackReference(stack)
            pulumi.export(key, refs[stack].get_output(out))

    return program


def main(argv):
    """Run one operation on a stack in this process; used as a child process.

    argv[1] is a JSON file: {"op": "up", "stack": ..., "project": ...,
    "work_dir": ..., "cli_root": ..., "env": {...}, "spec": {...}}.
    Exits 0 on success; on failure prints the CLI's stderr and exits 1.
    """
    from pulumi import automation as auto

    with open(argv[1], encoding="utf-8") as f:
        job = json.load(f)
    opts = auto.LocalWorkspaceOptions(
        work_dir=job["work_dir"], env_vars=job["env"],
        pulumi_home=job["env"]["PULUMI_HOME"],
        pulumi_command=auto.PulumiCommand(root=job["cli_root"]),
    )
    stack = auto.select_stack(job["stack"], job["project"], build(job["spec"]), opts=opts)
    try:
        result = getattr(stack, job["op"])()
    except auto.errors.CommandError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result.summary.resource_changes))
    return 0


if __name__ == "__main__":
    # Re-import by module name so that the provider pickles as
    # e2e_programs.FileProvider, exactly as in the pytest process.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import e2e_programs

    sys.exit(e2e_programs.main(sys.argv))
