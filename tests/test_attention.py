"""The Show-Attend-Tell model: attention weights, decoding, hand-built decoders whose attention is known, the
doubly stochastic penalty, weight files told apart by their keys, training end to end with an exact resume, the
--attention-map CLI and the attention settings."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_vocab

import caption
import train
from checkpoints import check_resumable, load_checkpoint
from config import TrainConfig, TrainingDiverged, TrainingError, positional_captions, resolve_config
from data_loader import dataset_paths
from datasets import caption_table, read_split
from model import (
    END_ID,
    START_ID,
    AttentionDecoder,
    Captioner,
    DecoderRNN,
    EncoderCNN,
    GridEncoder,
    WeightsFileError,
    atomic_torch_save,
    attention_penalty,
    load_decoder,
    load_encoder,
    load_pretrained,
    save_weights,
)
from plots import plot_attention
from sample_data import make_sample_dataset
from vocabulary import Vocabulary

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 30


def random_decoder(seed: int, feature_size: int = 7, vocab: int = 15, end_bias: float = 0.5) -> AttentionDecoder:
    """A small random attention decoder with peaked next-word distributions (captions of varied lengths)."""
    torch.manual_seed(seed)
    decoder = AttentionDecoder(8, 6, 10, vocab, feature_size=feature_size, dropout=0.5)
    with torch.no_grad():
        decoder.fc.weight.mul_(8)
        decoder.fc.bias[END_ID] += end_bias
    return decoder.eval()


def collect_alphas(decoder: AttentionDecoder) -> tuple[list[torch.Tensor], object]:
    """Every attention weight the decoder computes from now on (a forward hook on its Attention), and the hook."""
    seen: list[torch.Tensor] = []
    handle = decoder.attention.register_forward_hook(lambda module, args, out: seen.append(out[1].detach().clone()))
    return seen, handle


def stepped_alphas(decoder: AttentionDecoder, features: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """The weights [len(ids), P] seen when `ids` is written through the decoding interface (decode_step)."""
    seen, handle = collect_alphas(decoder)
    try:
        with torch.no_grad():
            state, tokens = decoder.init_state(features), None
            for word in ids:
                _, state = decoder.decode_step(tokens, state)
                tokens = torch.tensor([word])
    finally:
        handle.remove()
    return torch.cat(seen)


def sequence_log_prob(decoder: AttentionDecoder, features: torch.Tensor, ids: list[int]) -> float:
    """Log-probability of `ids` for one image's grid [P, F] under teacher forcing (forward, not the search)."""
    with torch.no_grad():
        logits, _ = decoder(features.unsqueeze(0), torch.tensor([ids]))
    return float(logits[0].log_softmax(-1).gather(1, torch.tensor(ids).unsqueeze(1)).sum())


# ---------------------------------------------------------------------------------------------------------------
# 1, 2: attention weights and decoding on random decoders
# ---------------------------------------------------------------------------------------------------------------


