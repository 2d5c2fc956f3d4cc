"""app.py, the web demo: served on a free loopback port, driven in headless Chromium and through gradio_client.

The captions on the page and from the `/caption` endpoint must be caption.py's for the same file and beam size.
Without Chromium the browser tests skip, except in CI (CI=true), where they fail: `make test` installs it.
"""

import os
from pathlib import Path

import browser
import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import app
import caption
import train
from config import TrainConfig
from image_io import load_image, resize_side
from sample_data import make_sample_dataset

BEAM = 2  # the slider's start in these tests
WAIT_S = 60  # for the page and a caption on a busy 2-core machine

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:::gradio.queueing")]  # Gradio's own use of pandas


def tiny_config(root: Path, out: Path, **overrides) -> TrainConfig:
    """Two quick epochs on a tiny generated sample set, at 64 px."""
    settings = dict(data="sample", data_root=str(root / "sample"), image_size=64, embed_size=16, hidden_size=32,
                    epochs=2, batch_size=32, num_workers=0, extract_batch_size=50,
                    cache_dir=str(root / "features"), out_dir=str(out), checkpoint_minutes=0)
    return TrainConfig(**(settings | overrides))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """An LSTM and an attention model trained briefly on 40 generated sample-set images."""
    root = tmp_path_factory.mktemp("app")
    make_sample_dataset(root / "sample", n_train=40, n_val=4, n_test=0)
    train.train(tiny_config(root, root / "lstm"))
    train.train(tiny_config(root, root / "attention", decoder="attention", grid=2, attention_size=16))
    return {"lstm": root / "lstm", "attention": root / "attention", "root": root}


@pytest.fixture(scope="module")
def offline_gradio():
    """No telemetry from Gradio's server or client (the client's own switch does not turn it off)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        patch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield


@pytest.fixture(scope="module")
def server(models, offline_gradio):
    """app.py's page on the LSTM model, launched in this process on a free loopback port."""
    model = app.load_model(models["lstm"])
    examples = app.example_images(None, models["root"])
    demo = app.build_app(model, BEAM, examples)
    url = app.serve(demo, "127.0.0.1", browser.free_port(), allowed=[examples[0].parent], block=False)
    yield {"url": url, "model": model, "examples": examples}
    demo.close()


@pytest.fixture(scope="module")
def page(server):
    """Headless Chromium with the demo page loaded."""
    reason = browser.missing()
    if reason:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"the browser tests must run in CI: {reason}")
        pytest.skip(reason)
    with browser.chromium() as driver:
        driver.get(server["url"])
        WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=file]"))
        yield driver


def shapes_image(path: Path) -> Path:
    """A PNG the sample set could have: a red circle and a blue square on grey."""
    image = Image.new("RGB", (96, 80), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 20, 40, 50), fill=(220, 30, 30))
    draw.rectangle((55, 25, 85, 55), fill=(30, 60, 220))
    image.save(path)
    return path


def reference(model: app.Model, path: Path, beam: int) -> str:
    """caption.py's caption of one file."""
    return caption.caption_image_files(model.encoder, model.decoder, model.vocab, [path], beam)[0]


def upload(driver, path: Path) -> None:
    driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(path))


def shown(driver, element_id: str) -> str:
    """The text in a textbox of the page."""
    return driver.find_element(By.CSS_SELECTOR, f"#{element_id} textarea").get_attribute("value")


def wait_for_caption(driver, expected: str | None = None) -> str:
    """The beam-search caption once it shows (once it is `expected`, when given)."""
    return WebDriverWait(driver, WAIT_S).until(
        lambda d: (caption := shown(d, "beam-caption")) and (expected is None or caption == expected) and caption)


def test_the_page_shows_caption_py_s_captions_for_an_upload_and_an_example(page, server, tmp_path):
    model, image = server["model"], shapes_image(tmp_path / "shapes.png")
    upload(page, image)
    assert wait_for_caption(page) == reference(model, image, BEAM)
    assert shown(page, "greedy-caption") == reference(model, image, 1)
    table = page.find_element(By.ID, "beams").text
    assert reference(model, image, BEAM) in table and "log-probability" in table

    page.find_element(By.CSS_SELECTOR, "button.gallery-item").click()  # the first example replaces the upload
    wait_for_caption(page, reference(model, server["examples"][0], BEAM))
    assert browser.foreign_requests(page, "127.0.0.1") == []  # no CDN, fonts or analytics: it works offline


def test_a_file_that_is_no_image_gets_a_message_naming_it(page, tmp_path):
    fake = tmp_path / "holiday.png"  # named like an image, so the page's own file-type check lets it through
    fake.write_text("these are notes, not pixels\n")
    upload(page, fake)
    toast = WebDriverWait(page, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]"))
    assert toast[0].text == "holiday.png: not an image file (cannot identify its format)"
    assert shown(page, "beam-caption") == ""  # the last image's captions are gone


