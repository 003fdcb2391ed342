"""What is installed: this project's distribution, its version, and whether another distribution
in the same environment claims one of its three import names. Standard library only: the
launcher runs it before importing anything else of ours."""
from __future__ import annotations

import re
from importlib import metadata

DISTRIBUTION = "mergemix-pipeline"
IMPORT_NAMES = ("pipeline", "stages", "schemas")  # the top-level packages the wheel installs


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown (not installed: running from a source tree)"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def shadowing() -> str | None:
    """One line naming an import name that another installed distribution also provides (its files
    and ours share one folder, so whichever was installed last wins, and commands fail deep inside),
    or None."""
    owners = metadata.packages_distributions()
    for name in IMPORT_NAMES:
        others = sorted({d for d in owners.get(name, []) if _canonical(d) != DISTRIBUTION})
        if others:
            return (f"the import package {name!r} of {DISTRIBUTION} is also installed by {', '.join(others)} in this "
                    f"environment, and one overwrites the other; install {DISTRIBUTION} in a dedicated virtual "
                    "environment or image")
    return None
