"""metrics.py, evaluate.py: scores equal coco-caption's, Python PTB tokens equal Java's, files, CLI errors."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pycocoevalcap.eval
import pytest
from pycocoevalcap.eval import COCOEvalCap
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocotools.coco import COCO

import evaluate
import metrics
from caption import write_results
from caption_sources import read_captions

REPO = Path(__file__).resolve().parents[1]
needs_java = pytest.mark.skipif(not metrics.java_available(), reason="needs java on PATH")

# 11 images, 5 references each (image 9 has no candidate: results may cover a subset), punctuation throughout.
REFERENCES = {
    391895: [
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside.",
        "A man riding on the back of a motorcycle.",
        "A dirt path with a young person on a motor bike rests to the foreground.",
        "A man in a red shirt and a red hat is on a motorcycle on a hill side.",
    ],
    522418: [
        "A woman wearing a net on her head cutting a cake.",
        "A woman cutting a large white sheet cake.",
        "A woman wearing a hair net cutting a large sheet cake.",
        "there is a woman that is cutting a white cake",
        'A woman marking a cake with the back of a chef\'s knife, "carefully".',
    ],
    184613: [
        "A child holding a flowered umbrella and petting a yak.",
        "A young man holding an umbrella next to a herd of cattle.",
        "a young boy barefoot holding an umbrella touching the horn of a cow",
        "A young boy with an umbrella who is touching the horn of a cow.",
        "A boy holding an umbrella while standing next to livestock.",
    ],
    318219: [
        "A young boy standing in front of a computer keyboard.",
        "a little boy wearing headphones and looking at a computer monitor",
        "He is listening intently to the computer at school.",
        "A young boy stares up at the computer monitor.",
        "a young kid with head phones on using a computer",
    ],
    554625: [
        "a boy wearing headphones using one computer in a long row of computers",
        "A little boy with earphones on listening to something.",
        "A group of people sitting at desk using computers.",
        "Children sitting at computer stations on a long table.",
        "A small child wearing headphones plays on the computer.",
    ],
    397133: [
        "A man is in a kitchen making pizzas.",
        "Man in apron standing on front of oven with pans and bakeware",
        "A baker is working in the kitchen rolling dough.",
        "A person standing by a stove in a kitchen.",
        "A table with pies being made and a person standing near a wall with pots and pans hanging on it.",
    ],
    37777: [
        "The dining table near the kitchen has a bowl of fruit on it.",
        "A small kitchen has various appliances and a table.",
        "The kitchen is clean and ready for us to see.",
        "A kitchen and dining area decorated in white.",
        "A kitchen that has a bowl of fruit on the table.",
    ],
    252219: [
        "A person on a skateboard and bike at a skate park.",
        "A man on a skateboard performs a trick at the skate park",
        "A skateboarder jumps into the air as he performs a skateboard trick.",
        "Athletes performing tricks on a BMX bicycle and a skateboard.",
        "a man falls off his skateboard in a skate park.",
    ],
    87038: [
        "A person above ground on a snowboard, doing a trick.",
        "Snowboarder in mid-air over snow covered hill (at night).",
        "a guy jumping some snow on a snowboard",
        "A snowboarder's jump off a ramp -- high up in the air!",
        "A black-and-white photo of a man's snowboard jump; it's great.",
    ],
    174482: [
        "A bicycle replica with a clock as the front wheel.",
        "The bike has a clock as a tire.",
        "A black metal bicycle with a clock inside the front wheel.",
        "A bicycle figurine in which the front wheel is replaced with a clock",
        "A clock with the appearance of the wheel of a bicycle ",
    ],
    9: [
        "Closeup of bins of food that include broccoli and bread.",
        "A meal is presented in brightly colored plastic trays.",
        "there are containers filled with different kinds of foods",
        "Colorful dishes holding meat, vegetables, fruit, and bread.",
        "A bunch of trays that have different food.",
    ],
}
RESULTS = [  # not in the annotation file's image order, on purpose
    {"image_id": 174482, "caption": "A bicycle with a clock as the front wheel."},
    {"image_id": 391895, "caption": "A man riding a motorcycle on a dirt road."},
    {"image_id": 522418, "caption": "a woman cutting a cake with a knife"},
    {"image_id": 184613, "caption": "A boy (with an umbrella) standing next to a cow."},
    {"image_id": 318219, "caption": "A young boy's looking at a computer, isn't he?"},
    {"image_id": 554625, "caption": "Children sitting at computers on a long table."},
    {"image_id": 397133, "caption": 'A man in a kitchen making "pizza" -- and pies.'},
    {"image_id": 37777, "caption": "A kitchen with a table and a bowl of fruit."},
    {"image_id": 252219, "caption": "zebras grazing in tall grass"},
    {"image_id": 87038, "caption": "A snowboarder's jump: high in the air, mid-air!"},
]
METRIC_KEYS = {
    "BLEU-1": "Bleu_1",
    "BLEU-2": "Bleu_2",
    "BLEU-3": "Bleu_3",
    "BLEU-4": "Bleu_4",
    "METEOR": "METEOR",
    "ROUGE-L": "ROUGE_L",
    "CIDEr": "CIDEr",
}
PUNCTUATED = [
    "A man's dog, running on the beach.",
    "Two people don't like it; they can't stay!",
    "\"Hello\" said the man in 'quotes' here.",
    "A black-and-white photo of a 2-year-old child - nice -- very.",
    "A man (wearing a hat) sits on a bench [left] {ok}.",
    "A plate of food... with 3.5 dollars, $5 and 50% off & more.",
    "He said: \"I'm here, we're there, you've got it, he'll go, she'd go.\"",
    "Mr. Smith at the U.S. embassy at 3 p.m. today.",
    "The dogs' toys and the cat's bowl, it's 5 o'clock; a 10:30 train.",
    "A TRAIN ON TRACKS NEAR A STATION.",
    "two bikes parked at the curb , one is red .",
    "What? Really?! Yes!! A sign reads 'no parking'.",
    "A one-way street's sign w/ a kid's kite... and 1,000 birds.",
    "It's a man's man's world, isn't it? They cannot stop.",
    "   A   cat  sitting on a laptop computer   ",
    "A \u201cfancy\u201d caf\u00e9 sign \u2013 and a man\u2019s dog\u2026",
]


def write_annotations(path: Path, references: dict[int, list[str]]) -> Path:
    """A COCO captions file whose images and annotations are in neither id nor grouped order."""
    images = [
        {"id": image_id, "file_name": f"COCO_val2014_{image_id:012d}.jpg"}
        for image_id in reversed(references)
    ]
    annotations = [
        {"id": 100 * k + n, "image_id": image_id, "caption": captions[k]}
        for k in range(5)
        for n, (image_id, captions) in enumerate(references.items())
    ]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


class NoSpice:
    """SPICE stand-in for COCOEvalCap: the real one downloads Stanford CoreNLP, which cannot work offline."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


