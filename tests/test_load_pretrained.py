"""Loading encoder/decoder/vocab files laid out as the CVND family saves them, and refusing bad ones clearly."""

import json

import pytest
import torch
from conftest import make_vocab

from model import (
    DecoderRNN,
    EncoderCNN,
    WeightsFileError,
    load_decoder,
    load_encoder,
    load_pretrained,
    read_state_dict,
)
from vocabulary import VocabularyError

EMBED, HIDDEN, VOCAB = 16, 24, 40
LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 102510437\n"
)


pytestmark = pytest.mark.usefixtures("one_thread")



def rename(state: dict, embedding: str, output: str) -> dict:
    """The decoder's state dict with its embedding and output layers under other projects' names."""
    names = {"embed": embedding, "fc": output}
    return {
        names.get(k.split(".")[0], k.split(".")[0]) + "." + k.split(".", 1)[1]: v for k, v in state.items()
    }


def save_decoder(path, embedding="embed", output="fc", num_layers=1, legacy=False, seed=0) -> DecoderRNN:
    torch.manual_seed(seed)
    decoder = DecoderRNN(EMBED, HIDDEN, VOCAB, num_layers).eval()
    torch.save(
        rename(decoder.state_dict(), embedding, output), path, _use_new_zipfile_serialization=not legacy
    )
    return decoder


class Evil:
    """Unpickling this creates a file: what a malicious weights file could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One random encoder saved twice (zip format; legacy format without BatchNorm counters), and a vocab."""
    root = tmp_path_factory.mktemp("weights")
    encoder = EncoderCNN(EMBED, pretrained=False, backbone_seed=3).eval()
    state = encoder.state_dict()
    (root / "new").mkdir()
    torch.save(state, root / "new" / "encoder-1.pkl")
    (root / "old").mkdir()
    old_state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(old_state) < len(state)
    torch.save(old_state, root / "old" / "encoder-1.pkl", _use_new_zipfile_serialization=False)
    config = {"image_size": 96, "embed_size": EMBED, "hidden_size": HIDDEN, "num_layers": 1}
    (root / "old" / "train_config.json").write_text(json.dumps(config))
    make_vocab(root / "vocab.pkl", VOCAB)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = encoder(images)
    return {
        "root": root,
        "encoder": root / "new" / "encoder-1.pkl",
        "legacy_encoder": root / "old" / "encoder-1.pkl",
        "vocab": root / "vocab.pkl",
        "images": images,
        "features": expected,
    }


@pytest.mark.parametrize(
    ("embedding", "output", "num_layers", "legacy"),
    [
        ("embed", "fc", 1, False),
        ("word_embeddings", "hidden2vocab", 2, True),
        ("embedding", "linear", 1, True),
        ("caption_embeddings", "FC", 2, False),
        ("emb", "to_words", 1, False),  # unknown names: found by role and shape alone
    ],
)
def test_loads_the_family_layouts(files, tmp_path, embedding, output, num_layers, legacy):
    path = tmp_path / "decoder-1.pkl"
    original = save_decoder(path, embedding, output, num_layers, legacy)
    encoder_path = files["legacy_encoder"] if legacy else files["encoder"]
    encoder, decoder, vocab = load_pretrained(encoder_path, path, files["vocab"])
    assert (decoder.embed_size, decoder.hidden_size, decoder.vocab_size) == (EMBED, HIDDEN, VOCAB)
    assert decoder.num_layers == num_layers and len(vocab) == VOCAB
    assert not encoder.training and not decoder.training
    loaded, expected = decoder.state_dict(), original.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in loaded)
    with torch.no_grad():
        features = encoder(files["images"])
    assert torch.allclose(features, files["features"], atol=1e-5)
    assert decoder.beam_search(features, 3) == original.beam_search(features, 3)


def test_legacy_encoder_without_batchnorm_counters_and_its_image_size(files):
    legacy = load_encoder(files["legacy_encoder"])
    assert legacy.image_size == 96  # from train_config.json beside it
    assert legacy.state_dict()["resnet.1.num_batches_tracked"] == 0
    assert not legacy.training and not any(m.training for m in legacy.modules())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in legacy.parameters())
    assert {n for n, p in legacy.named_parameters() if p.requires_grad} == {"embed.weight", "embed.bias"}
    with torch.no_grad():
        assert torch.allclose(legacy(files["images"]), files["features"], atol=1e-5)
    assert load_encoder(files["encoder"]).image_size == 224  # no train_config.json there