def test_attention_weights_sum_to_one_and_maps_are_the_weights_decoding_saw():
    decoder = random_decoder(seed=1)
    features = torch.randn(3, 9, 7, generator=torch.Generator().manual_seed(1))
    captions = torch.randint(3, 15, (3, 6), generator=torch.Generator().manual_seed(2))
    for mode in (decoder.train, decoder.eval):  # dropout sits after the attention: no effect on the weights
        mode()
        logits, alphas = decoder(features, captions)
        assert logits.shape == (3, 6, 15) and alphas.shape == (3, 6, 9)
        torch.testing.assert_close(alphas.sum(2), torch.ones(3, 6))
        assert (alphas >= 0).all() and not torch.allclose(alphas, torch.full_like(alphas, 1 / 9), atol=1e-3)
    decoder.eval()

    # greedy, batched: the weights attention_maps gives are the ones the search computed, step by step
    seen, handle = collect_alphas(decoder)
    greedy = decoder.greedy_search(features, max_len=10)
    handle.remove()
    assert len({len(ids) for ids in greedy}) > 1, "the test needs captions of different lengths"
    maps = decoder.attention_maps(features, greedy)
    for i, ids in enumerate(greedy):
        assert maps[i].shape == (len(ids), 9)
        torch.testing.assert_close(maps[i].sum(1), torch.ones(len(ids)))
        during = torch.stack([seen[t][i] for t in range(len(ids))])
        torch.testing.assert_close(maps[i], during, atol=1e-6, rtol=1e-5)
        # and each step's map moves with the words written: not the same weights at every step
        assert not torch.allclose(maps[i][0], maps[i][-1], atol=1e-4)

    # beam: its captions re-read through decode_step give the same weights as attention_maps
    beam = decoder.beam_search(features, beam_size=3, max_len=10)
    assert beam != greedy
    for i, (ids, alphas) in enumerate(zip(beam, decoder.attention_maps(features, beam), strict=True)):
        torch.testing.assert_close(alphas, stepped_alphas(decoder, features[i : i + 1], ids), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(alphas.sum(1), torch.ones(len(ids)))


@pytest.mark.parametrize(("seed", "end_bias"), [(4, 0.5), (1, 1.0)])
def test_batched_search_equals_one_image_at_a_time(seed, end_bias):
    decoder = random_decoder(seed, end_bias=end_bias)
    features = torch.randn(8, 4, 7, generator=torch.Generator().manual_seed(seed + 10))
    greedy = decoder.greedy_search(features, max_len=12)
    assert len({len(ids) for ids in greedy}) > 1 and any(ids[-1] == END_ID for ids in greedy)
    assert greedy == [decoder.greedy_search(f.unsqueeze(0), max_len=12)[0] for f in features]
    assert decoder.beam_search(features, beam_size=1, max_len=12) == greedy
    beam = decoder.beam_search(features, beam_size=4, max_len=12)
    assert beam == [decoder.beam_search(f.unsqueeze(0), beam_size=4, max_len=12)[0] for f in features]
    assert beam != greedy  # a real beam: it finds other captions than greedy for some images
    scored = decoder.beam_search(features, beam_size=4, max_len=12, top_n=3)
    for hypotheses, f in zip(scored, features, strict=True):
        alone = decoder.beam_search(f.unsqueeze(0), beam_size=4, max_len=12, top_n=3)[0]
        assert [ids for ids, _ in hypotheses] == [ids for ids, _ in alone]
        assert [s for _, s in hypotheses] == pytest.approx([s for _, s in alone], abs=1e-5)
        # the scores are the model's log-probabilities of the captions (teacher forcing), best first
        assert [s for _, s in hypotheses] == pytest.approx([sequence_log_prob(decoder, f, ids)
                                                            for ids, _ in hypotheses], abs=1e-4)
        assert [s for _, s in hypotheses] == sorted((s for _, s in hypotheses), reverse=True)
    # greedy never scores better than the beam's best
    for ids, hypotheses, f in zip(greedy, scored, features, strict=True):
        assert sequence_log_prob(decoder, f, ids) <= hypotheses[0][1] + 1e-5
    # sampling with top_k=1 is greedy; the decoding state follows the beams (reorder_state) on every part
    assert decoder.sample_search(features, top_k=1, max_len=12) == greedy
    state = decoder.init_state(features)
    picked = decoder.reorder_state(state, torch.tensor([5, 0, 5]))
    assert all(torch.equal(p, s[[5, 0, 5]]) for p, s in zip(picked, state, strict=True))


# ---------------------------------------------------------------------------------------------------------------
# 3: hand-built decoders whose attention is known
# ---------------------------------------------------------------------------------------------------------------

WORDS = 6  # <start>, <end>, and the words 2 .. 5; a cell's "word code" is one-hot over them (its first channels)


def copying_decoder(feature_size: int, attention_size: int) -> AttentionDecoder:
    """An AttentionDecoder that writes the word whose code the attended context holds.

    The gate sigmoid(f_beta) is saturated open, so the context is the attended cells' features; the LSTM cell's
    input and output gates are open and its forget gate shut, its cell input is tanh(200 * code), so
    h = tanh(1) * code (as test_decoding.py's markov_decoder); `fc` reads the code: logits 10 * code. The word
    embeddings and h0, c0 are zero. The attention's weights are the caller's to set.
    """
    decoder = AttentionDecoder(attention_size, 2, WORDS, WORDS, feature_size=feature_size, dropout=0.0)
    hidden, embed = WORDS, 2
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.zero_()
        decoder.f_beta.bias.fill_(200)
        for j in range(WORDS):
            decoder.lstm.weight_ih[2 * hidden + j, embed + j] = 200
        decoder.lstm.bias_ih[:hidden] = 200  # input gate
        decoder.lstm.bias_ih[hidden : 2 * hidden] = -200  # forget gate
        decoder.lstm.bias_ih[3 * hidden :] = 200  # output gate
        decoder.fc.weight.copy_(10 / math.tanh(1) * torch.eye(WORDS))
    return decoder.eval()


def marked_grids(cell_words: list[int], marked: list[int]) -> torch.Tensor:
    """One grid per marked cell: cell p holds one-hot(cell_words[p]) and a marker channel, 1 in the marked cell."""
    grids = torch.zeros(len(marked), len(cell_words), WORDS + 1)
    for image, cell in enumerate(marked):
        grids[image, torch.arange(len(cell_words)), torch.tensor(cell_words)] = 1
        grids[image, cell, WORDS] = 1
    return grids


def test_attention_forced_to_the_marked_cell_writes_that_cells_word():
    decoder = copying_decoder(feature_size=WORDS + 1, attention_size=1)
    with torch.no_grad():
        decoder.attention.encoder_att.weight[0, WORDS] = 1  # the score: 1000 * tanh(marker)
        decoder.attention.full_att.weight.fill_(1000)
    cell_words = [2, 3, 4, 5]
    features = marked_grids(cell_words, marked=[0, 1, 2, 3, 2])
    expected = [[word] * 3 for word in [2, 3, 4, 5, 4]]
    assert decoder.greedy_search(features, max_len=3) == expected
    assert decoder.beam_search(features, beam_size=2, max_len=3) == expected
    _, alphas = decoder(features, torch.tensor(expected))
    for image, cell in enumerate([0, 1, 2, 3, 2]):
        assert (alphas[image, :, cell] > 1 - 1e-6).all()
    # the same cells with the marker moved: the caption follows the marker, not the cells' contents
    moved = marked_grids([5, 4, 3, 2], marked=[3, 0])
    assert decoder.greedy_search(moved, max_len=2) == [[2, 2], [5, 5]]
    maps = decoder.attention_maps(moved, [[2, 2], [5, 5]])
    assert (maps[0][:, 3] > 1 - 1e-6).all() and (maps[1][:, 0] > 1 - 1e-6).all()


def test_attention_that_follows_the_hidden_state_reads_the_cells_in_the_order_it_points():
    """Each cell has a position channel; after writing word w the decoder looks at cell POINTS[w] (through
    decoder_att on h = tanh(1) * code(w)), and first at POINTS[<start>] (h0 = tanh(1) * code(<start>)): the
    caption reads the cells along that chain, and each step's weights sit on the cell it read."""
    cells = 4
    points = {START_ID: 0, 2: 1, 3: 2, 4: 3}
    decoder = copying_decoder(feature_size=WORDS + cells, attention_size=cells)
    with torch.no_grad():
        for a in range(cells):
            decoder.attention.encoder_att.weight[a, WORDS + a] = 10  # cell p: 0 in attention dim p, -10 elsewhere
        decoder.attention.encoder_att.bias.fill_(-10)
        for word, cell in points.items():
            decoder.attention.decoder_att.weight[cell, word] = 5 / math.tanh(1)  # +5 in the dim pointed at
        decoder.attention.full_att.weight.fill_(100)  # the pointed cell scores 100 more than any other
        decoder.init_h.bias[START_ID] = math.tanh(1)

    def grid(cell_words):
        g = torch.zeros(cells, WORDS + cells)
        g[torch.arange(cells), torch.tensor(cell_words)] = 1
        g[:, WORDS:] = torch.eye(cells)
        return g

    features = torch.stack([grid([2, 3, 4, END_ID]), grid([4, END_ID, 2, 3]), grid([3, 2, END_ID, 4])])
    # chains: cells 0 1 2 3; cells 0 3 2 1; cells 0 2 (then <end> in cell 2)
    expected = [[2, 3, 4, END_ID], [4, 3, 2, END_ID], [3, END_ID]]
    read = [[0, 1, 2, 3], [0, 3, 2, 1], [0, 2]]
    assert decoder.greedy_search(features, max_len=6) == expected
    assert decoder.beam_search(features, beam_size=3, max_len=6) == expected
    for alphas, cells_read in zip(decoder.attention_maps(features, expected), read, strict=True):
        assert alphas.argmax(1).tolist() == cells_read
        assert (alphas.max(1).values > 1 - 1e-6).all()


# ---------------------------------------------------------------------------------------------------------------
# 4: the doubly stochastic penalty and the training objective
# ---------------------------------------------------------------------------------------------------------------


def test_the_f_beta_gate_decides_how_much_of_the_context_reaches_the_lstm():
    """A shut gate (sigmoid(f_beta(h)) = 0) passes no context: two grids with the same mean (so the same h0, c0)
    but other cells give the same logits; an open gate lets the cells' difference through."""
    decoder = random_decoder(seed=3)
    cells = torch.randn(1, 4, 7, generator=torch.Generator().manual_seed(0))
    shift = torch.zeros(1, 4, 7)
    shift[0, 0], shift[0, 1] = 2.0, -2.0
    grids = torch.cat((cells, cells + shift))  # the same mean, two cells moved apart
    captions = torch.tensor([[START_ID, 3, 4, END_ID]] * 2)
    for bias, same in ((-100.0, True), (100.0, False)):
        with torch.no_grad():
            decoder.f_beta.weight.zero_()
            decoder.f_beta.bias.fill_(bias)
        logits, _ = decoder(grids, captions)
        assert torch.allclose(logits[0], logits[1], atol=1e-6) == same


def test_attention_penalty_is_the_mean_squared_shortfall_of_each_cells_total_attention():
    # image 0 looks at cell 0 twice: totals (2, 0), squared shortfalls 1, 1; image 1 spreads: totals (1, 1), 0, 0
    alphas = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    assert float(attention_penalty(alphas)) == pytest.approx(0.5, abs=1e-7)
    # three steps over three cells: totals 0.8, 1.15, 1.05 -> (0.04 + 0.0225 + 0.0025) / 3
    alphas = torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.2, 0.6], [0.1, 0.7, 0.2]]])
    assert float(attention_penalty(alphas)) == pytest.approx(0.065 / 3, abs=1e-7)
    assert float(attention_penalty(alphas.half())) == pytest.approx(0.065 / 3, abs=2e-3)
    assert float(attention_penalty(torch.full((2, 4, 4), 0.25))) == 0.0  # one unit of attention per cell