@pytest.fixture(scope="module")
def annotations(tmp_path_factory) -> Path:
    return write_annotations(tmp_path_factory.mktemp("coco") / "captions_val2014.json", REFERENCES)


def run_coco_eval_cap(annotations: Path) -> COCOEvalCap:
    """coco-caption's own evaluation of RESULTS, run as its README shows, with SPICE left out."""
    coco = COCO(str(annotations))
    coco_results = coco.loadRes([dict(r) for r in RESULTS])  # loadRes adds 'id' keys
    coco_eval = COCOEvalCap(coco, coco_results)
    coco_eval.params["image_id"] = coco_results.getImgIds()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pycocoevalcap.eval, "Spice", NoSpice)
        coco_eval.evaluate()
    return coco_eval


@pytest.fixture(scope="module")
def java_and_coco_eval_cap(annotations) -> tuple[dict, COCOEvalCap]:
    """Our scores by default (Java on PATH: its tokenizer and METEOR) and COCOEvalCap's, computed side by side
    (a METEOR JVM takes ~10 s to start)."""
    with ThreadPoolExecutor(1) as pool:
        ours = pool.submit(
            metrics.score_captions,
            RESULTS,
            evaluate.references_from_coco(annotations),
            use_java=None,
            per_image=True,
        )
        theirs = run_coco_eval_cap(annotations)
        return ours.result(), theirs


@pytest.fixture(scope="module")
def java_scores(java_and_coco_eval_cap) -> dict:
    return java_and_coco_eval_cap[0]


@pytest.fixture(scope="module")
def coco_eval_cap(java_and_coco_eval_cap) -> COCOEvalCap:
    return java_and_coco_eval_cap[1]