def test_git_lfs_pointer_files_are_named_with_the_fix(files, tmp_path):
    pointer = tmp_path / "decoder-3.pkl"
    pointer.write_text(LFS_POINTER)
    for load in (load_decoder, load_encoder):
        with pytest.raises(WeightsFileError, match="git lfs pull") as error:
            load(pointer)
        assert str(pointer) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(VocabularyError, match="git lfs pull"):
        load_pretrained(files["encoder"], pointer, pointer)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_and_corrupt_files(tmp_path, legacy):
    whole = tmp_path / "whole.pkl"
    save_decoder(whole, legacy=legacy)
    data = whole.read_bytes()
    for name, content in [
        ("half.pkl", data[: len(data) // 2]),
        ("head.pkl", data[:100]),
        ("noise.pkl", b"x" * 500),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(WeightsFileError, match="truncated or corrupt") as error:
            load_decoder(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsFileError, match="file not found"):
        read_state_dict(tmp_path / "nowhere.pkl")


def test_encoder_and_decoder_files_swapped(files, tmp_path):
    decoder_path = tmp_path / "decoder-1.pkl"
    save_decoder(decoder_path)
    with pytest.raises(WeightsFileError, match="encoder weights file .*not a decoder") as error:
        load_pretrained(decoder_path, files["encoder"], files["vocab"])
    assert str(files["encoder"]) in str(error.value)
    with pytest.raises(WeightsFileError, match="decoder weights file .*not an encoder") as error:
        load_encoder(decoder_path)
    assert str(decoder_path) in str(error.value)


def test_a_vocabulary_of_another_size_is_refused(files, tmp_path):
    decoder_path, vocab_path = tmp_path / "decoder-1.pkl", tmp_path / "rebuilt-vocab.pkl"
    save_decoder(decoder_path)
    make_vocab(vocab_path, VOCAB + 7)
    with pytest.raises(WeightsFileError, match="use the vocab.pkl the model was trained with") as error:
        load_pretrained(files["encoder"], decoder_path, vocab_path)
    assert str(vocab_path) in str(error.value) and f"{VOCAB + 7} words" in str(error.value)


def test_encoder_and_decoder_of_different_runs_are_refused(files, tmp_path):
    decoder_path = tmp_path / "decoder-1.pkl"
    torch.save(DecoderRNN(EMBED + 1, HIDDEN, VOCAB).state_dict(), decoder_path)
    with pytest.raises(WeightsFileError, match="same training run"):
        load_pretrained(files["encoder"], decoder_path, files["vocab"])


def test_files_that_need_full_unpickling_are_not_loaded(tmp_path):
    marker = tmp_path / "the-pickle-ran-code"
    state = DecoderRNN(EMBED, HIDDEN, VOCAB).state_dict()
    for legacy in (False, True):
        path = tmp_path / f"decoder-{legacy}.pkl"
        torch.save({**state, "extra": Evil(marker)}, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(WeightsFileError, match="not loaded for safety") as error:
            load_decoder(path)
        assert "open" in str(error.value) and str(path) in str(error.value)
    assert not marker.exists()
    whole_module = tmp_path / "decoder-module.pkl"
    torch.save(
        DecoderRNN(EMBED, HIDDEN, VOCAB), whole_module
    )  # torch.save(model) instead of its state_dict()
    with pytest.raises(WeightsFileError, match=r"DecoderRNN.*not loaded for safety"):
        load_decoder(whole_module)


def test_data_parallel_prefix_and_missing_lstm_biases_are_accepted(tmp_path):
    torch.manual_seed(0)
    decoder = DecoderRNN(EMBED, HIDDEN, VOCAB, num_layers=2).eval()
    with torch.no_grad():
        for name, parameter in decoder.lstm.named_parameters():
            if name.startswith("bias"):
                parameter.zero_()
    state = {f"module.{k}": v for k, v in decoder.state_dict().items() if ".bias_" not in k}
    path = tmp_path / "decoder.pkl"
    torch.save(state, path)
    assert set(read_state_dict(path)) == {k.removeprefix("module.") for k in state}
    loaded = load_decoder(path)
    features = torch.randn(3, EMBED)
    assert loaded.greedy_search(features) == decoder.greedy_search(features)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: {**s, "init_h.weight": torch.zeros(HIDDEN, 2048)}, "layers this DecoderRNN does not have"),
        (lambda s: {k: v for k, v in s.items() if not k.startswith("lstm.")}, "no LSTM weights"),
        (lambda s: {**s, "fc.weight": torch.zeros(VOCAB + 1, HIDDEN)}, "output layer"),
        (lambda s: {**s, "lstm.weight_ih_l0": torch.zeros(3 * HIDDEN, EMBED)},
         r"not an LSTM \(a GRU or RNN\?\)"),
        (lambda s: {**s, "lstm.weight_ih_l0_reverse": torch.zeros(4 * HIDDEN, EMBED)}, "bidirectional"),
        (lambda s: [1, 2, 3], "not a state dict"),
        # a training checkpoint instead of the weights file
        (lambda s: {"decoder": s, "epoch": 3}, r"not a state dict \(a dict of tensors\), got dict"),
        (lambda s: {**s, "fc.weight": torch.zeros(VOCAB + 1, HIDDEN), "fc.bias": torch.zeros(VOCAB + 1)},
         f"the embedding has {VOCAB} words but the output layer {VOCAB + 1}"),
        (lambda s: {**s, "fc.bias": torch.zeros(VOCAB + 1)},
         r"cannot tell which layer is the output layer \(layers"),
        (lambda s: {**s, "position.weight": torch.zeros(VOCAB, EMBED)},
         r"cannot tell which layer is the word embedding \(candidates embed, position\)"),
    ],
)
def test_decoders_of_other_architectures_are_refused(tmp_path, change, message):
    path = tmp_path / "decoder.pkl"
    torch.save(change(DecoderRNN(EMBED, HIDDEN, VOCAB).state_dict()), path)
    with pytest.raises(WeightsFileError, match=message) as error:
        load_decoder(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("image_size", ['"big"', "0", "-3", "true", "2.5"])
def test_a_broken_train_config_is_reported(files, tmp_path, image_size):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "encoder-1.pkl").symlink_to(files["encoder"])
    (folder / "train_config.json").write_text(f'{{"image_size": {image_size}}}')
    with pytest.raises(WeightsFileError, match="train_config.json: image_size must be a positive integer"):
        load_encoder(folder / "encoder-1.pkl")


@pytest.mark.parametrize("lstm", ["lstm", "rnn"])
def test_a_decoder_whose_embed_and_hidden_sizes_are_equal_loads_by_role(tmp_path, lstm):
    """The seed configuration (embed 512 = hidden 512): the output layer's [V, H] weight then has the embedding's
    shape, and only its bias tells the two apart. The LSTM is found by its weights' names whatever its own."""
    torch.manual_seed(0)
    original = DecoderRNN(HIDDEN, HIDDEN, VOCAB, num_layers=2).eval()
    path = tmp_path / "decoder-1.pkl"
    state = rename(original.state_dict(), "word_embeddings", "hidden2vocab")
    torch.save({k.replace("lstm.", f"{lstm}.", 1): v for k, v in state.items()}, path)
    loaded = load_decoder(path)
    sizes = (loaded.embed_size, loaded.hidden_size, loaded.vocab_size, loaded.num_layers)
    assert sizes == (HIDDEN, HIDDEN, VOCAB, 2)
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_an_encoder_saved_in_half_precision_loads_in_float32(files, tmp_path):
    state = torch.load(files["encoder"], weights_only=True)
    path = tmp_path / "encoder-1.pkl"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)
    encoder = load_encoder(path)
    assert all(p.dtype == torch.float32 for p in encoder.state_dict().values() if p.is_floating_point())
    with torch.no_grad():
        features = encoder(files["images"])
    scale = float(files["features"].abs().max())
    assert torch.allclose(features, files["features"], rtol=0.05, atol=0.05 * scale)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: {**s, "embed.weight": torch.zeros(EMBED, 1024)},
         r"needs embed.weight of shape \[E, 2048\]"),
        (lambda s: {k: v for k, v in s.items() if k.startswith("embed.")}, r"no resnet\.\* backbone weights"),
        # a bare ResNet-50, such as torchvision's ImageNet weights
        (lambda s: {k[7:]: v for k, v in s.items() if k.startswith("resnet.")}, "needs embed.weight"),
    ],
)
def test_files_that_are_not_encoders_are_refused(files, tmp_path, change, message):
    path = tmp_path / "encoder-1.pkl"
    torch.save(change(torch.load(files["encoder"], weights_only=True)), path)
    with pytest.raises(WeightsFileError, match=message) as error:
        load_encoder(path)
    text = str(error.value)
    assert text.startswith(f"{path}: not an encoder weights file") and "\n" not in text
