#!/usr/bin/env python3
"""Fails if the top-level modules of a workspace crate import each other in a circle.

    scripts/check-module-cycles.py            # every crate of the workspace
    scripts/check-module-cycles.py server     # one crate

A module's imports are the `crate::name` paths in its code (`use crate::x::...`,
`use crate::{x::..., y}`, `crate::x::f()`), comments, doc comments and `#[cfg(test)]` tails
excluded: tests may reach anywhere, and doc links are not dependencies. Run from .ci/run.
"""

import os
import re
import sys

CRATES = ["engine", "scheduler", "cli", "server", "bench"]


def code_of(text):
    text = text.split("#[cfg(test)]\nmod tests")[0]
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(l for l in text.split("\n") if not l.strip().startswith("//"))


def imports(code):
    names = set(re.findall(r"\bcrate::(\w+)", code))
    for group in re.findall(r"\bcrate::\{([^;]*?)\};", code, flags=re.S):
        depth, start = 0, 0
        for i, ch in enumerate(group + ","):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                item = group[start:i].strip()
                start = i + 1
                m = re.match(r"(\w+)", item)
                if m and m.group(1) != "self":
                    names.add(m.group(1))
    return names


def graph(src):
    g = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, f), src)[:-3].split(os.sep)
            top = rel[0]
            if top in ("lib", "main"):
                continue
            with open(os.path.join(root, f)) as fh:
                deps = imports(code_of(fh.read()))
            g.setdefault(top, set()).update(d for d in deps if d != top)
    return g


def cycles(g):
    out, state = [], {}

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if m not in g:
                continue
            if state.get(m) == 1:
                out.append(stack[stack.index(m):] + [m])
            elif not state.get(m):
                visit(m, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if not state.get(n):
            visit(n, [])
    return out


def main():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    failed = False
    for crate in sys.argv[1:] or CRATES:
        found = cycles(graph(os.path.join(here, crate, "src")))
        for c in found:
            print(f"{crate}: import circle: {' -> '.join(c)}")
        failed |= bool(found)
    if not failed:
        print(f"no import circle in {', '.join(sys.argv[1:] or CRATES)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
