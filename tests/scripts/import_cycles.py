#!/usr/bin/env python3
"""Lists file-level import cycles of the workspace's crates.

Every `crate::`, `super::` and `self::` path in a file's code (use declarations, grouped use
trees and inline paths; comments, strings and `#[cfg(test)] mod tests` blocks left out) is
resolved to the file that defines the module it names. A cycle is a strongly connected set of
two or more files. Edges between a module and its own submodules (a `mod.rs` re-exporting a
child, a child using its parent's items) are listed apart: a folder is one module, so they are
not counted as cycles unless `--strict` is given.

Usage: tests/scripts/import_cycles.py [--strict] [--edges] [CRATE_SRC ...]
Default crates: rmq-consumer/src rmq-consumer-macros/src tests/src bench/src.
Exit status: 1 when a cycle is found, else 0.
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT = ["rmq-consumer/src", "rmq-consumer-macros/src", "tests/src", "bench/src"]


def strip(code):
    """Blanks comments, string and char literals, and trailing `#[cfg(test)] mod x {}` blocks."""
    out, i, n = [], 0, len(code)
    while i < n:
        c = code[i]
        if code.startswith("//", i):
            j = code.find("\n", i)
            i = n if j < 0 else j
        elif code.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if code.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif code.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', code[i:i + 10]) and (i == 0 or not (code[i - 1].isalnum() or code[i - 1] == "_")):
            m = re.match(r'r(#*)"', code[i:])
            end = '"' + m.group(1)
            j = code.find(end, i + len(m.group(0)))
            i = n if j < 0 else j + len(end)
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and code[i] != '"':
                i += 2 if code[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", code[i:i + 4]) or code.startswith("'\\u{", i):
            j = code.find("'", i + 1)
            i = j + 1
        else:
            out.append(c)
            i += 1
    text = "".join(out)
    m = re.search(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+\w+\s*\{", text)
    if m:
        text = text[: m.start()]
    return text


def module_files(src):
    """Maps each module path (tuple) to its file, for one crate's src directory."""
    files = {}
    for dirpath, _, names in os.walk(src):
        for name in names:
            if not name.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), src)
            parts = rel[:-3].split(os.sep)
            if parts[0] in ("bin", "tests") or "tests" in parts[:-1]:
                continue
            if parts[-1] in ("lib", "main") and len(parts) == 1:
                parts = []
            elif parts[-1] == "mod":
                parts = parts[:-1]
            files[tuple(parts)] = os.path.join(dirpath, name)
    return files


def use_paths(text):
    """Yields every path (list of segments) starting with crate/super/self, use trees expanded."""
    ident = r"[A-Za-z_][A-Za-z0-9_]*"
    for m in re.finditer(r"\b(crate|super|self)\s*::", text):
        start = m.start()
        if start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_:"):
            continue
        yield from tree(text, m.start(), ident)


def tree(text, pos, ident):
    """Parses a path or use tree at pos; yields its leaf paths."""
    segs = []
    i = pos
    while True:
        m = re.compile(r"\s*(" + ident + r")\s*").match(text, i)
        if not m:
            m2 = re.compile(r"\s*\{").match(text, i)
            if m2:
                i = m2.end()
                depth_items = split_group(text, i)
                for item_start in depth_items:
                    for sub in tree(text, item_start, ident):
                        yield segs + sub
            else:
                yield segs
            return
        segs.append(m.group(1))
        i = m.end()
        m = re.compile(r"::").match(text, i)
        if not m:
            yield segs
            return
        i = m.end()


def split_group(text, i):
    """Start offsets of the comma-separated items of a `{ ... }` group opened before i."""
    starts, depth, j = [i], 0, i
    while j < len(text):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            if depth == 0:
                break
            depth -= 1
        elif c == "," and depth == 0:
            starts.append(j + 1)
        j += 1
    return [s for s in starts if text[s:j].strip(" \n\t,}")]


def resolve(path, here, files):
    """The module (tuple) a path names, relative to the module `here`."""
    base = list(here)
    segs = list(path)
    if not segs:
        return None
    if segs[0] == "crate":
        base, segs = [], segs[1:]
    else:
        while segs and segs[0] in ("super", "self"):
            if segs[0] == "super":
                base = base[:-1]
            segs = segs[1:]
    best = tuple(base)
    for k in range(1, len(segs) + 1):
        cand = tuple(base + segs[:k])
        if cand in files:
            best = cand
        else:
            break
    return best if best in files else None


def tarjan(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    args = sys.argv[1:]
    strict = "--strict" in args
    show_edges = "--edges" in args
    crates = [a for a in args if not a.startswith("--")] or DEFAULT
    found = 0
    for crate in crates:
        src = os.path.join(ROOT, crate)
        if not os.path.isdir(src):
            continue
        files = module_files(src)
        graph = {}
        for mod, path in files.items():
            with open(path, encoding="utf-8") as f:
                text = strip(f.read())
            deps = set()
            for p in use_paths(text):
                target = resolve(p, mod, files)
                if target is None or target == mod:
                    continue
                nested = target[: len(mod)] == mod or mod[: len(target)] == target
                if nested and not strict:
                    continue
                deps.add(target)
            graph[mod] = deps
        name = lambda m: os.path.relpath(files[m], ROOT)
        if show_edges:
            for mod in sorted(graph):
                for dep in sorted(graph[mod]):
                    print(f"{name(mod)} -> {name(dep)}")
        for comp in tarjan(graph):
            if len(comp) > 1:
                found += 1
                print(f"cycle ({crate}): " + " <-> ".join(name(m) for m in comp))
    if not found:
        print("no import cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