def test_caption_loss_is_cross_entropy_plus_alpha_c_times_the_penalty():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=generator)
    captions = torch.tensor([[0, 3, 1], [0, 4, 2]])
    expected_ce = -float(logits.log_softmax(-1).gather(2, captions.unsqueeze(2)).mean())
    alphas = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], [[0.5, 0.5], [0.5, 0.5], [0.0, 1.0]]],
                          requires_grad=True)
    # totals: image 0 (3, 0) -> 4, 1; image 1 (1, 2) -> 0, 1: penalty 6 / 4
    for alpha_c in (0.0, 2.0):
        loss, cross_entropy = train.caption_loss(logits, captions, alphas, alpha_c)
        assert float(cross_entropy) == pytest.approx(expected_ce, abs=1e-6)
        assert float(loss.detach()) == pytest.approx(expected_ce + alpha_c * 1.5, abs=1e-6)
    loss.backward()
    assert alphas.grad.abs().sum() > 0  # the penalty trains the attention
    loss, cross_entropy = train.caption_loss(logits, captions, None, 2.0)  # an LSTM decoder has no penalty
    assert float(loss) == float(cross_entropy) == pytest.approx(expected_ce, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# 5: weight files: the keys tell the kind, wrong pairings are refused
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> dict:
    """An attention model (grid 2, feature statistics that are not 0 and 1) and an LSTM model, saved as train.py
    saves them, beside train_config.json files (64 px); a vocab of VOCAB words and one of VOCAB + 1."""
    root = tmp_path_factory.mktemp("attention-weights")
    torch.manual_seed(0)
    model = Captioner(GridEncoder(2, pretrained=False, backbone_seed=1), AttentionDecoder(8, 8, 12, VOCAB))
    with torch.no_grad():
        model.feature_mean.copy_(torch.randn(2048) * 0.5)
        model.feature_std.copy_(torch.rand(2048) + 0.5)
        model.decoder.fc.weight.mul_(5)
    model.eval()
    lstm = Captioner(EncoderCNN(16, pretrained=False), DecoderRNN(16, 24, VOCAB))
    files = {"model": model, "root": root}
    for kind, captioner in (("attention", model), ("lstm", lstm)):
        (root / kind).mkdir()
        atomic_torch_save(captioner.encoder_state(), root / kind / "encoder-1.pkl")
        save_weights(captioner.decoder, root / kind / "decoder-1.pkl")
        (root / kind / "train_config.json").write_text(json.dumps({"image_size": 64}))
        files[kind] = (root / kind / "encoder-1.pkl", root / kind / "decoder-1.pkl")
    make_vocab(root / "vocab.pkl", VOCAB)
    make_vocab(root / "vocab-bigger.pkl", VOCAB + 1)
    files["vocab"], files["bigger_vocab"] = root / "vocab.pkl", root / "vocab-bigger.pkl"
    return files


def one_line_error(excinfo, starts_with) -> str:
    message = str(excinfo.value)
    assert message.startswith(f"{starts_with}: ") and "\n" not in message, message
    return message


def test_attention_weight_files_load_back_as_the_model_that_saved_them(weight_files):
    encoder_file, decoder_file = weight_files["attention"]
    encoder_state = torch.load(encoder_file, weights_only=True)
    assert {"grid_size", "feature_mean", "feature_std"} <= encoder_state.keys()
    assert "embed.weight" not in encoder_state and int(encoder_state["grid_size"]) == 2
    decoder_state = torch.load(decoder_file, weights_only=True)
    assert {"attention.encoder_att.weight", "attention.decoder_att.weight", "attention.full_att.weight",
            "f_beta.weight", "init_h.weight", "init_c.weight", "lstm.weight_ih"} <= decoder_state.keys()

    encoder, decoder, vocab = load_pretrained(encoder_file, decoder_file, weight_files["vocab"])
    assert isinstance(encoder, GridEncoder) and isinstance(decoder, AttentionDecoder)
    assert len(vocab) == VOCAB
    assert encoder.grid == 2 and encoder.image_size == 64 and not encoder.training and not decoder.training
    assert (decoder.attention_size, decoder.embed_size, decoder.hidden_size, decoder.vocab_size,
            decoder.feature_size) == (8, 8, 12, VOCAB, 2048)
    assert isinstance(load_encoder(encoder_file), GridEncoder) and isinstance(load_decoder(decoder_file),
                                                                               AttentionDecoder)

    model = weight_files["model"]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    captions = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_logits, expected_alphas = model(captions, images=images)
        features = encoder(images)  # standardised with the statistics the file holds
        assert features.shape == (2, 4, 2048)
        standardised = (model.encoder.features(images) - model.feature_mean) / model.feature_std
        torch.testing.assert_close(features, standardised, atol=1e-5, rtol=1e-5)
        logits, alphas = decoder(features, captions)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alphas, expected_alphas, atol=1e-6, rtol=1e-5)
    assert decoder.beam_search(features, beam_size=3) == model.decoder.beam_search(standardised, beam_size=3)


