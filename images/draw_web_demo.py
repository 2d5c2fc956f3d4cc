"""Draw images/web-demo.png: app.py's page in headless Chromium, after it captioned one of its example images.

    python images/draw_web_demo.py [--models models/sample] [--example 1] [--out images/web-demo.png]

Needs a trained model (`make serve` and `make demo` train models/sample) and Debian's chromium and chromium-driver
(`make browser`); the browser is the one the tests drive (tests/browser.py).
"""

import argparse
import io
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import browser  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import app  # noqa: E402


def screenshot(url: str, example: int, height: int) -> Image.Image:
    """The page at `url` once the example's caption shows, as a PIL image `height` px high (window)."""
    with browser.chromium() as driver:
        driver.set_window_size(1280, height)
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "button.gallery-item"))
        driver.find_elements(By.CSS_SELECTOR, "button.gallery-item")[example].click()
        box = driver.find_element(By.CSS_SELECTOR, "#beam-caption textarea")
        WebDriverWait(driver, 60).until(lambda d: box.get_attribute("value"))
        return Image.open(io.BytesIO(driver.get_screenshot_as_png()))


def main(argv: list[str] | None = None) -> int:
    """Serve the page on a free loopback port, photograph it, write the PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="models/sample")
    parser.add_argument("--example", type=int, default=1, help="which example image to caption (from 0)")
    parser.add_argument("--out", default="images/web-demo.png")
    parser.add_argument("--height", type=int, default=900, help="window height in px (default %(default)s)")
    args = parser.parse_args(argv)
    reason = browser.missing()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    model = app.load_model(args.models)
    with tempfile.TemporaryDirectory() as scratch:
        examples = app.example_images(None, Path(scratch))
        demo = app.build_app(model, 3, examples)
        try:
            url = app.serve(demo, "127.0.0.1", browser.free_port(), [examples[0].parent], block=False)
            page = screenshot(url, args.example, args.height)
        finally:
            demo.close()
    page.convert("RGB").save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