@needs_java
def test_scores_equal_coco_eval_cap(java_scores, coco_eval_cap):
    assert [k for k in java_scores if k != "per_image"] == list(METRIC_KEYS)
    for metric, coco_name in METRIC_KEYS.items():
        assert java_scores[metric] == coco_eval_cap.eval[coco_name], metric
    assert set(java_scores["per_image"]) == {r["image_id"] for r in RESULTS}
    for image_id, image_scores in java_scores["per_image"].items():
        for metric, coco_name in METRIC_KEYS.items():
            assert image_scores[metric] == pytest.approx(
                coco_eval_cap.imgToEval[image_id][coco_name], abs=1e-12
            )
    assert 0 < java_scores["CIDEr"] < 10 and 0 < java_scores["BLEU-4"] < java_scores["BLEU-1"] < 1


@needs_java
def test_python_tokenizer_equals_java_ptb_tokenizer():
    java = PTBTokenizer().tokenize({k: [{"caption": c}] for k, c in enumerate(PUNCTUATED)})
    python = {k: [metrics.ptb_tokenize(c)] for k, c in enumerate(PUNCTUATED)}
    assert python == java
    assert python[0] == ["a man 's dog running on the beach"]
    assert python[4] == ["a man -lrb- wearing a hat -rrb- sits on a bench -lsb- left -rsb- -lcb- ok -rcb-"]


@needs_java
def test_python_path_omits_meteor_and_matches_java_path(java_scores, annotations):
    scores = metrics.score_captions(RESULTS, evaluate.references_from_coco(annotations), use_java=False)
    assert list(scores) == [m for m in metrics.METRICS if m != "METEOR"]
    for metric, value in scores.items():
        assert value == java_scores[metric], metric


def test_scores_only_the_images_in_results(annotations):
    references = evaluate.references_from_coco(annotations)
    one = metrics.score_captions(RESULTS[:1], references, use_java=False, per_image=True)
    assert list(one["per_image"]) == [174482]
    assert one["CIDEr"] == one["per_image"][174482]["CIDEr"]  # the corpus score of one image is its own score


def test_scores_do_not_depend_on_the_order_of_the_results(annotations):
    """Images are scored in the references' order (as COCOEvalCap does), so the float sums, and so the scores,
    are the same bit for bit whatever order the results file lists them in."""
    references = evaluate.references_from_coco(annotations)
    scores = metrics.score_captions(RESULTS, references, use_java=False)
    for order in (RESULTS[::-1], sorted(RESULTS, key=lambda r: r["image_id"]), RESULTS[5:] + RESULTS[:5]):
        assert metrics.score_captions(order, references, use_java=False) == scores


def test_references_follow_annotation_file_order(annotations):
    references = evaluate.references_from_coco(annotations)
    assert list(references) == list(reversed(REFERENCES))
    assert references == REFERENCES


def test_no_java_on_path_skips_meteor_with_a_note(tmp_path, annotations):
    results = tmp_path / "results.json"
    write_results(RESULTS, results)
    env = {**os.environ, "PATH": str(tmp_path / "empty")}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "evaluate.py"),
            "--results",
            str(results),
            "--annotations",
            str(annotations),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "METEOR skipped" in proc.stderr
    scores = json.loads(proc.stdout)
    assert list(scores) == [m for m in metrics.METRICS if m != "METEOR"]


def test_use_java_true_without_java_raises(monkeypatch, annotations):
    monkeypatch.setenv("PATH", "")
    assert not metrics.java_available()
    with pytest.raises(RuntimeError, match="java"):
        metrics.score_captions(RESULTS, evaluate.references_from_coco(annotations), use_java=True)


@needs_java
def test_line_breaks_inside_captions_do_not_shift_java_tokens():
    captions = {1: ["A man\rriding a horse."], 2: ["A dog\r\non a\u2028beach."], 3: ["A cat."]}
    expected = {1: ["a man riding a horse"], 2: ["a dog on a beach"], 3: ["a cat"]}
    assert metrics.tokenize_captions(captions, use_java=True) == expected
    assert metrics.tokenize_captions(captions, use_java=False) == expected


# ---- results files and the command line ----


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = evaluate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_output(tmp_path, annotations, capsys):
    results = tmp_path / "results.json"
    write_results(RESULTS, results)
    code, out, err = run_cli(
        capsys, "--results", results, "--annotations", annotations, "--json", "--no-java"
    )
    assert code == 0
    scores = json.loads(out)
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    assert all(isinstance(v, float) for v in scores.values())
    assert "scoring 10 images (of 11 with references" in err