def test_wrong_pairings_and_vocabularies_are_refused_naming_the_file(weight_files):
    (grid_encoder, attention_decoder), (pooled_encoder, lstm_decoder) = weight_files["attention"], weight_files["lstm"]
    vocab = weight_files["vocab"]
    with pytest.raises(WeightsFileError) as excinfo:
        load_pretrained(pooled_encoder, attention_decoder, vocab)
    assert "attention decoder" in one_line_error(excinfo, pooled_encoder)
    with pytest.raises(WeightsFileError) as excinfo:
        load_pretrained(grid_encoder, lstm_decoder, vocab)
    assert "LSTM decoder" in one_line_error(excinfo, grid_encoder)
    with pytest.raises(WeightsFileError) as excinfo:
        load_pretrained(grid_encoder, attention_decoder, weight_files["bigger_vocab"])
    assert f"has {VOCAB + 1} words but {attention_decoder} predicts {VOCAB}" in one_line_error(
        excinfo, weight_files["bigger_vocab"])
    # a decoder file where the encoder goes, and the other way round
    with pytest.raises(WeightsFileError) as excinfo:
        load_encoder(attention_decoder)
    assert "decoder weights file" in one_line_error(excinfo, attention_decoder)
    with pytest.raises(WeightsFileError) as excinfo:
        load_decoder(grid_encoder)
    assert "encoder weights file" in one_line_error(excinfo, grid_encoder)
    # the right pairs still load
    assert isinstance(load_pretrained(pooled_encoder, lstm_decoder, vocab)[1], DecoderRNN)
    with pytest.raises(ValueError, match="GridEncoder"):
        Captioner(EncoderCNN.__new__(EncoderCNN), AttentionDecoder(4, 4, 4, VOCAB))


