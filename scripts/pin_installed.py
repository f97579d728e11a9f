"""Print constraints pinning everything ``pip install -e ".[test]"`` installs, at the versions installed here.

The set is derived from pyproject.toml: the package's dependencies and its ``test`` extra (with the package's own
extras it names), followed through each installed dependency's requirements and requested extras, markers
evaluated for this machine. Local version labels are dropped (torch ``2.13.0+cpu`` is pinned as ``2.13.0``).
scripts/refresh-constraints.sh runs this in a fresh virtualenv holding the newest releases (Python 3.11 or later:
it reads pyproject.toml with tomllib).
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def project_requirements(extra: str) -> tuple[str, list[Requirement]]:
    """The project's name and its requirements with ``extra``, its self-references (``name[a,b]``) expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = canonicalize_name(project["name"])
    optional = project.get("optional-dependencies", {})
    found: list[Requirement] = [Requirement(r) for r in project.get("dependencies", [])]
    pending, seen = [extra], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for text in optional[current]:
            req = Requirement(text)
            if canonicalize_name(req.name) == name:
                pending.extend(req.extras)
            else:
                found.append(req)
    return name, found


def applies(req: Requirement, extras: set[str]) -> bool:
    return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""})


def installed_closure(roots: list[Requirement]) -> dict[str, str]:
    """``{name: version}`` of every installed distribution the requirements ``roots`` pull in."""
    pins: dict[str, str] = {}
    done: dict[str, set[str]] = {}
    pending = [(req, "pyproject.toml") for req in roots if applies(req, set())]
    while pending:
        req, wanted_by = pending.pop()
        name = canonicalize_name(req.name)
        extras = set(req.extras)
        if name in done and extras <= done[name]:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{req.name} (required by {wanted_by}) is not installed: install the project's test extra "
                     "first (scripts/refresh-constraints.sh does)")
        done[name] = done.get(name, set()) | extras
        pins[name] = Version(dist.version).public
        pending.extend((sub, req.name) for sub in map(Requirement, dist.requires or [])
                       if applies(sub, done[name]))
    return pins


def main() -> None:
    name, roots = project_requirements("test")
    pins = installed_closure(roots)
    pins.pop(name, None)
    pins["pip"] = Version(metadata.version("pip")).public  # the installer .ci/run uses
    print("# Every package `pip install -e \".[test]\"` installs, pinned: scripts/test.sh installs with these.")
    print("# Written by scripts/refresh-constraints.sh (the newest releases pyproject.toml's ranges allow).")
    print(f"# Python {sys.version_info.major}.{sys.version_info.minor}, {sys.platform}.")
    for dist in sorted(pins):
        print(f"{dist}=={pins[dist]}")


if __name__ == "__main__":
    main()
