"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) via pycocoevalcap, results JSON, Karpathy split.

    python evaluate.py --results results.json --annotations captions_val2014.json [--json] [--show-examples 5]
    python evaluate.py --models models [--baseline DIR] [--split karpathy-test]
    python evaluate.py --models models/flickr8k --data flickr8k --split karpathy-test
    python evaluate.py --models models/mine --captions captions.txt --images Images --split test

Scores a COCO results file against a COCO captions file, or captions an evaluation split (the dataset's val or
test, or Karpathy's val/test) with a trained model (and a baseline) and scores that; prints a table or
JSON, the best and worst images by CIDEr and example captions. The files are read and checked here; the
scoring is metrics.py's `score_captions`: the numbers coco-caption's `COCOEvalCap.evaluate()` prints, minus
SPICE, with METEOR left out and a pure-Python PTB tokenizer when there is no `java`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from caption import caption_image_files, check_writable, write_results
from caption_sources import (
    CaptionFileError,
    caption_splits,
    is_caption_record,
    read_json,
    references_from_coco,
)
from config import add_captioning_options, non_negative_int
from data_loader import DATA_ROOTS, EVAL_SPLITS, caption_data, split_files
from metrics import METRICS, check_results, metrics_only, score_captions
from model import DecoderRNN, EncoderCNN, WeightsFileError, load_pretrained
from vocabulary import Vocabulary, VocabularyError


def load_results(path: str | Path) -> list[dict]:
    """Captions in COCO results format `[{"image_id": int, "caption": str}, ...]`, checked for shape."""
    data = read_json(path)
    if not isinstance(data, list):
        raise CaptionFileError(
            f'{path}: expected a JSON list of {{"image_id": int, "caption": str}}, '
            f"got a {type(data).__name__}"
        )
    for index, item in enumerate(data):
        if not is_caption_record(item):
            raise CaptionFileError(
                f'{path}: item {index} is not {{"image_id": int, "caption": str}}: {item!r:.80}'
            )
    return [{"image_id": item["image_id"], "caption": item["caption"]} for item in data]


# ---- Results and scores: one caption per image, tables, best and worst ----


def first_caption_per_image(results: list[dict]) -> tuple[list[dict], int]:
    """Results with only the first caption of each image id, and how many captions were dropped."""
    seen, kept = set(), []
    for result in results:
        if result["image_id"] not in seen:
            seen.add(result["image_id"])
            kept.append(result)
    return kept, len(results) - len(kept)


def format_table(scores: dict) -> str:
    """The computed metrics as a two-column text table (metrics that were not computed are left out)."""
    rows = [f"{metric:<8} {scores[metric]:.4f}" for metric in METRICS if metric in scores]
    return "\n".join(["metric   score", *rows])


def best_and_worst(
    scores: dict, results: list[dict], references: dict[int, list[str]], count: int
) -> dict[str, list[dict]]:
    """The `count` highest and lowest CIDEr images: {best, worst: [{image_id, CIDEr, caption, reference}]}."""
    caption = {result["image_id"]: result["caption"] for result in results}
    ranked = sorted(scores["per_image"].items(), key=lambda item: item[1]["CIDEr"], reverse=True)

    def example(image_id: int, image_scores: dict) -> dict:
        return {
            "image_id": image_id,
            "CIDEr": image_scores["CIDEr"],
            "caption": caption[image_id],
            "reference": references[image_id][0],
        }

    return {
        "best": [example(*item) for item in ranked[:count]],
        "worst": [example(*item) for item in ranked[::-1][:count]],
    }


def format_examples(examples: dict[str, list[dict]]) -> str:
    """Best and worst examples as text: image id, CIDEr, the candidate and one reference."""
    lines = []
    for title, group in examples.items():
        lines.append(f"{title} by CIDEr:")
        for ex in group:
            lines.append(f"  {ex['image_id']:>12}  CIDEr {ex['CIDEr']:7.3f}  {ex['caption']}")
            lines.append(f"  {'':>12}  {'reference':<13}  {ex['reference']}")
    return "\n".join(lines)


# ---- Captioning a split with a model ----

def evaluate_model(
    encoder: EncoderCNN,
    decoder: DecoderRNN,
    vocab: Vocabulary,
    split: str = "val",
    beam: int = 3,
    data: str = "coco",
    root: str | Path | None = None,
    batch_size: int = 64,
    max_len: int = 20,
    use_java: bool | None = None,
    per_image: bool = False,
    num_workers: int = 0,
    captions: str | Path | None = None,
    images: str | Path | None = None,
) -> dict:
    """Caption every image of a split (of `data`, or of a caption file and its image folder) once, batched, and
    score it.

    Returns {'scores': metrics (+ 'per_image' when asked), 'results': COCO results list, 'references': by image
    id, 'unreadable': number of image files that could not be read and were left out}.
    """
    image_ids, files, references = split_files(split, data, root, captions, images)
    captions = caption_image_files(
        encoder, decoder, vocab, files, beam_size=beam, batch_size=batch_size, max_len=max_len,
        num_workers=num_workers,
    )
    results = [
        {"image_id": image_id, "caption": caption}
        for image_id, caption in zip(image_ids, captions, strict=True)
        if caption is not None
    ]
    scores = score_captions(results, references, use_java=use_java, per_image=per_image)
    return {
        "scores": scores,
        "results": results,
        "references": references,
        "unreadable": len(image_ids) - len(results),
    }


def latest_weights(folder: str | Path) -> tuple[Path, Path, Path]:
    """The encoder-N.pkl / decoder-N.pkl of the highest epoch N in a folder, and its vocab.pkl."""
    folder = Path(folder)
    epochs = sorted(
        int(m.group(1)) for p in folder.glob("encoder-*.pkl") if (m := re.fullmatch(r"encoder-(\d+)\.pkl", p.name))
    )
    if not epochs:
        raise CaptionFileError(f"{folder}: no encoder-N.pkl files (train first: python train.py --out-dir {folder})")
    n = epochs[-1]
    return folder / f"encoder-{n}.pkl", folder / f"decoder-{n}.pkl", folder / "vocab.pkl"


def format_comparison(columns: dict[str, dict]) -> str:
    """Metrics of several models side by side, one column per model."""
    names = list(columns)
    rows = [f"{'metric':<8} " + " ".join(f"{name:>12}" for name in names)]
    for metric in METRICS:
        if all(metric in scores for scores in columns.values()):
            rows.append(f"{metric:<8} " + " ".join(f"{columns[name][metric]:>12.4f}" for name in names))
    return "\n".join(rows)


def format_captions(results: list[dict], references: dict[int, list[str]], count: int, **others: list[dict]) -> str:
    """The first `count` images' generated captions (and those of other models) next to their references."""
    other_captions = {name: {r["image_id"]: r["caption"] for r in rs} for name, rs in others.items()}
    lines = []
    for result in results[:count]:
        image_id = result["image_id"]
        lines.append(f"image {image_id}")
        lines.append(f"  {'model':<10} {result['caption']}")
        for name, captions in other_captions.items():
            lines.append(f"  {name:<10} {captions.get(image_id, '(none)')}")
        lines += [f"  {'reference':<10} {ref}" for ref in references[image_id]]
    return "\n".join(lines)


# ---- Command line ----


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scored = parser.add_argument_group("score a results file")
    scored.add_argument("--results", help='COCO results JSON: [{"image_id": int, "caption": str}]')
    scored.add_argument("--annotations", help="COCO captions JSON, e.g. captions_val2014.json")
    _add_model_options(parser)
    _add_output_options(parser)
    return parser.parse_args(argv)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options of `evaluate_main`, in a group of their own: which model (and baseline), which split, how."""
    model = parser.add_argument_group("caption a split with a model, then score it")
    model.add_argument("--encoder", help="encoder-N.pkl")
    model.add_argument("--decoder", help="decoder-N.pkl")
    model.add_argument("--vocab", help="vocab.pkl the model was trained with")
    model.add_argument(
        "--models",
        metavar="DIR",
        help="use the latest encoder-N/decoder-N.pkl and vocab.pkl in DIR (instead of --encoder/--decoder/--vocab)",
    )
    model.add_argument("--baseline", metavar="DIR", help="also evaluate the latest model in DIR and compare")
    model.add_argument("--data", choices=sorted(DATA_ROOTS), default=os.environ.get("CAPTION_DATA", "coco"),
                       help="dataset (default: $CAPTION_DATA, else coco)")
    model.add_argument("--root", help="dataset root (default data/DATA: data/coco, data/sample, data/flickr8k, ...)")
    model.add_argument("--captions", metavar="FILE", help="evaluate on any caption file instead of --data (COCO "
                       "JSON, Karpathy dataset_*.json, captions.txt, Flickr8k.token.txt); with --images DIR")
    model.add_argument("--images", metavar="DIR", help="the image folder of --captions")
    model.add_argument("--split", choices=EVAL_SPLITS, default="val", help=(
        "val or test of the dataset; karpathy-val / karpathy-test: Karpathy's (COCO, or a dataset_*.json)"))
    add_captioning_options(model)
    model.add_argument("--save-results", metavar="PATH", help="write the model's captions as COCO results JSON")
    model.add_argument(
        "--examples", type=non_negative_int, default=0, metavar="N", help="print N images' captions and references"
    )


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """The options of both ways to run: output format, repeated image ids, examples, Java."""
    parser.add_argument("--json", action="store_true", help="print the scores as JSON instead of a table")
    parser.add_argument(
        "--first-caption-per-image",
        action="store_true",
        help="score the first caption of an image id that has several (default: error)",
    )
    parser.add_argument(
        "--show-examples",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="also show the N best and N worst images by CIDEr",
    )
    parser.add_argument(
        "--no-java",
        action="store_true",
        help="tokenize in Python and skip METEOR even when java is available",
    )


def _use_java(args: argparse.Namespace) -> bool | None:
    """`score_captions`' use_java for the options: False with --no-java, else None (Java if it is on PATH)."""
    return False if args.no_java else None


def _examples(
    args: argparse.Namespace, scores: dict, results: list[dict], references: dict[int, list[str]]
) -> dict[str, list[dict]] | None:
    """The --show-examples N best and N worst images by CIDEr (`best_and_worst`), or None without the option."""
    if args.show_examples <= 0:
        return None
    return best_and_worst(scores, results, references, args.show_examples)


def _json_report(report: dict, examples: dict[str, list[dict]] | None) -> str:
    """The --json output: the report, and the examples when there are any."""
    return json.dumps({**report, "examples": examples} if examples else report, indent=2)


def main(argv: list[str] | None = None) -> int:
    """Score a results file against COCO references; exit code 2 on bad input."""
    args = parse_args(argv)
    if args.results is None:
        return evaluate_main(args)
    if args.annotations is None:
        print("error: --results needs --annotations (the COCO captions file to score against)", file=sys.stderr)
        return 2
    try:
        results, references = _read_scored_files(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"scoring {len(results)} images (of {len(references)} with references in {args.annotations})",
        file=sys.stderr,
    )
    scores = score_captions(results, references, use_java=_use_java(args), per_image=args.show_examples > 0)
    examples = _examples(args, scores, results, references)
    metrics = metrics_only(scores)
    if args.json:
        print(_json_report(metrics, examples))
    else:
        print(format_table(metrics))
        if examples:
            print(format_examples(examples))
    return 0


def _read_scored_files(args: argparse.Namespace) -> tuple[list[dict], dict[int, list[str]]]:
    """The --results captions (first per image with --first-caption-per-image) and the --annotations references,
    checked against each other; ValueError (CaptionFileError) names the file that is wrong."""
    references = references_from_coco(args.annotations)
    results = load_results(args.results)
    if args.first_caption_per_image:
        results, dropped = first_caption_per_image(results)
        if dropped:
            print(
                f"warning: {args.results}: dropped {dropped} extra captions of repeated image ids, "
                "kept the first of each",
                file=sys.stderr,
            )
    check_results(results, references, str(args.results), str(args.annotations))
    return results, references


def evaluate_main(args: argparse.Namespace) -> int:
    """`evaluate.py --encoder/--decoder/--vocab` or `--models DIR`: caption a split, score, compare with a baseline."""
    try:
        evaluations = _evaluate_models(args)
    except (ValueError, OSError, VocabularyError, WeightsFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _warn_unreadable(evaluations)
    model = evaluations["model"]
    examples = _examples(args, model["scores"], model["results"], model["references"])
    if args.json:
        print(_json_report(_evaluations_report(evaluations), examples))
    else:
        _print_evaluations(evaluations, examples, args.examples)
    if args.save_results:  # after the scores are printed: a failed write loses nothing
        try:
            write_results(model["results"], args.save_results)
        except OSError as e:
            print(f"error: {args.save_results}: cannot write ({e.strerror or e})", file=sys.stderr)
            return 2
    return 0


def _model_weights(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """The model's encoder, decoder and vocab files: from --models DIR, or --encoder, --decoder and --vocab."""
    if args.models and (args.encoder or args.decoder or args.vocab):
        raise CaptionFileError(
            "--models DIR takes the weights and vocab.pkl from DIR: give either it or --encoder, --decoder "
            "and --vocab"
        )
    if args.models:
        return latest_weights(args.models)
    if args.encoder and args.decoder and args.vocab:
        return (Path(args.encoder), Path(args.decoder), Path(args.vocab))
    raise CaptionFileError("give --results and --annotations, or --encoder, --decoder and --vocab, or --models DIR")


def _evaluate_models(args: argparse.Namespace) -> dict[str, dict]:
    """`evaluate_model` of the model and of the --baseline, by name; both are found before the first one loads."""
    weights = _model_weights(args)
    if args.save_results:
        check_writable(args.save_results)
    runs = {"model": weights}
    if args.baseline:
        runs["baseline"] = latest_weights(args.baseline)
    if (args.captions is None) != (args.images is None):
        raise CaptionFileError("--captions FILE and --images DIR go together: the caption file and its image folder")
    splits = caption_splits(args.captions, args.images) if args.captions else caption_data(args.data, args.root)
    if splits is not None:
        print(splits.summary, file=sys.stderr)
    evaluations = {}
    for name, (encoder_path, decoder_path, vocab_path) in runs.items():
        encoder, decoder, vocab = load_pretrained(encoder_path, decoder_path, vocab_path, device=args.device)
        print(f"{name}: {encoder_path.name}, {decoder_path.name}, beam {args.beam}, {args.split} split", file=sys.stderr)
        evaluations[name] = evaluate_model(
            encoder, decoder, vocab, args.split, beam=args.beam, data=args.data, root=args.root,
            batch_size=args.batch_size, max_len=args.max_len, use_java=_use_java(args),
            per_image=args.show_examples > 0, num_workers=args.num_workers, captions=args.captions, images=args.images,
        )
    return evaluations


def _warn_unreadable(evaluations: dict[str, dict]) -> None:
    """A warning on stderr for each evaluation that left out images it could not read."""
    for name, ev in evaluations.items():
        if ev["unreadable"]:
            print(
                f"warning: {name}: {ev['unreadable']} of {len(ev['results']) + ev['unreadable']} images could not "
                "be read and were left out of the scores",
                file=sys.stderr,
            )


def _evaluations_report(evaluations: dict[str, dict]) -> dict[str, dict]:
    """The --json report of `evaluate_main`: each model's metrics, images scored and images unreadable."""
    return {
        name: {**metrics_only(ev["scores"]), "images": len(ev["results"]), "unreadable": ev["unreadable"]}
        for name, ev in evaluations.items()
    }


def _print_evaluations(evaluations: dict[str, dict], examples: dict[str, list[dict]] | None, count: int) -> None:
    """The text output of `evaluate_main`: the scores (side by side with a baseline), image counts, examples and
    the first `count` images' captions."""
    metrics = {name: metrics_only(ev["scores"]) for name, ev in evaluations.items()}
    print(format_comparison(metrics) if len(metrics) > 1 else format_table(metrics["model"]))
    for name, ev in evaluations.items():
        print(f"{name}: {len(ev['results'])} images scored, {ev['unreadable']} unreadable (left out)")
    if examples:
        print(format_examples(examples))
    if count:
        model = evaluations["model"]
        others = {name: ev["results"] for name, ev in evaluations.items() if name != "model"}
        print(format_captions(model["results"], model["references"], count, **others))


if __name__ == "__main__":
    sys.exit(main())