# ---------------------------------------------------------------------------------------------------------------
# 6, 7: training end to end, and an exact resume
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny generated sample set and a feature cache folder shared by this module's runs."""
    root = tmp_path_factory.getbasetemp() / "attention-shared"
    make_sample_dataset(root / "sample", n_train=40, n_val=10, n_test=2)
    return root


def attention_config(base: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(decoder="attention", data="sample", data_root=str(base / "sample"), image_size=64, grid=2,
                    embed_size=16, hidden_size=32, attention_size=16, epochs=2, batch_size=32, num_workers=0,
                    extract_batch_size=50, cache_dir=str(base / "features"), out_dir=str(out),
                    checkpoint_minutes=0, log_every=2, dropout=0.3)
    return TrainConfig(**(settings | overrides))


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory) -> dict:
    """Two epochs of the attention model, a checkpoint every 2 steps (dropout on, so resuming must reseed it)."""
    return train.train(attention_config(base, tmp_path_factory.mktemp("attention-run")))


def test_an_attention_run_writes_weights_that_load_and_caption_without_flags(trained, base):
    out = Path(trained["out_dir"])
    assert "-grid2-" in Path(trained["cache"]).name
    assert all(math.isfinite(m["val_loss"]) and math.isfinite(m["train_loss"]) for m in trained["metrics"])
    config = json.loads((out / "train_config.json").read_text())
    assert (config["decoder"], config["grid"], config["attention_size"], config["num_layers"]) == (
        "attention", 2, 16, 1)
    encoder, decoder, vocab = load_pretrained(out / "encoder-2.pkl", out / "decoder-2.pkl", out / "vocab.pkl")
    assert isinstance(encoder, GridEncoder) and isinstance(decoder, AttentionDecoder)
    assert encoder.grid == 2 and encoder.image_size == 64 and decoder.attention_size == 16
    test_images = sorted(dataset_paths("sample", base / "sample")["test_images"].iterdir())
    for beam in (1, 3):
        captions = caption.caption_image_files(encoder, decoder, vocab, test_images, beam_size=beam)
        assert all(isinstance(c, str) and c for c in captions), captions

    # the saved files reproduce the reported validation loss on the cached (raw) validation grids: the
    # standardisation went into the encoder file
    paths = dataset_paths("sample", base / "sample")
    split = read_split(paths["val_annotations"], paths["val_images"])
    [val_cache] = [p for p in (base / "features").iterdir() if p.name.startswith("captions_val-64px-grid2-")]
    raw = np.load(val_cache / "features.npy", mmap_mode="r")
    assert raw.shape == (10, 1, 4, 2048)
    table = caption_table(split, vocab, np.load(val_cache / "readable.npy"))
    total, tokens, penalties = 0.0, 0, []
    with torch.no_grad():
        for i in range(len(table.lengths)):
            captions = table.tokens[i : i + 1, : table.lengths[i]]
            grid = torch.from_numpy(np.asarray(raw[int(table.rows[i]), :1], dtype=np.float32))
            logits, alphas = decoder((grid - encoder.feature_mean) / encoder.feature_std, captions)
            total += F.cross_entropy(logits.flatten(0, 1), captions.flatten(), reduction="sum").item()
            tokens += captions.numel()
            penalties.append(float(attention_penalty(alphas)))
    assert total / tokens == pytest.approx(trained["val_loss"], abs=2e-4)
    assert np.mean(penalties) > 0.1  # so a loss with 50 x the penalty in it would be several nats higher


