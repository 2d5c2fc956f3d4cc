"""The web demo: drop an image into a browser page, get its captions (and an attention decoder's maps).

    python app.py --models models/sample [--epoch N] [--host 127.0.0.1] [--port 7860] [--device auto]
    make serve   # the same on the sample model, trained first when it is missing

The model loads once, at start. Every caption comes from `caption.caption_images`, the function behind
caption.py's captions: Gradio's queue hands the requests waiting together (up to MAX_BATCH) to one call, which
decodes them in one batch per beam size among them. The page shows the beam-search caption, the greedy one, the
best beams with their log-probabilities and, for an attention decoder, where it looked for each word
(`caption.attention_figure`). The API endpoint `/caption` returns the same as JSON:
`gradio_client.Client(url).predict(handle_file(path), api_name="/caption")`.

Uploads: at most MAX_UPLOAD bytes (Gradio refuses larger ones) and MAX_PIXELS pixels (refused here, from the
file's header, before decoding). A file that is no image, or cannot be decoded, gets a one-line message naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
from PIL import Image

import caption
from config import positive_int
from evaluate import latest_weights
from image_io import UnreadableImage, load_image, resize_side
from model import AttentionDecoder, DecoderRNN, EncoderCNN, GridEncoder, load_pretrained
from sample_data import make_sample_dataset
from vocabulary import Vocabulary

MAX_UPLOAD = "10mb"  # Gradio's max_file_size
MAX_PIXELS = 40_000_000  # width x height of an upload, checked before it is decoded
MAX_BATCH = 8  # requests captioned in one call
MAX_BEAM = 10
MAX_LEN = 20  # as caption.py's --max-len default
N_EXAMPLES = 4


class Model(NamedTuple):
    """A loaded captioner, and the line the page describes it with."""

    encoder: EncoderCNN | GridEncoder
    decoder: DecoderRNN | AttentionDecoder
    vocab: Vocabulary
    description: str


def load_model(folder: str | Path, epoch: int | None = None, device: str = "auto") -> Model:
    """The newest encoder-N.pkl / decoder-N.pkl in `folder` (epoch N's with `epoch`) and its vocab.pkl; a
    ValueError naming the file (one line) when they cannot be loaded."""
    folder = Path(folder)
    if epoch is None:
        encoder_path, decoder_path, vocab_path = latest_weights(folder)
    else:
        encoder_path, decoder_path, vocab_path = (folder / f"encoder-{epoch}.pkl", folder / f"decoder-{epoch}.pkl",
                                                  folder / "vocab.pkl")
    encoder, decoder, vocab = load_pretrained(encoder_path, decoder_path, vocab_path, device)
    kind = "attention decoder" if isinstance(decoder, AttentionDecoder) else "LSTM decoder"
    description = (f"{encoder_path.parent}, epoch {encoder_path.stem.removeprefix('encoder-')}: {kind}, "
                   f"{encoder.image_size} px crops, {len(vocab)} words, on {next(encoder.parameters()).device}")
    return Model(encoder, decoder, vocab, description)


def example_images(folder: str | Path | None, scratch: Path) -> list[Path]:
    """The first N_EXAMPLES images in `folder`, or, without one, N_EXAMPLES sample-set images generated into
    `scratch`; ValueError when `folder` has no images."""
    if folder is None:
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
            make_sample_dataset(scratch / "examples", n_train=0, n_val=N_EXAMPLES, n_test=0)
        folder = scratch / "examples" / "images" / "val"
    paths, errors = caption.find_images([folder])
    if errors:
        raise ValueError(f"--examples: {errors[0]}")
    return paths[:N_EXAMPLES]


def read_upload(upload: dict[str, Any], image_size: int) -> Image.Image:
    """An uploaded file (Gradio's file data: its path and original name) as RGB, decoded as caption.py decodes
    files; UnreadableImage, naming the upload, when it is no image, cannot be decoded or has too many pixels."""
    path = upload["path"]
    name = upload.get("orig_name") or Path(path).name
    width = height = 0
    # the header only; when it cannot be read, load_image says why
    with contextlib.suppress(OSError, ValueError, Image.DecompressionBombError), Image.open(path) as header:
        width, height = header.size
    if width * height > MAX_PIXELS:
        raise UnreadableImage(name, f"{width}x{height} pixels, more than the {MAX_PIXELS // 10**6} megapixels "
                                    "this demo takes")
    try:
        return load_image(path, resize_side(image_size))
    except UnreadableImage as e:
        raise UnreadableImage(name, str(e).removeprefix(f"{path}: ")) from None


def beam_width(value: Any) -> int:
    """A beam size from the page or an API call, as an int in 1..MAX_BEAM (the default 3 when it is no number)."""
    try:
        return min(max(round(float(value)), 1), MAX_BEAM)
    except (TypeError, ValueError, OverflowError):
        return 3


def caption_uploads(model: Model, uploads: Sequence[dict | None], beams: Sequence[Any]
                    ) -> list[caption.ImageCaptions | str | None]:
    """Per upload its captions, the message of an upload that cannot be read (str), or None for no upload;
    one `caption.caption_images` call per beam size among them."""
    results: list[caption.ImageCaptions | str | None] = [None] * len(uploads)
    images: dict[int, Image.Image] = {}
    for i, upload in enumerate(uploads):
        try:
            if upload is not None:
                images[i] = read_upload(upload, model.encoder.image_size)
        except UnreadableImage as e:
            results[i] = str(e)
    widths = [beam_width(beam) for beam in beams]
    for width in sorted({widths[i] for i in images}):
        group = [i for i in images if widths[i] == width]
        found = caption.caption_images(model.encoder, model.decoder, model.vocab, [images[i] for i in group],
                                       width, max_len=MAX_LEN)
        for i, captions in zip(group, found, strict=True):
            results[i] = captions
    return results


def clear_outputs() -> tuple[str, str, list, None]:
    """The page's outputs, empty: what shows while a new image is checked and captioned."""
    return "", "", [], None


def check_upload(model: Model, upload: dict | None) -> None:
    """The page's first step: gr.Error with the one-line reason when the upload cannot be captioned, so that it
    never reaches (and fails) a batch of other requests."""
    if upload is not None:
        try:
            read_upload(upload, model.encoder.image_size)
        except UnreadableImage as e:
            raise gr.Error(str(e), print_exception=False) from None


def attention_image(model: Model, path: str, beam: int) -> Image.Image:
    """An attention decoder's map of one image, word by word (caption.attention_figure), as a picture."""
    figure = caption.attention_figure(model.encoder, model.decoder, model.vocab, path, beam, MAX_LEN)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return Image.open(buffer)


def caption_page(model: Model, uploads: list[dict | None], beams: list[Any]) -> tuple[list, list, list, list]:
    """The page's batched step: per request the beam caption, the greedy one, the beams table and, for an
    attention decoder, the attention map."""
    outputs: tuple[list, list, list, list] = ([], [], [], [])
    for upload, beam, result in zip(uploads, beams, caption_uploads(model, uploads, beams), strict=True):
        if isinstance(result, caption.ImageCaptions):
            table = [[text, round(score, 3)] for text, score in result.beams]
            attention = (attention_image(model, upload["path"], beam_width(beam))
                         if isinstance(model.decoder, AttentionDecoder) else None)
            row = (result.caption, result.greedy, table, attention)
        else:  # no image, or one that became unreadable after check_upload
            row = (f"error: {result}" if result else "", "", [], None)
        for column, value in zip(outputs, row, strict=True):
            column.append(value)
    return outputs


def caption_api(model: Model, uploads: list[dict | None], beams: list[Any]) -> tuple[list[dict]]:
    """The `/caption` endpoint, batched: per request {"caption", "greedy", "beams": [{"caption", "log_prob"}]},
    or {"error": message} for an upload that cannot be read (which leaves the other requests of its batch be)."""
    replies = []
    for result in caption_uploads(model, uploads, beams):
        if isinstance(result, caption.ImageCaptions):
            beams_json = [{"caption": text, "log_prob": score} for text, score in result.beams]
            replies.append({"caption": result.caption, "greedy": result.greedy, "beams": beams_json})
        else:
            replies.append({"error": result or "no image given"})
    return (replies,)


def build_app(model: Model, beam: int = 3, examples: Sequence[Path] = ()) -> gr.Blocks:
    """The page: image input, beam-size slider, examples; the captions, the beams and the attention maps."""
    batched = {"batch": True, "max_batch_size": MAX_BATCH, "preprocess": False}  # our own decoding, see read_upload
    with gr.Blocks(title="Image captioner", analytics_enabled=False) as demo:
        gr.Markdown(f"## Image captioner\n{model.description}. Drop, paste or pick an image (at most "
                    f"{MAX_UPLOAD[:-2]} MB and {MAX_PIXELS // 10**6} megapixels).")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="Image", height=320)
                beam_size = gr.Slider(1, MAX_BEAM, value=beam, step=1, label="Beam size")
                button = gr.Button("Caption", variant="primary")
                if examples:
                    gr.Examples([[str(path)] for path in examples], inputs=[image], label="Examples")
            with gr.Column():
                beam_caption = gr.Textbox(label="Beam-search caption", elem_id="beam-caption")
                greedy_caption = gr.Textbox(label="Greedy caption", elem_id="greedy-caption")
                table = gr.Dataframe(headers=["beam", "log-probability"], datatype=["str", "number"],
                                     interactive=False, label="Top beams", elem_id="beams")
                with gr.Column(visible=isinstance(model.decoder, AttentionDecoder)):
                    gr.Markdown("Attention, word by word: bright where the decoder looked")
                    attention = gr.Image(show_label=False, interactive=False, buttons=[])
        api_trigger = gr.Button(visible=False)  # never shown: the API endpoint's own event
        api_reply = gr.JSON(visible=False)
        outputs = [beam_caption, greedy_caption, table, attention]
        private = {"queue": True, "api_visibility": "private", "concurrency_limit": None}
        cleared = gr.on([image.change, button.click], clear_outputs, outputs=outputs, **private)
        checked = cleared.then(functools.partial(check_upload, model), inputs=[image], preprocess=False, **private)
        checked.success(functools.partial(caption_page, model), inputs=[image, beam_size], outputs=outputs,
                        api_visibility="private", **batched)
        api_trigger.click(functools.partial(caption_api, model), inputs=[image, beam_size], outputs=[api_reply],
                          api_name="caption", **batched)
    return demo


def serve(demo: gr.Blocks, host: str, port: int, allowed: Sequence[Path] = (), block: bool = True) -> str:
    """Launch the page (queue on, upload limit set, nothing sent anywhere else); its local URL."""
    demo.queue(default_concurrency_limit=1)  # one captioning call at a time; waiting requests form its batch
    demo.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD, allowed_paths=[str(p) for p in allowed],
                prevent_thread_lock=not block, footer_links=["api"], share=False)
    return demo.local_url


