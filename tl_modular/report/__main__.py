"""Re-render ``report.html`` from a report directory's JSON files (after editing or copying them).

    python -m tl_modular.report DIR                 # a directory written by `tl-modular analyze`
    python -m tl_modular.report DIFF_DIR A B        # a directory written by `tl-modular diff A B --out DIFF_DIR`
"""

from __future__ import annotations

import sys
from pathlib import Path

from tl_modular.report.html import render, render_diff


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 3) or args[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out = Path(args[0])
    if not out.is_dir():
        print(f"python -m tl_modular.report: {out} is not a directory (give a report directory)", file=sys.stderr)
        return 2
    if len(args) == 3:
        path = render_diff(out, args[1], args[2])
    elif (out / "diff.json").exists() and not (out / "graph.json").exists():
        print(f"python -m tl_modular.report: {out} holds a diff: give the two report directories it compares too "
              f"(python -m tl_modular.report {out} A B)", file=sys.stderr)
        return 2
    else:
        path = render(None, out)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