def test_the_reported_training_loss_is_the_cross_entropy_without_the_penalty(base, tmp_path):
    """With a learning rate too small to move the weights, runs at alpha_c 0 and 50 see the same cross-entropy:
    their train_loss agrees only if the penalty (worth several nats at alpha_c 50, see above) is left out."""
    frozen = dict(epochs=1, lr=1e-9, dropout=0.0, checkpoint_minutes=10, log_every=25)
    plain = train.train(attention_config(base, tmp_path / "plain", alpha_c=0.0, **frozen))
    penalised = train.train(attention_config(base, tmp_path / "penalised", alpha_c=50.0, **frozen))
    assert not penalised["cache_built"]
    assert penalised["weights_sha256"] != plain["weights_sha256"]  # the penalty did take part in training
    [p], [q] = plain["metrics"], penalised["metrics"]
    assert q["train_loss"] == pytest.approx(p["train_loss"], abs=1e-3)
    assert q["val_loss"] == pytest.approx(p["val_loss"], abs=1e-3)
    assert abs(p["train_loss"] - p["val_loss"]) < 1.0  # both are cross-entropies of the same untrained model


def test_an_attention_run_without_the_cache_trains_on_the_images(base, tmp_path):
    """--no-cache: the grids come from the ResNet at every step (and for validation and the statistics), so no
    feature cache is written, and the files load as an attention model."""
    result = train.train(attention_config(base, tmp_path / "out", cache=False, epochs=1,
                                          cache_dir=str(tmp_path / "features")))
    assert result["cache"] is None and not (tmp_path / "features").exists()
    encoder, decoder, vocab = load_pretrained(*(Path(result["files"][k]) for k in ("encoder", "decoder", "vocab")))
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < math.log(len(vocab))  # better than uniform
    assert isinstance(encoder, GridEncoder) and isinstance(decoder, AttentionDecoder)
    assert not torch.equal(encoder.feature_mean, torch.zeros(2048))  # statistics from sampled images