def test_cli_table_and_examples(tmp_path, annotations, capsys):
    results = tmp_path / "results.json"
    write_results(RESULTS, results)
    code, out, _ = run_cli(
        capsys, "--results", results, "--annotations", annotations, "--no-java", "--show-examples", 2
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["metric", "score"]
    assert [line.split()[0] for line in lines[1:7]] == [
        "BLEU-1",
        "BLEU-2",
        "BLEU-3",
        "BLEU-4",
        "ROUGE-L",
        "CIDEr",
    ]
    assert "METEOR" not in out

    scores = metrics.score_captions(RESULTS, REFERENCES, use_java=False, per_image=True)
    ranked = sorted(scores["per_image"], key=lambda i: scores["per_image"][i]["CIDEr"])
    worst, best = ranked[0], ranked[-1]
    assert worst == 252219  # "zebras grazing in tall grass" for a skate park
    examples = out[out.index("best by CIDEr") :]
    assert examples.index(str(best)) < examples.index("worst by CIDEr") < examples.index(str(worst))
    assert "zebras grazing in tall grass" in examples and REFERENCES[252219][0] in examples


def test_cli_json_with_examples(tmp_path, annotations, capsys):
    results = tmp_path / "results.json"
    write_results(RESULTS, results)
    code, out, _ = run_cli(
        capsys,
        "--results",
        results,
        "--annotations",
        annotations,
        "--no-java",
        "--json",
        "--show-examples",
        3,
    )
    assert code == 0
    examples = json.loads(out)["examples"]
    assert examples["worst"][0]["image_id"] == 252219
    assert examples["worst"][0]["CIDEr"] <= examples["best"][0]["CIDEr"]
    assert set(examples["best"][0]) == {"image_id", "CIDEr", "caption", "reference"}
    scores = metrics.score_captions(RESULTS, REFERENCES, use_java=False, per_image=True)["per_image"]
    ranked = sorted(scores, key=lambda i: scores[i]["CIDEr"])
    assert [e["image_id"] for e in examples["best"]] == ranked[::-1][:3]  # the best first
    assert [e["image_id"] for e in examples["worst"]] == ranked[:3]  # the worst first


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[{'image_id': 1}", "not valid JSON"),
        ('{"image_id": 391895, "caption": "a man"}', "expected a JSON list"),
        ('[{"image_id": 391895}]', "item 0 is not"),
        ('[{"image_id": "391895", "caption": "a man"}]', "item 0 is not"),
        ('[{"image_id": true, "caption": "a man"}]', "item 0 is not"),  # a bool is not an image id
        (
            '[{"image_id": 391895, "caption": "a man"}, {"image_id": 5, "caption": "a cat"}]',
            "1 image ids have no references in",
        ),
        ("[]", "no captions to score"),
        (
            '[{"image_id": 391895, "caption": "a man"}, {"image_id": 391895, "caption": "a dog"}]',
            "1 image ids have several captions",
        ),
    ],
)
def test_cli_bad_results_exit_2_naming_the_file(tmp_path, annotations, capsys, content, message):
    results = tmp_path / "my_results.json"
    results.write_text(content)
    code, out, err = run_cli(capsys, "--results", results, "--annotations", annotations)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {results}: ") and message in err and err.count("\n") == 1


def test_cli_missing_or_bad_annotations(tmp_path, capsys):
    results = tmp_path / "results.json"
    write_results(RESULTS, results)
    code, _, err = run_cli(capsys, "--results", results, "--annotations", tmp_path / "nope.json")
    assert code == 2 and f"{tmp_path / 'nope.json'}: no such file" in err
    (tmp_path / "bad.json").write_text('{"images": []}')
    code, _, err = run_cli(capsys, "--results", results, "--annotations", tmp_path / "bad.json")
    assert code == 2 and "'annotations' list" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": [{"image_id": 391895, "caption": 5}]}')
    code, _, err = run_cli(capsys, "--results", results, "--annotations", bad)
    assert code == 2
    assert err == f"error: {bad}: annotation 0 is not " + '{"image_id": int, "caption": str, ...}\n'


