"""The notebooks: each one runs top to bottom on the sample set in a fresh copy of the repository, and each is
stored without outputs and with the plain `python3` kernelspec (clean diffs, opens anywhere)."""

import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from sample_data import flickr_copy, make_sample_dataset

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(REPO.glob("*.ipynb"))
KERNELSPEC = {"name": "python3", "language": "python"}  # display_name is whatever Jupyter last wrote
CELL_TIMEOUT_S = 900  # train(cfg) in 2_Training took up to 10 minutes on a busy 2-core machine
NOTEBOOK_TIMEOUT_S = 1200
# Agg-based and headless like MPLBACKEND=Agg, but figures come back as image/png outputs that the test can check.
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """The sample set and the caches, made once and shared by every notebook run.

    Each repository copy links data/sample to this one set, so the notebooks' own `make_sample_dataset` call finds
    it complete, and links .cache to one folder, so the tokens (cached by the resolved file path) and the ResNet
    features (keyed by backbone, transform and image list) are computed only once: 3_Inference's own quick
    training reuses the features 2_Training cached. Nothing else is shared; in particular 3_Inference does not see
    the weights 2_Training saved in its copy's models/, so it trains its own as in a fresh clone.
    """
    base = tmp_path_factory.mktemp("notebooks-shared")
    make_sample_dataset(base / "sample", seed=0)
    (base / "cache").mkdir()
    return {"sample": base / "sample", "cache": base / "cache"}


def repository_copy(dest: Path, shared: dict[str, Path]) -> Path:
    """The modules, notebooks and images/ copied to `dest`, with data/sample and .cache linked to the shared ones."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in [*REPO.glob("*.py"), *REPO.glob("*.ipynb")]:
        shutil.copy2(path, dest / path.name)
    shutil.copytree(REPO / "images", dest / "images")
    (dest / "data").mkdir()
    (dest / "data" / "sample").symlink_to(shared["sample"], target_is_directory=True)
    (dest / ".cache").symlink_to(shared["cache"], target_is_directory=True)
    return dest


@pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks in the repository")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S)
def test_notebook_runs_on_the_sample_set(path: Path, shared: dict[str, Path], tmp_path: Path):
    copy = repository_copy(tmp_path / "repo", shared)
    nb = execute(copy / path.name, copy, "sample", shared)
    outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]
    assert any("image/png" in output.get("data", {}) for output in outputs), f"{path.name} showed no figure"


def execute(path: Path, copy: Path, data: str, shared: dict[str, Path]) -> nbformat.NotebookNode:
    """The notebook run top to bottom in the repository copy with CAPTION_DATA=data; a failing cell fails the test."""
    nb = nbformat.read(path, as_version=4)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # import from the copy only
    env.update(CAPTION_DATA=data, CAPTION_CACHE_DIR=str(shared["cache"]), MPLBACKEND=INLINE_BACKEND)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(copy)}})
    try:
        client.execute(env=env, cwd=str(copy))
    except CellExecutionError as e:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # IPython colours the traceback
        pytest.fail(f"{path.name} failed with CAPTION_DATA={data}:\n{plain}", pytrace=False)
    return nb


@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S)
def test_dataset_notebook_takes_a_captions_txt_folder(shared: dict[str, Path], tmp_path: Path):
    """CAPTION_DATA may be the path of a folder laid out like Kaggle's Flickr8k (captions.txt + Images/)."""
    copy = repository_copy(tmp_path / "repo", shared)
    folder = flickr_copy(shared["sample"], tmp_path / "my-flickr", "kaggle")
    nb = execute(copy / "0_Dataset.ipynb", copy, str(folder), shared)
    printed = "".join(output.get("text", "") for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs)
    assert "captions.txt: captions-csv, 3,250 images" in printed and "split deterministically by image" in printed


@pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks in the repository")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_clean(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    kernelspec = {key: nb.metadata.get("kernelspec", {}).get(key) for key in KERNELSPEC}
    assert kernelspec == KERNELSPEC, f"{path.name}: set metadata.kernelspec to {KERNELSPEC}"
    dirty = [
        n
        for n, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; run `make strip-notebooks`"