def test_an_attention_run_stopped_mid_epoch_resumes_to_the_same_weights(trained, base, tmp_path, capsys):
    straight = Path(trained["out_dir"])
    steps_per_epoch = trained["metrics"][0]["step"]
    assert steps_per_epoch >= 6
    out = tmp_path / "stopped"
    with pytest.raises(TrainingDiverged):  # a NaN at step 3 of epoch 2: the checkpoint after its step 2 is kept
        train.train(attention_config(base, out, nan_at_step=steps_per_epoch + 3))
    stopped = load_checkpoint(out / "checkpoint.pt")
    assert (stopped["epoch"], stopped["step"]) == (2, 2)
    capsys.readouterr()
    resumed = train.train(attention_config(base, out, resume=True))
    assert f"resuming {out / 'checkpoint.pt'} at epoch 2, step 2 " in capsys.readouterr().out
    assert resumed["weights_sha256"] == trained["weights_sha256"]
    for name in ("encoder-1.pkl", "decoder-1.pkl", "encoder-2.pkl", "decoder-2.pkl"):
        expected = torch.load(straight / name, weights_only=True)
        actual = torch.load(out / name, weights_only=True)
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[k], actual[k]) for k in expected), name
    for before, after in zip(trained["metrics"], resumed["metrics"], strict=True):
        assert before["val_loss"] == after["val_loss"]
        assert before["train_loss"] == pytest.approx(after["train_loss"], rel=1e-9)