def test_cli_folders_and_binary_files_exit_2_naming_the_file(tmp_path, annotations, capsys):
    results = tmp_path / "results.json"
    write_results(RESULTS, results)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'[{"caption": "caf\xe9"}]')  # Latin-1, not UTF-8
    cases = [
        (tmp_path, annotations, f"error: {tmp_path}: is a directory, expected a JSON file"),
        (results, tmp_path, f"error: {tmp_path}: is a directory, expected a JSON file"),
        (binary, annotations, f"error: {binary}: not UTF-8 text, expected a JSON file"),
        (results, binary, f"error: {binary}: not UTF-8 text, expected a JSON file"),
    ]
    for results_file, annotations_file, message in cases:
        code, out, err = run_cli(capsys, "--results", results_file, "--annotations", annotations_file)
        assert code == 2 and out == "" and err == message + "\n"


def test_first_caption_per_image_keeps_the_first(tmp_path, annotations, capsys):
    results = tmp_path / "results.json"
    doubled = [
        *RESULTS,
        {"image_id": 391895, "caption": "zebras"},
        {"image_id": 9, "caption": "food in trays"},
        {"image_id": 9, "caption": "zebras"},
    ]
    write_results(doubled, results)
    code, out, err = run_cli(
        capsys,
        "--results",
        results,
        "--annotations",
        annotations,
        "--json",
        "--no-java",
        "--first-caption-per-image",
    )
    assert code == 0
    assert f"warning: {results}: dropped 2 extra captions" in err
    kept, dropped = evaluate.first_caption_per_image(doubled)
    assert dropped == 2 and kept == [*RESULTS, {"image_id": 9, "caption": "food in trays"}]
    assert json.loads(out) == {
        k: v
        for k, v in metrics.score_captions(
            kept, evaluate.references_from_coco(annotations), use_java=False
        ).items()
    }


def test_cli_results_without_annotations_is_one_line(tmp_path, capsys):
    results = tmp_path / "results.json"
    write_results(RESULTS, results)
    code, out, err = run_cli(capsys, "--results", results)
    assert code == 2 and out == ""
    assert err == "error: --results needs --annotations (the COCO captions file to score against)\n"


def test_cli_error_has_no_traceback(tmp_path, annotations):
    results = tmp_path / "results.json"
    results.write_text("not json")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "evaluate.py"),
            "--results",
            str(results),
            "--annotations",
            str(annotations),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {results}: not valid JSON (Expecting value at line 1 column 1)"


def test_save_and_load_results_round_trip(tmp_path):
    path = tmp_path / "results.json"
    write_results([{**r, "extra": 1} for r in RESULTS], path)
    assert evaluate.load_results(path) == RESULTS
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_score_captions_rejects_duplicates_and_unknown_ids():
    with pytest.raises(ValueError, match="several captions"):
        metrics.score_captions([RESULTS[0], RESULTS[0]], REFERENCES, use_java=False)
    with pytest.raises(ValueError, match="no references"):
        metrics.score_captions([{"image_id": 1, "caption": "a cat"}], REFERENCES, use_java=False)
    with pytest.raises(ValueError, match="1 image ids have no references"):  # an empty list is none either
        metrics.score_captions([{"image_id": 9, "caption": "a cat"}], {**REFERENCES, 9: []}, use_java=False)


# ---- Karpathy split ----


def write_karpathy(path: Path) -> Path:
    """A tiny dataset_coco.json: two images per split, two sentences each."""
    images = []
    for n, split in enumerate(["train", "restval", "val", "test"] * 2):
        folder = "train2014" if split == "train" else "val2014"
        images.append(
            {
                "filepath": folder,
                "filename": f"COCO_{folder}_{n:012d}.jpg",
                "cocoid": n,
                "split": split,
                "imgid": n,
                "sentids": [2 * n, 2 * n + 1],
                "sentences": [
                    {"raw": f"A photo number {n}.", "tokens": ["a", "photo", "number", str(n)], "sentid": 2 * n},
                    {"raw": f"Picture {n}, again.", "tokens": ["picture", str(n), "again"], "sentid": 2 * n + 1},
                ],
            }
        )
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_karpathy_split_of_dataset_coco(tmp_path):
    source = read_captions(write_karpathy(tmp_path / "dataset_coco.json"))
    assert source.format == "karpathy"
    test = [image for image in source.images if image.split == "test"]
    assert [image.image_id for image in test] == [3, 7]
    assert source.images[0].file_name == "train2014/COCO_train2014_000000000000.jpg"
    assert source.images[6].file_name == "val2014/COCO_val2014_000000000006.jpg"
    assert source.images[1].split == "train"  # restval trains