def port_number(text: str) -> int:
    """A TCP port, 1-65535 (argparse type)."""
    port = positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked before the model loads (argparse exits with code 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="models/sample", help="folder with encoder-N.pkl, decoder-N.pkl and "
                        "vocab.pkl, either decoder kind (default %(default)s)")
    parser.add_argument("--epoch", type=positive_int, help="use encoder-N.pkl / decoder-N.pkl (default: newest N)")
    parser.add_argument("--device", default="auto", help="auto (GPU if there is one), cpu, cuda, cuda:N, mps")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=port_number, default=7860, help="port (default %(default)s)")
    parser.add_argument("--beam", type=positive_int, default=3, choices=range(1, MAX_BEAM + 1), metavar="N",
                        help=f"the beam-size slider's start, 1-{MAX_BEAM} (default %(default)s)")
    parser.add_argument("--examples", metavar="DIR", help=f"the first {N_EXAMPLES} images here are the page's "
                        "examples (default: generated sample-set images)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, load the model once, build the page, serve it until interrupted; the exit code."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="caption-demo-") as scratch:
        try:
            model = load_model(args.models, args.epoch, args.device)
            examples = example_images(args.examples, Path(scratch))
        except ValueError as e:  # no weights, a bad file or device (WeightsFileError, VocabularyError, ...)
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"loaded {model.description}", file=sys.stderr)
        demo = build_app(model, args.beam, examples)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it as Ctrl-C does, tidily
        try:
            serve(demo, args.host, args.port, allowed=[path.parent for path in examples])
        except OSError as e:  # the port is taken, the address is not this machine's
            print(f"error: cannot serve on {args.host}:{args.port} ({e})", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
