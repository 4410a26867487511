"""The ``cnclip serve`` page in a real headless browser: Debian's ``chromium`` driven by selenium through
``chromedriver``. It types a Chinese query and sees results, searches by an uploaded image, uploads a scene
and sees boxes with Chinese labels, moves the threshold slider with the keyboard, and saves screenshots
that must not be blank. The browser may resolve and reach 127.0.0.1 only.

No browser is installed or skipped silently: without chromium / chromedriver the test fails with the
install hint (``make install`` installs them with apt-get).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnclip_vision.serve import BackgroundServer, ServeConfig, Service, create_app
from cnclip_vision.serve.demo import build_demo

INSTALL_HINT = (
    "install the browser: apt-get update && apt-get install -y chromium chromium-driver fonts-noto-cjk "
    "(or `make install`); or point CNCLIP_CHROMIUM / CNCLIP_CHROMEDRIVER at a Chromium and its driver"
)
TIMEOUT = 30


def _find(env: str, names: tuple[str, ...]) -> str | None:
    if os.environ.get(env):
        return os.environ[env] if Path(os.environ[env]).is_file() else None
    return next((path for path in map(shutil.which, names) if path), None)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("serve-browser"), per_class=1, scenes=4, seed=3)


@pytest.fixture(scope="module")
def service(world):
    return Service.load(ServeConfig(index=str(world.index), model="toy-tiny", detector="toy-detector"))


@pytest.fixture(scope="module")
def server(service):
    with BackgroundServer(create_app(service)) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    chromium = _find("CNCLIP_CHROMIUM", ("chromium", "chromium-browser", "google-chrome"))
    driver_path = _find("CNCLIP_CHROMEDRIVER", ("chromedriver",))
    if chromium is None or driver_path is None:
        pytest.fail(f"no {'chromium' if chromium is None else 'chromedriver'} found: {INSTALL_HINT}", pytrace=False)
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must never download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        "--lang=zh-CN",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=DriverService(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, TIMEOUT, poll_frequency=0.05).until(condition, message=f"timed out waiting for {what}")


def _css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _loaded_images(driver, selector: str) -> int:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].filter(i => i.complete && i.naturalWidth > 0).length",
        selector,
    )


def keep_screenshot(path: Path) -> None:
    """With CNCLIP_SCREENSHOT_DIR set (e.g. docs/), keep a copy: the README's pictures come from here."""
    target = os.environ.get("CNCLIP_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / f"serve-{path.name}")


def assert_not_blank(path: Path) -> None:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    assert pixels.shape[0] >= 600 and pixels.shape[1] >= 1000
    assert pixels.std() > 20, f"{path} looks blank (std {pixels.std():.1f})"
    colours = len(np.unique(pixels.reshape(-1, 3).astype(np.uint8), axis=0))
    assert colours > 200, f"{path} has only {colours} colours"


# The canvas renders the same characters in the page's font: real glyphs differ from each other, while a
# missing font draws the same empty box ("tofu") for every character.
_GLYPHS = """
const font = getComputedStyle(document.body).fontFamily;
return arguments[0].map(ch => {
  const c = document.createElement("canvas"); c.width = 48; c.height = 48;
  const g = c.getContext("2d"); g.font = "40px " + font; g.fillText(ch, 2, 40);
  return c.toDataURL();
});
"""


def _assert_tags_apart(d) -> None:
    """The tags of the visible boxes: inside the picture and none covering another (as the browser lays them out)."""
    stage, rects = d.execute_script(
        "const r = (e) => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };"
        "return [r(document.querySelector('#detect-boxes')),"
        " [...document.querySelectorAll('#detect-boxes .box:not(.hidden) .tag')].map(r)];"
    )
    assert len(rects) >= 2, f"too few tags to check placement: {rects}"
    eps = 0.5
    for x1, y1, x2, y2 in rects:
        assert stage[0] - eps <= x1 and x2 <= stage[2] + eps and stage[1] - eps <= y1 and y2 <= stage[3] + eps
    for i, a in enumerate(rects):
        for b in rects[i + 1 :]:
            apart = a[2] <= b[0] + eps or b[2] <= a[0] + eps or a[3] <= b[1] + eps or b[3] <= a[1] + eps
            assert apart, f"tags overlap: {a} and {b}"


def test_page_in_a_real_browser(browser, server, world, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(server.url + "/")
    assert d.title == "cnclip 视觉服务"
    status = d.find_element(By.ID, "status")
    _wait(d, lambda _: "toy-tiny" in status.text, "the status line")
    assert "索引" in status.text and str(len(world.labels) + len(world.scenes["images"])) in status.text
    assert not d.find_element(By.ID, "key-form").is_displayed()  # no key on this server

    red, green, blue, private = d.execute_script(_GLYPHS, ["红", "绿", "蓝", "\ue000"])
    assert len({red, green, blue}) == 3 and private not in (red, green), f"Chinese text is not rendered: {INSTALL_HINT}"

    # --- text search, from the keyboard: the query box has focus on load; Enter searches
    query = d.find_element(By.ID, "query")
    assert d.switch_to.active_element == query
    label = world.labels[0]  # 红色圆形
    query.send_keys(label, Keys.ENTER)
    _wait(d, lambda _: _loaded_images(d, "#search-results img") >= 8, "result thumbnails")
    cards = _css(d, "#search-results .card")
    assert len(cards) == 24  # the default k of the page
    assert cards[0].find_element(By.CSS_SELECTOR, ".id").text.startswith("test/000/")  # the red circle first
    assert cards[0].find_element(By.CSS_SELECTOR, ".rank").text == "#1"
    assert label in d.find_element(By.ID, "search-msg").text
    shot = tmp_path / "search.png"
    d.save_screenshot(str(shot))
    assert_not_blank(shot)
    keep_screenshot(shot)

    # --- keyboard: '/' returns to the query box; arrow keys move between the tabs
    d.find_element(By.TAG_NAME, "body").click()
    d.find_element(By.TAG_NAME, "body").send_keys("/")
    assert d.switch_to.active_element == query
    tab = d.find_element(By.ID, "tab-search")
    tab.send_keys(Keys.ARROW_RIGHT)
    assert d.find_element(By.ID, "tab-image").get_attribute("aria-selected") == "true"
    assert d.switch_to.active_element == d.find_element(By.ID, "tab-image")
    assert (
        d.find_element(By.ID, "panel-image").is_displayed() and not d.find_element(By.ID, "panel-search").is_displayed()
    )

    # --- image → image: upload an indexed image, it comes back first
    target = world.images / "test" / "007" / "000000.png"
    d.find_element(By.ID, "image-file").send_keys(str(target))
    _wait(d, lambda _: _loaded_images(d, "#image-results img") >= 4, "image search results")
    first = _css(d, "#image-results .card .id")[0].text
    assert first == "test/007/000000.png"

    # --- detection: upload a scene, type its labels, see boxes with Chinese labels, move the slider
    d.find_element(By.ID, "tab-image").send_keys(Keys.ARROW_RIGHT)
    assert d.find_element(By.ID, "panel-detect").is_displayed()
    scene = world.scenes["images"][0]
    names = {c["id"]: c["name"] for c in world.scenes["categories"]}
    present = list(
        dict.fromkeys(names[a["category_id"]] for a in world.scenes["annotations"] if a["image_id"] == scene["id"])
    )
    d.find_element(By.ID, "detect-file").send_keys(str(world.scene_path(scene)))
    labels = d.find_element(By.ID, "detect-labels")
    labels.clear()
    labels.send_keys("，".join(present), Keys.ENTER)  # Enter submits the form
    _wait(d, lambda _: len(_css(d, "#detect-boxes .box")) > 0, "detection boxes")
    _wait(d, lambda _: _loaded_images(d, "#detect-image") == 1, "the detection picture")
    boxes = _css(d, "#detect-boxes .box")
    tags = [b.find_element(By.CSS_SELECTOR, ".tag").get_attribute("textContent") for b in boxes]
    assert all(t.rsplit(" ", 1)[0] in present for t in tags), tags
    assert {t.rsplit(" ", 1)[0] for t in tags} & set(present)
    scores = [float(b.get_attribute("data-score")) for b in boxes]
    visible = lambda: sum(b.is_displayed() for b in _css(d, "#detect-boxes .box"))  # noqa: E731
    slider = d.find_element(By.ID, "threshold")
    assert visible() == sum(s >= float(slider.get_attribute("value")) for s in scores) > 0
    assert d.find_element(By.CSS_SELECTOR, "#detect-table tbody tr").is_displayed()
    _assert_tags_apart(d)
    shot = tmp_path / "detect.png"
    d.save_screenshot(str(shot))
    assert_not_blank(shot)
    keep_screenshot(shot)

    slider.send_keys(Keys.END)  # threshold 1.00: only perfect scores stay
    assert d.find_element(By.ID, "threshold-value").text == "1.00"
    assert visible() == sum(s >= 1.0 for s in scores)
    slider.send_keys(Keys.HOME)  # 0.05: everything the server sent
    assert d.find_element(By.ID, "threshold-value").text == "0.05"
    assert visible() == len(boxes)
    assert f"显示 {len(boxes)} / {len(boxes)} 个目标" == d.find_element(By.ID, "detect-count").text
    _assert_tags_apart(d)

    # --- an upload that is not an image: a Chinese error message, and the page keeps working
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is not a picture")
    d.find_element(By.ID, "tab-image").click()
    d.find_element(By.ID, "image-file").send_keys(str(bad))
    message = d.find_element(By.ID, "image-msg")
    _wait(d, lambda _: "不是图片" in message.text, "the error message")
    assert "error" in message.get_attribute("class")
    logs = [e for e in d.get_log("browser") if e["level"] == "SEVERE" and "415" not in e["message"]]
    assert not logs, logs


def test_page_with_an_api_key(browser, service, world):
    """A server with a key: the page asks for it, keeps asking while it is wrong, then loads thumbnails with it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    key = "browser-key-31415926"
    locked = Service(ServeConfig(index=str(world.index), model="toy-tiny", api_key=key), service.model, service.index)
    with BackgroundServer(create_app(locked)) as srv:
        d = browser
        d.get(srv.url + "/")
        d.execute_script("sessionStorage.clear()")
        d.get(srv.url + "/")
        form = d.find_element(By.ID, "key-form")
        _wait(d, lambda _: form.is_displayed(), "the API key form")
        status = d.find_element(By.ID, "status")
        _wait(d, lambda _: "API 密钥" in status.text, "the status line asking for the key")
        field = d.find_element(By.ID, "api-key")
        assert d.switch_to.active_element == field
        field.send_keys("wrong-key-00000000", Keys.ENTER)
        _wait(d, lambda _: form.is_displayed() and "API 密钥" in status.text, "the form again")
        field.clear()
        field.send_keys(key, Keys.ENTER)
        _wait(d, lambda _: "toy-tiny" in status.text, "the status line")
        assert not form.is_displayed()
        query = d.find_element(By.ID, "query")
        query.clear()
        query.send_keys(world.labels[9], Keys.ENTER)
        _wait(d, lambda _: _loaded_images(d, "#search-results img") >= 8, "thumbnails fetched with the key")
        sources = [img.get_attribute("src") for img in _css(d, "#search-results img")[:8]]
        assert all(src.startswith("blob:") for src in sources)  # fetched with the X-API-Key header
        assert _css(d, "#search-results .card .id")[0].text.startswith("test/009/")
