"""Make docs/img/report.png: a real tree search's lineage report, shot in headless Chromium.

    python scripts/report_screenshot.py [--out docs/img/report.png] [--keep DIR]

Runs ``branchagent tree`` (copy backend, no isolation) on a throwaway workspace
with a small bug to fix, writes its ``--report`` and screenshots it with
``chromium --headless --screenshot``. Needs Debian's ``chromium`` (``make setup``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A function with a bug, and a test that scores how much of it works.
SOURCE = "def area(w, h):\n    return w + h\n"
CHECK = ("python3 -c 'import area; s = (area.area(2, 3) == 6) + (area.area(0, 5) == 0)"
         " + (area.area(4, 4) == 16); print(s / 3, file=open(3, \"w\", closefd=False)) or "
         "exit(s != 3)' 3>&3")
EXPAND = (
    'case "$BRANCHAGENT_DEPTH" in '
    "0) echo \"sed -i 's/w + h/w * h/' area.py\"; "
    "   echo \"sed -i 's/w + h/w - h/' area.py\";; "
    "1) echo \"sed -i '1i # area of a w x h rectangle' area.py\";; esac"
)
ROOTS = [
    "echo '# TODO: fix area' >> area.py",
    "sed -i 's/def area/def area_/' area.py",
    "exit 3",
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.fspath(ROOT / "docs" / "img" / "report.png"))
    p.add_argument("--keep", metavar="DIR", help="also keep the trace and report here")
    args = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("report_screenshot: chromium is not installed (apt-get install -y chromium)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ba-report-") as tmp:
        ws = Path(tmp) / "ws"
        ws.mkdir()
        (ws / "area.py").write_text(SOURCE)
        page = Path(tmp) / "report.html"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [os.fspath(ROOT / "src"), os.fspath(ROOT / "strategies"),
             os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "branchagent.cli", "-w", os.fspath(ws), "--backend",
               "copy", "-q", "--json", "tree", "--no-isolate", "--report", os.fspath(page),
               "--expand", EXPAND, "--evaluate", CHECK, "--max-depth", "2",
               "--max-parallel", "3"]
        for root in ROOTS:
            cmd += ["-c", root]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if r.returncode not in (0, 1) or not page.exists():
            print(f"report_screenshot: the run failed ({r.returncode}):\n{r.stderr}",
                  file=sys.stderr)
            return 1
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(page, Path(args.keep) / "report.html")
            (Path(args.keep) / "trace.json").write_text(r.stdout)
        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        shot = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp}/profile", "--window-size=1200,900",
             f"--screenshot={out}", page.as_uri()],
            capture_output=True, text=True, check=False, timeout=120)
        if shot.returncode != 0 or not out.exists():
            print(f"report_screenshot: chromium failed:\n{shot.stderr[-2000:]}", file=sys.stderr)
            return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
