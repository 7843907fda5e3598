#!/usr/bin/env python
"""Open a report page in a real headless browser and check that it renders.

    python analysis/render_report.py analysis/results/research_protocol/report.html [--screenshot shot.png]
        [--browser chromium]

Loads the page with networking disabled (the page must be self-contained), reads back the DOM the
browser built after the ``load`` event and checks that every ``<img>`` decoded (the page's
``data-images-loaded`` equals ``data-images-total``), then takes a screenshot and checks that it is
not blank. Prints ``images_loaded=<n> images_total=<n> screenshot_ink=<f>`` and exits 0 when all
images decoded and the screenshot shows content, 1 otherwise, 2 when no browser is found (install
one: ``apt-get install chromium``) or an argument is wrong (no such page; a ``--screenshot`` that is not a
``.png`` in an existing folder).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pti_plugin.script_args import argument_parser  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser(name: str | None) -> str | None:
    for candidate in ([name] if name else BROWSERS):
        path = shutil.which(candidate)
        if path:
            return path
    return None


def browser_command(browser: str, profile: str) -> list[str]:
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
            "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--virtual-time-budget=5000"]


def images_loaded(browser: str, page: Path) -> tuple[int, int]:
    """(decoded images, images) after the page's load event, from the browser's DOM dump."""
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([*browser_command(browser, profile), "--dump-dom", page.resolve().as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    return (int(loaded.group(1)) if loaded else 0), (int(total.group(1)) if total else -1)


def screenshot_ink(browser: str, page: Path, shot: Path) -> float:
    """Take a 1200x2400 screenshot into ``shot`` (a ``.png`` in an existing folder); the fraction of its pixels
    that are not near-white (0 when the browser wrote no image: ``shot`` is then left as it was).

    The browser writes a new temporary file beside ``shot``, which replaces ``shot`` only once it holds an image:
    an earlier screenshot, or whatever file ``shot`` names, is never read as this one."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    handle, name = tempfile.mkstemp(prefix=f".{shot.stem}.", suffix=".png", dir=shot.resolve().parent)
    os.close(handle)
    temporary = Path(name)
    try:
        temporary.unlink()  # the browser's own file, or none when it wrote nothing
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([*browser_command(browser, profile), f"--screenshot={temporary}", "--window-size=1200,2400",
                            page.resolve().as_uri()], capture_output=True, timeout=120)
        if not temporary.is_file():
            return 0.0
        try:
            with Image.open(temporary) as image:
                pixels = np.asarray(image.convert("L"))
        except (UnidentifiedImageError, OSError):
            return 0.0
        os.replace(temporary, shot)
        return float((pixels < 240).mean())
    finally:
        temporary.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path, help="the report page (.html) to open")
    parser.add_argument("--screenshot", type=Path, default=None,
                        help="a .png where to keep the screenshot (default: taken in a temporary folder, not kept)")
    parser.add_argument("--browser", default=None, help=f"browser executable (default: the first of {', '.join(BROWSERS)})")
    args = parser.parse_args(argv)
    if not args.page.is_file():
        parser.error(f"{args.page}: no such page" if not args.page.exists() else f"{args.page}: not a file")
    if args.screenshot is not None:
        shot = args.screenshot
        if shot.suffix.lower() != ".png":
            parser.error(f"--screenshot {shot}: must be a .png file (the browser writes PNG)")
        if shot.is_dir():
            parser.error(f"--screenshot {shot}: is a folder; name a .png file")
        if shot.resolve() == args.page.resolve():
            parser.error(f"--screenshot {shot}: is the page itself")
        if not shot.resolve().parent.is_dir():
            parser.error(f"--screenshot {shot}: its folder {shot.parent} does not exist")
    browser = find_browser(args.browser)
    if browser is None:
        print(f"error: no headless browser found ({args.browser or ', '.join(BROWSERS)}); install chromium",
              file=sys.stderr)
        return 2
    loaded, total = images_loaded(browser, args.page)
    with tempfile.TemporaryDirectory() as folder:
        shot = args.screenshot or Path(folder) / "shot.png"
        ink = screenshot_ink(browser, args.page, shot)
    print(f"images_loaded={loaded} images_total={total} screenshot_ink={ink:.3f}")
    if total < 0:
        print(f"error: {browser} gave no page (its DOM dump has no data-images-total): is it a headless Chromium "
              "or Chrome?", file=sys.stderr)
    return 0 if total >= 0 and loaded == total and ink > 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
