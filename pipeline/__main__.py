"""The `mergemix-pipeline` command (and `python -m pipeline`): refuses, in one line, an environment
where another distribution also provides one of our import names, before importing the CLI,
whose imports would otherwise fail with an unrelated error."""
from __future__ import annotations

import sys

from pipeline.distribution import shadowing


def main() -> None:
    problem = shadowing()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    from pipeline.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