def test_karpathy_bad_files(tmp_path):
    path = tmp_path / "dataset_coco.json"
    sentences = [{"raw": "a cat", "sentid": 1}]
    path.write_text(json.dumps({"images": [
        {"cocoid": 1, "filepath": "val2014", "filename": "x.jpg", "split": "dev", "sentences": sentences}]}))
    with pytest.raises(evaluate.CaptionFileError, match=r"dataset_coco.json: image 0 \(x.jpg\) has split 'dev'"):
        read_captions(path)
    path.write_text(json.dumps({"images": [{"cocoid": 1, "split": "val", "sentences": sentences}]}))
    with pytest.raises(evaluate.CaptionFileError, match="image 0 has no 'filename'"):
        read_captions(path)
    image = {"cocoid": "x1", "filepath": "val2014", "filename": "x.jpg", "split": "val", "sentences": sentences}
    path.write_text(json.dumps({"images": [image]}))
    with pytest.raises(evaluate.CaptionFileError, match="non-integer id 'x1'"):  # a cocoid must be a number
        read_captions(path)
    path.write_text("[]")
    with pytest.raises(evaluate.CaptionFileError, match="dataset_coco.json: not a caption file"):
        read_captions(path)


# ---- captioning a split with a model: evaluate.py --models / --encoder --decoder --vocab ----

MODEL_REFERENCES = {
    1: ["a red square on a white wall", "a red box"],
    2: ["a green circle", "a round green thing on white"],
    3: ["a blue square", "a blue box on a table"],
    4: ["a picture that will not open", "a broken file"],
}


