#!/usr/bin/env python3
"""The tutorial shows the example's files verbatim: every fenced block introduced by
`<!-- file: NAME -->` must equal sdk/example/NAME byte for byte, and every example file must be
shown. (The example itself is built and run by example_out_of_tree.sh.)

usage: tutorial_matches_example.py TUTORIAL.md EXAMPLE_DIR
"""
import os
import re
import sys


def blocks(markdown):
    pattern = re.compile(r"<!-- file: (\S+) -->\n```[a-z+]*\n(.*?)```\n", re.S)
    return {m.group(1): m.group(2) for m in pattern.finditer(markdown)}


def main(tutorial, example_dir):
    shown = blocks(open(tutorial, encoding="utf-8").read())
    files = sorted(f for f in os.listdir(example_dir) if not f.startswith(".") and f != "README.md")
    failures = []
    for name in files:
        actual = open(os.path.join(example_dir, name), encoding="utf-8").read()
        if name not in shown:
            failures.append(f"{name}: not shown in the tutorial")
        elif shown[name] != actual:
            failures.append(f"{name}: the tutorial's copy differs from sdk/example/{name}")
    for name in sorted(set(shown) - set(files)):
        failures.append(f"{name}: shown in the tutorial but not in sdk/example")
    for f in failures:
        print("FAIL:", f)
    print(f"{len(files) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