def test_resume_refuses_a_changed_attention_setting_in_one_line(trained, base, capsys):
    out = Path(trained["out_dir"])
    path = out / "checkpoint.pt"
    before = path.read_bytes()
    checkpoint = load_checkpoint(path)
    cfg = TrainConfig(**checkpoint["config"])
    vocab = Vocabulary.load(out / "vocab.pkl")
    backbone = checkpoint["backbone_fingerprint"]
    check_resumable(checkpoint, cfg, vocab, backbone, 1, path)  # the same settings: fine
    for name, value, was in [("grid", 3, 2), ("attention_size", 17, 16), ("alpha_c", 0.5, 1.0),
                             ("decoder", "lstm", "attention")]:
        with pytest.raises(TrainingError) as excinfo:
            check_resumable(checkpoint, replace(cfg, **{name: value}), vocab, backbone, 1, path)
        flag = name.replace("_", "-")
        assert f"cannot resume with --{flag} {value}: the checkpoint was trained with {was}" in one_line_error(
            excinfo, path)
    args = ["--decoder", "attention", "--data-root", str(base / "sample"), "--cache-dir", str(base / "features"),
            "--out-dir", str(out), "--image-size", "64", "--grid", "2", "--embed-size", "16", "--hidden-size", "32",
            "--attention-size", "16", "--epochs", "2", "--batch-size", "32", "--num-workers", "0", "--dropout",
            "0.3", "--resume"]
    capsys.readouterr()
    assert train.main(args + ["--grid", "3"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--grid 3: the checkpoint was trained with 2" in errors[0]
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# 8: caption.py --attention-map
# ---------------------------------------------------------------------------------------------------------------


def cli(*args: str) -> list[str]:
    return [*map(str, args), "--device", "cpu", "--num-workers", "0"]


def test_attention_map_cli_draws_a_png_and_prints_the_same_caption(trained, base, tmp_path, capsys):
    out = Path(trained["out_dir"])
    model = ["--encoder", out / "encoder-2.pkl", "--decoder", out / "decoder-2.pkl", "--vocab", out / "vocab.pkl"]
    image = sorted(dataset_paths("sample", base / "sample")["test_images"].iterdir())[0]
    capsys.readouterr()
    assert caption.main(cli(image, *model)) == 0
    plain = capsys.readouterr().out
    png = tmp_path / "maps" / "map.png"
    assert caption.main(cli(image, *model, "--attention-map", png)) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and plain.startswith(f"{image}\t")
    assert png.read_bytes().startswith(b"\x89PNG") and f"wrote {png}" in captured.err

    encoder, decoder, vocab = load_pretrained(out / "encoder-2.pkl", out / "decoder-2.pkl", out / "vocab.pkl")
    words, alphas = caption.caption_with_attention(encoder, decoder, vocab, image, beam_size=3)
    assert alphas.shape == (len(words), 4) and vocab.start_word not in words
    torch.testing.assert_close(alphas.sum(1), torch.ones(len(words)))
    assert " ".join(w for w in words if w != vocab.end_word) == plain.strip().split("\t")[1]
    with pytest.raises(ValueError, match="alphas must be"):
        plot_attention(caption.load_image(image), words[:-1], alphas)


def test_attention_map_refuses_an_lstm_model_and_several_images(trained, weight_files, base, tmp_path, capsys):
    png = tmp_path / "map.png"
    images = sorted(dataset_paths("sample", base / "sample")["test_images"].iterdir())
    encoder, decoder = weight_files["lstm"]
    capsys.readouterr()
    code = caption.main(cli(images[0], "--encoder", encoder, "--decoder", decoder, "--vocab", weight_files["vocab"],
                            "--attention-map", png))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --attention-map: ")
    assert "LSTM decoder" in err[0] and not png.exists()

    out = Path(trained["out_dir"])
    code = caption.main(cli(*images[:2], "--encoder", out / "encoder-2.pkl", "--decoder", out / "decoder-2.pkl",
                            "--vocab", out / "vocab.pkl", "--attention-map", png))
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert code == 2 and errors == ["error: --attention-map draws one image, the inputs have 2"]
    assert len(captured.out.strip().splitlines()) == 2 and not png.exists()  # the captions are still printed


# ---------------------------------------------------------------------------------------------------------------
# 9: settings
# ---------------------------------------------------------------------------------------------------------------


def test_attention_settings_presets_and_refusals(tmp_path, capsys):
    sample = resolve_config(TrainConfig(decoder="attention"))
    assert (sample.out_dir, sample.grid, sample.num_layers, sample.image_size) == ("models/sample-attention", 2, 1, 64)
    spatial = resolve_config(TrainConfig(data="sample-spatial", decoder="attention"))
    assert (spatial.out_dir, spatial.grid, spatial.image_size) == ("models/sample-spatial-attention", 4, 128)
    coco = resolve_config(TrainConfig(data="coco", decoder="attention"))
    assert (coco.out_dir, coco.grid, coco.attention_size, coco.num_layers, coco.dropout, coco.batch_size,
            coco.lr) == ("models/attention", 7, 512, 1, 0.5, 128, 4e-4)
    assert resolve_config(TrainConfig(data="coco", decoder="attention", lr=1e-3)).lr == 1e-3
    assert resolve_config(TrainConfig(data="coco", decoder="attention", blind=True)).out_dir == "models/attention-blind"
    lstm = resolve_config(TrainConfig(data="coco"))
    assert (lstm.out_dir, lstm.num_layers, lstm.lr) == ("models", 2, 1e-3)  # the attention presets stay out

    for cfg, expected in [
        (TrainConfig(decoder="attention", num_layers=2), "--num-layers 2: the attention decoder has one LSTM cell"),
        (TrainConfig(data="sample-spatial", mirror=True), "--mirror"),
        (TrainConfig(data="sample-spatial", decoder="attention", mirror=True), "--mirror"),
        (TrainConfig(decoder="attention", alpha_c=-1.0), "--alpha-c"),
        (TrainConfig(decoder="attention", grid=0), "--grid"),
        (TrainConfig(decoder="transformer"), "--decoder"),
    ]:
        with pytest.raises(TrainingError) as excinfo:
            resolve_config(cfg)
        assert expected in str(excinfo.value) and "\n" not in str(excinfo.value)
    resolve_config(TrainConfig(data="sample-spatial", mirror=False, decoder="attention"))  # no mirror: fine

    out = tmp_path / "out"
    args = ["--decoder", "attention", "--num-layers", "2", "--data-root", str(tmp_path / "nowhere"),
            "--out-dir", str(out)]
    assert train.main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--num-layers 2" in errors[0]
    assert not out.exists()


def test_a_spatial_set_is_never_mirrored_whatever_the_data_name(tmp_path):
    """--mirror on a sample-spatial folder given as --data sample is refused too (told by the set's marker)."""
    make_sample_dataset(tmp_path / "spatial", n_train=4, n_val=2, n_test=1, variant="spatial")
    with pytest.raises(TrainingError, match=r"^--mirror: the captions of .*spatial say left and right"):
        resolve_config(TrainConfig(data="sample", data_root=str(tmp_path / "spatial"), mirror=True))
    assert positional_captions(resolve_config(TrainConfig(data="sample", data_root=str(tmp_path / "spatial"))))
    assert not positional_captions(resolve_config(TrainConfig(data="sample", data_root=str(tmp_path / "none"))))
