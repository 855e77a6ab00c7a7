"""The README's picture of the report: ``report.html`` opened in headless Chromium, a channel selected.

    tl-modular analyze --out tl_modular_report
    python tools/report_screenshot.py tl_modular_report docs/report.png [--unit L0.H0] [--category induction]

Opens the page from ``file://``, selects ``--unit`` (default: the first channel of the largest
module), toggles ``--category`` (default: none) and saves a PNG of the window. Needs Chromium
(``apt-get install chromium``). Fails if the page logged an error or requested anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tl_modular.report.browser import Browser


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("report", type=Path, help="a report directory (with report.html)")
    parser.add_argument("png", type=Path)
    parser.add_argument("--unit", default=None)
    parser.add_argument("--category", action="append", default=[])
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=820)
    args = parser.parse_args()
    page = (args.report / "report.html").resolve()
    modules = json.loads((args.report / "modules.json").read_text())["modules"]
    unit = args.unit or (modules[0][0] if modules else "L0.H0")
    with tempfile.TemporaryDirectory() as profile, Browser(None, Path(profile), width=args.width,
                                                           height=args.height) as b:
        b.open(page.as_uri())
        if b.js("document.body.dataset.ready") != "true":
            print("the page did not start:", b.console_errors(), file=sys.stderr)
            return 1
        for category in args.category:
            b.click(f'#graph-categories input[data-category={json.dumps(category)}]')
        b.click(f".node[data-id={json.dumps(unit)}]")
        b.js("window.scrollTo(0, 0)")
        b.screenshot(args.png)
        problems = b.console_errors() + [u for u in b.requests() if u != page.as_uri()]
    if problems:
        print("the page logged or requested:", problems, file=sys.stderr)
        return 1
    print("wrote", args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