def test_the_caption_endpoint_answers_gradio_client_with_json(server, tmp_path):
    from gradio_client import Client, handle_file

    model, image = server["model"], shapes_image(tmp_path / "shapes.png")
    client = Client(server["url"], verbose=False, download_files=False)
    reply = client.predict(handle_file(str(image)), api_name="/caption")
    assert reply["caption"] == reference(model, image, BEAM) == reply["beams"][0]["caption"]
    assert reply["greedy"] == reference(model, image, 1)
    scores = [beam["log_prob"] for beam in reply["beams"]]
    assert len(scores) == BEAM and scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
    wide = client.predict(handle_file(str(image)), 4, api_name="/caption")
    assert wide["caption"] == reference(model, image, 4) and len(wide["beams"]) == 4

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    assert client.predict(handle_file(str(notes)), api_name="/caption") == {
        "error": "notes.txt: not an image file (cannot identify its format)"}
    big = tmp_path / "big.jpg"
    big.write_bytes(np.random.default_rng(0).bytes(11 * 2**20))  # over the 10 MB limit
    with pytest.raises(ValueError, match="exceeds the maximum file size of 10485760 bytes"):
        client.predict(handle_file(str(big)), api_name="/caption")  # the client reads the limit from the app
    with big.open("rb") as f:  # and the server refuses it by itself
        assert httpx.post(f"{server['url']}gradio_api/upload", files={"files": f}).status_code == 413


def test_a_batch_is_captioned_per_beam_size_and_one_bad_upload_leaves_the_others(server, tmp_path):
    model, image = server["model"], shapes_image(tmp_path / "shapes.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated" * 10)
    uploads = [{"path": str(image)}, {"path": str(tmp_path / "broken.jpg"), "orig_name": "broken.jpg"},
               {"path": str(image)}, None]
    (replies,) = app.caption_api(model, uploads, [1, 3, 3, 3])
    assert replies[0]["caption"] == reference(model, image, 1) and len(replies[0]["beams"]) == 1
    assert replies[1]["error"].startswith("broken.jpg: ") and replies[3] == {"error": "no image given"}
    assert replies[2]["caption"] == reference(model, image, 3) and len(replies[2]["beams"]) == 3


def test_caption_images_gives_caption_py_s_captions_for_loaded_images(server, tmp_path):
    model, paths = server["model"], [shapes_image(tmp_path / "shapes.png"), *server["examples"][:2]]
    images = [load_image(path, resize_side(model.encoder.image_size)) for path in paths]
    for beam in (1, 3):
        found = caption.caption_images(model.encoder, model.decoder, model.vocab, images, beam)
        files = caption.caption_image_files(model.encoder, model.decoder, model.vocab, paths, beam)
        assert [c.caption for c in found] == files and all(len(c.beams) == beam for c in found)
        assert all([s for _, s in c.beams] == sorted((s for _, s in c.beams), reverse=True) for c in found)
    assert [c.greedy for c in found] == caption.caption_image_files(model.encoder, model.decoder, model.vocab, paths)
    top = caption.caption_images(model.encoder, model.decoder, model.vocab, images[:1], 3, top_n=2)[0]
    assert [text for text, _ in top.beams] == [text for text, _ in found[0].beams[:2]]  # scores: batch rounding
    assert caption.caption_images(model.encoder, model.decoder, model.vocab, [], 3) == []


def test_an_upload_with_too_many_pixels_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (8000, 6000)).save(path)  # 48 megapixels in a small file
    with pytest.raises(app.UnreadableImage, match=r"^huge.png: 8000x6000 pixels, more than the 40 megapixels"):
        app.read_upload({"path": str(path), "orig_name": "huge.png"}, 64)


def test_an_attention_model_shows_where_it_looked_for_each_word(models, tmp_path):
    model = app.load_model(models["attention"])
    assert "attention decoder" in model.description and "epoch 2" in model.description
    image = shapes_image(tmp_path / "shapes.png")
    captions, greedy, tables, maps = app.caption_page(model, [{"path": str(image)}], [BEAM])
    assert captions == [reference(model, image, BEAM)] and greedy == [reference(model, image, 1)]
    assert len(tables[0]) == BEAM
    words, _ = caption.caption_with_attention(model.encoder, model.decoder, model.vocab, image, BEAM)
    assert isinstance(maps[0], Image.Image) and maps[0].width > 200 and len(words) >= 1


def test_the_command_line_refuses_a_folder_without_weights_in_one_line(tmp_path, capsys):
    assert app.main(["--models", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path}: no encoder-N.pkl files (train first: python train.py --out-dir {tmp_path})\n"
    assert app.main(["--models", str(tmp_path), "--epoch", "3"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
