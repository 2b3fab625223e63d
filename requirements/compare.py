"""Print the packages whose versions differ between two pip requirement lists (a lock and a `pip freeze`).

Used by `make test-latest` to show what an upgrade would change before its test result."""
import re
import sys


def pins(path: str) -> dict[str, str]:
    out = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return out


if __name__ == "__main__":
    old, new = pins(sys.argv[1]), pins(sys.argv[2])
    changed = [(k, old.get(k, "-"), new.get(k, "-")) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    print(f"{len(changed)} package(s) differ from {sys.argv[1]}:")
    for name, a, b in changed:
        print(f"  {name}: {a} -> {b}")