@pytest.fixture(scope="module")
def model_and_split(tmp_path_factory) -> dict[str, Path]:
    """Random weights trained at 64 px in a models folder, and a val split in the sample set's layout: four
    images, the last one unreadable."""
    import torch
    from conftest import make_vocab
    from test_caption import noise_image

    from model import DecoderRNN, EncoderCNN

    root = tmp_path_factory.mktemp("model_eval")
    models = root / "models"
    models.mkdir()
    torch.manual_seed(0)
    torch.save(EncoderCNN(16, pretrained=False).state_dict(), models / "encoder-1.pkl")
    decoder = DecoderRNN(16, 24, 30)
    with torch.no_grad():
        decoder.fc.weight.mul_(5)
    torch.save(decoder.state_dict(), models / "decoder-1.pkl")
    (models / "train_config.json").write_text(json.dumps({"image_size": 64}))
    make_vocab(models / "vocab.pkl", 30)
    data = root / "data"
    (data / "images" / "val").mkdir(parents=True)
    (data / "annotations").mkdir()
    images = [{"id": i, "file_name": f"val_{i:012d}.jpg"} for i in MODEL_REFERENCES]
    for image in images[:3]:
        noise_image(image["id"]).save(data / "images" / "val" / image["file_name"], quality=90)
    (data / "images" / "val" / images[3]["file_name"]).write_bytes(b"not a JPEG")
    annotations = [
        {"id": 10 * i + k, "image_id": i, "caption": c}
        for i, captions in MODEL_REFERENCES.items()
        for k, c in enumerate(captions)
    ]
    (data / "annotations" / "captions_val.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return {"models": models, "data": data}


def model_args(model_and_split) -> list:
    return ["--models", model_and_split["models"], "--data", "sample", "--root", model_and_split["data"],
            "--no-java", "--device", "cpu", "--num-workers", "0"]


def test_cli_captions_a_split_and_reports_unreadable_images(model_and_split, tmp_path, capsys):
    saved = tmp_path / "captions.json"
    options = ["--beam", "2", "--max-len", "6", "--json", "--save-results", saved]
    code, out, err = run_cli(capsys, *model_args(model_and_split), *options)
    assert code == 0, err
    report = json.loads(out)
    assert report["model"]["images"] == 3 and report["model"]["unreadable"] == 1
    assert "warning: model: 1 of 4 images could not be read and were left out of the scores" in err
    results = evaluate.load_results(saved)
    assert [r["image_id"] for r in results] == [1, 2, 3]
    assert all(0 < len(r["caption"].split()) <= 6 for r in results)  # --max-len 6: at most 6 ids
    expected = metrics.score_captions(results, MODEL_REFERENCES, use_java=False)
    assert report["model"] == {**expected, "images": 3, "unreadable": 1}


def test_cli_prints_the_scores_before_a_failed_save(model_and_split, tmp_path, capsys):
    from test_caption import file_size_limit

    saved = tmp_path / "captions.json"
    with file_size_limit(16):
        code, out, err = run_cli(capsys, *model_args(model_and_split), "--beam", "1", "--save-results", saved)
    assert code == 2
    assert out.splitlines()[0].split() == ["metric", "score"] and "CIDEr" in out
    assert "model: 3 images scored, 1 unreadable (left out)" in out
    assert err.endswith(f"error: {saved}: cannot write (File too large)\n") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_model_errors_are_one_line(model_and_split, tmp_path, capsys):
    import torch

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    cases = [  # all refused before any captioning
        (["--vocab", "other.pkl"], "error: --models DIR takes the weights and vocab.pkl from DIR"),
        (["--save-results", not_a_folder / "r.json"], f"error: {not_a_folder / 'r.json'}: {not_a_folder} is not"),
        (["--save-results", tmp_path], f"error: {tmp_path}: is a folder"),
        (["--device", "mps" if not torch.backends.mps.is_available() else "cuda:99"], "error: device "),
    ]
    for option, message in cases:
        code, out, err = run_cli(capsys, *model_args(model_and_split), *option)
        assert code == 2 and out == "" and err.startswith(message) and err.count("\n") == 1, err
    for bad, message in [
        ({"annotations": []}, "no 'images' list"),
        ({"images": [], "annotations": [{"id": 5, "image_id": 9, "caption": "a cat"}]}, "refers to image 9"),
    ]:
        data = tmp_path / "bad"
        (data / "annotations").mkdir(parents=True, exist_ok=True)
        (data / "annotations" / "captions_val.json").write_text(json.dumps(bad))
        code, out, err = run_cli(capsys, *model_args(model_and_split), "--root", data)
        assert code == 2 and out == "" and "Traceback" not in err
        assert err.splitlines()[-1].startswith(f"error: {data / 'annotations' / 'captions_val.json'}: ")
        assert message in err.splitlines()[-1]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--beam", "0"], "argument --beam: must be >= 1, not 0"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, not 0"),
        (["--max-len", "1"], "argument --max-len: must be >= 2"),
        (["--num-workers", "-1"], "argument --num-workers: must be >= 0, not -1"),
    ],
)
def test_cli_bad_numbers_are_refused_when_parsing(capsys, option, message):
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--models", "models", *option])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_split_files_of_val_and_the_karpathy_splits(tmp_path):
    """'val' is every image of the val annotations with its file; the Karpathy splits take their own images
    (their folder and file name from dataset_coco.json) and only their references; 5 captions per image."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    write_karpathy(root / "annotations" / "dataset_coco.json")
    references = {n: [f"A photo number {n}, caption {k}." for k in range(5)] for n in range(8)}
    write_annotations(root / "annotations" / "captions_val2014.json", references)
    ids, files, refs = evaluate.split_files("val", "coco", root)
    assert ids == list(reversed(references)) and refs == references  # the file's image order
    assert files == [root / "images" / "val2014" / f"COCO_val2014_{n:012d}.jpg" for n in ids]
    for split, expected in (("karpathy-val", [2, 6]), ("karpathy-test", [3, 7])):
        ids, files, refs = evaluate.split_files(split, "coco", root)
        assert ids == expected and refs == {n: references[n] for n in expected}
        assert files == [root / "images" / "val2014" / f"COCO_val2014_{n:012d}.jpg" for n in expected]
    del references[7]
    write_annotations(root / "annotations" / "captions_val2014.json", references)
    with pytest.raises(evaluate.CaptionFileError, match=r"dataset_coco.json: 1 karpathy-test images are not"):
        evaluate.split_files("karpathy-test", "coco", root)
    with pytest.raises(ValueError, match="--split test: the coco test images have no reference captions"):
        evaluate.split_files("test", "coco", root)
    with pytest.raises(ValueError, match="unknown split 'dev': expected one of val, test, karpathy-val, karpathy-test"):
        evaluate.split_files("dev", "coco", root)
    sample = tmp_path / "sample"
    (sample / "annotations").mkdir(parents=True)
    write_annotations(sample / "annotations" / "captions_val.json", references)
    with pytest.raises(ValueError, match="the Karpathy split exists for COCO and Karpathy's dataset_\\*.json, not for 'sample'"):
        evaluate.split_files("karpathy-val", "sample", sample)


def test_latest_weights_are_the_highest_epoch_by_number(tmp_path):
    for name in ("encoder-2.pkl", "encoder-10.pkl", "encoder-9.pkl", "encoder-x.pkl", "encoder-11.pkl.bak"):
        (tmp_path / name).write_bytes(b"")
    assert evaluate.latest_weights(tmp_path) == (
        tmp_path / "encoder-10.pkl",
        tmp_path / "decoder-10.pkl",
        tmp_path / "vocab.pkl",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(evaluate.CaptionFileError, match=f"^{empty}: no encoder-N.pkl files"):
        evaluate.latest_weights(empty)


def test_format_comparison_puts_each_model_in_its_own_column():
    model = {m: 0.1 * k for k, m in enumerate(metrics.METRICS)}
    baseline = {m: v + 0.5 for m, v in model.items() if m != "METEOR"}  # a metric one lacks is left out
    lines = evaluate.format_comparison({"model": model, "baseline": baseline}).splitlines()
    assert lines[0].split() == ["metric", "model", "baseline"]
    assert [line.split() for line in lines[1:]] == [
        [m, f"{model[m]:.4f}", f"{baseline[m]:.4f}"] for m in metrics.METRICS if m != "METEOR"
    ]


def test_cli_compares_with_a_baseline_and_prints_captions_next_to_references(
    model_and_split, tmp_path, capsys, one_thread
):
    """--baseline DIR evaluates a second model (here: another decoder) beside the first; --examples N prints
    both models' captions and the references of the first N images; --beam and --max-len reach captioning."""
    import torch
    from conftest import make_vocab

    from caption import caption_image_files
    from model import DecoderRNN, load_pretrained

    models = model_and_split["models"]
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    (baseline / "encoder-1.pkl").symlink_to(models / "encoder-1.pkl")
    (baseline / "train_config.json").write_text((models / "train_config.json").read_text())
    make_vocab(baseline / "vocab.pkl", 30)
    torch.manual_seed(1)
    decoder = DecoderRNN(16, 24, 30)
    with torch.no_grad():
        decoder.fc.weight.mul_(5)
    torch.save(decoder.state_dict(), baseline / "decoder-1.pkl")
    saved = tmp_path / "captions.json"
    options = ["--beam", 1, "--max-len", 3, "--examples", 2, "--save-results", saved]
    code, out, err = run_cli(capsys, *model_args(model_and_split), "--baseline", baseline, *options)
    assert code == 0, err
    files = [model_and_split["data"] / "images" / "val" / f"val_{i:012d}.jpg" for i in (1, 2, 3)]
    encoder, decoder, vocab = load_pretrained(
        models / "encoder-1.pkl", models / "decoder-1.pkl", models / "vocab.pkl", device="cpu"
    )
    captions = caption_image_files(encoder, decoder, vocab, files, beam_size=1, max_len=3)
    assert [r["caption"] for r in evaluate.load_results(saved)] == captions  # the model's, not the baseline's
    lines = out.splitlines()
    assert lines[0].split() == ["metric", "model", "baseline"]
    assert "model: 3 images scored, 1 unreadable (left out)" in lines
    assert "baseline: 3 images scored, 1 unreadable (left out)" in lines
    examples = lines[lines.index("image 1") :]
    baseline_captions = [line.split(maxsplit=1)[1] for line in examples if line.startswith("  baseline ")]
    assert len(baseline_captions) == 2 and baseline_captions != captions[:2]  # the other decoder's captions
    assert examples == [
        "image 1",
        f"  {'model':<10} {captions[0]}",
        f"  {'baseline':<10} {baseline_captions[0]}",
        *(f"  {'reference':<10} {r}" for r in MODEL_REFERENCES[1]),
        "image 2",
        f"  {'model':<10} {captions[1]}",
        f"  {'baseline':<10} {baseline_captions[1]}",
        *(f"  {'reference':<10} {r}" for r in MODEL_REFERENCES[2]),
    ]


def test_cli_karpathy_split_of_the_sample_set_is_refused(model_and_split, capsys):
    code, out, err = run_cli(capsys, *model_args(model_and_split), "--split", "karpathy-test")
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.splitlines()[-1] == "error: the Karpathy split exists for COCO and Karpathy's dataset_*.json, not for 'sample'"
