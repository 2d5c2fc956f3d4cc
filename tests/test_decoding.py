"""Greedy, beam and sampled decoding on hand-built decoders whose sequence probabilities are known exactly."""

import itertools
import math

import pytest
import torch

from model import END_ID, DecoderRNN, top_k_first

START, END, A, B, C, D = 0, 1, 2, 3, 4, 5
VOCAB = 6
IMAGE = VOCAB  # the state before the first word


def table(rows: dict[int, dict[int, float]], vocab: int = VOCAB) -> torch.Tensor:
    """Next-word log-probabilities [vocab + 1, vocab] per previous state; unnamed words share the rest evenly."""
    log_probs = torch.empty(vocab + 1, vocab, dtype=torch.float64)
    for state in range(vocab + 1):
        named = rows.get(state, {})
        rest = (1.0 - sum(named.values())) / (vocab - len(named))
        assert rest > 0
        log_probs[state] = torch.tensor([math.log(named.get(w, rest)) for w in range(vocab)])
    return log_probs


def markov_decoder(log_probs: torch.Tensor) -> DecoderRNN:
    """A real DecoderRNN whose next-word distribution depends on the previous word only: log_probs[previous].

    Embeddings are one-hot; the LSTM's input and output gates are saturated open and its forget gate shut, so the
    cell holds the current input and h = tanh(1) * one-hot(previous); `fc` reads the row of the table.
    Image "features" are one-hot too: one-hot(IMAGE) starts from the table's image row.
    """
    states, vocab = log_probs.shape
    decoder = DecoderRNN(states, states, vocab)
    eye = torch.eye(states)
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.zero_()
        decoder.lstm.weight_ih_l0[2 * states : 3 * states] = 200 * eye  # cell input tanh(200 x) = x
        decoder.lstm.bias_ih_l0[:states] = 200  # input gate open
        decoder.lstm.bias_ih_l0[states : 2 * states] = -200  # forget gate shut
        decoder.lstm.bias_ih_l0[3 * states :] = 200  # output gate open
        decoder.embed.weight.copy_(eye[:vocab])
        decoder.fc.weight.copy_((log_probs.T / math.tanh(1)).float())
    return decoder.eval()


def start_from(*states: int) -> torch.Tensor:
    """Features that make the decoders above start in the given states."""
    return torch.eye(VOCAB + 1)[list(states)]


def log_prob(log_probs: torch.Tensor, ids: list[int], state: int = IMAGE) -> float:
    """Exact log-probability of generating `ids` from `state`."""
    total = 0.0
    for word in ids:
        total += float(log_probs[state, word])
        state = word
    return total


# Greedy takes A (0.55) and ends with A C <end> (0.189); B <end> is more likely (0.427).
TRAP_ROWS = {IMAGE: {A: 0.55, B: 0.44}, A: {C: 0.35, D: 0.33, END: 0.31}, B: {END: 0.97}, C: {END: 0.98}}
TRAP = table(TRAP_ROWS)


def random_decoder(seed: int, num_layers: int = 1, end_bias: float = 0.3, vocab: int = 30) -> DecoderRNN:
    """A random decoder with peaked distributions; `end_bias` makes <end> likely enough to vary caption lengths."""
    torch.manual_seed(seed)
    decoder = DecoderRNN(12, 20, vocab, num_layers)
    with torch.no_grad():
        decoder.fc.weight.mul_(6)
        decoder.fc.bias[END_ID] += end_bias
    return decoder.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


def test_markov_decoder_reproduces_its_table():
    decoder = markov_decoder(TRAP)
    logits, states = decoder.step(start_from(IMAGE, A, B))
    assert torch.allclose(logits.log_softmax(-1).double(), TRAP[[IMAGE, A, B]], atol=1e-5)
    logits, _ = decoder.step(decoder.embed(torch.tensor([C, D, B])), states)  # the state no longer matters
    assert torch.allclose(logits.log_softmax(-1).double(), TRAP[[C, D, B]], atol=1e-5)


def test_greedy_is_trapped_and_beam_search_finds_the_better_caption():
    decoder = markov_decoder(TRAP)
    features = start_from(IMAGE)
    assert decoder.greedy_search(features) == [[A, C, END]]  # 0.55 * 0.35 * 0.98 = 0.189
    assert decoder.beam_search(features, beam_size=1) == [[A, C, END]]
    for beam_size in (2, 3):
        assert decoder.beam_search(features, beam_size=beam_size) == [[B, END]]  # 0.44 * 0.97 = 0.427
    assert decoder.beam_search(features) == [[B, END]]  # the default width, 3, is a real beam
    (best, best_score), (second, second_score) = decoder.beam_search(features, beam_size=2, top_n=2)[0]
    assert (best, second) == ([B, END], [A, C, END])
    assert best_score == pytest.approx(math.log(0.44 * 0.97), abs=1e-5)
    assert second_score == pytest.approx(math.log(0.55 * 0.35 * 0.98), abs=1e-5)


def test_beam_search_agrees_with_exhaustive_search_including_length_penalty():
    torch.manual_seed(0)
    vocab, max_len = 5, 4  # words: 0 <start>, 1 <end>, 2, 3, 4
    log_probs = (3 * torch.randn(vocab + 1, vocab, dtype=torch.float64)).log_softmax(-1)
    decoder = markov_decoder(log_probs)
    features = torch.eye(vocab + 1)[[vocab, 2]]  # from the image, and from word 2
    candidates = [
        list(ids) + [END] for n in range(max_len) for ids in itertools.product([0, 2, 3, 4], repeat=n)
    ]
    candidates += [list(ids) for ids in itertools.product([0, 2, 3, 4], repeat=max_len)]  # never end
    candidates = [ids for ids in candidates if set(ids) - {START, END} or ids[-1] != END]  # no empty caption
    beam_size = 4 ** (max_len - 1) * vocab  # wide enough to never prune: the search becomes exhaustive
    for alpha in (0.0, 0.7, 1.5):
        results = decoder.beam_search(features, beam_size, max_len, length_penalty=alpha, top_n=5)
        for start, result in zip((vocab, 2), results, strict=True):
            scored = sorted((log_prob(log_probs, ids, start) / len(ids) ** alpha, ids) for ids in candidates)
            expected = scored[::-1][:5]
            assert [ids for ids, _ in result] == [ids for _, ids in expected]
            assert [s for _, s in result] == pytest.approx([s for s, _ in expected], abs=1e-4)


def test_length_penalty_can_prefer_the_longer_caption():
    log_probs = table({IMAGE: {A: 0.5, B: 0.45}, A: {END: 0.8}, B: {C: 0.95}, C: {D: 0.95}, D: {END: 0.95}})
    decoder = markov_decoder(log_probs)
    features = start_from(IMAGE)
    assert decoder.beam_search(features, beam_size=3) == [[A, END]]  # 0.4 > 0.386
    assert decoder.beam_search(features, beam_size=3, length_penalty=1.0) == [[B, C, D, END]]
    [[(ids, score)]] = decoder.beam_search(features, beam_size=3, length_penalty=1.0, top_n=1)
    assert score == pytest.approx(math.log(0.45 * 0.95**3) / 4, abs=1e-5)
    assert ids == [B, C, D, END]


def test_with_length_penalty_the_search_goes_on_while_a_live_beam_can_still_win():
    # A <end> (0.36) is found first, but A C C C C C (0.18 * 0.99**4) is better per word: 6 ids against 2.
    decoder = markov_decoder(table({IMAGE: {A: 0.6, B: 0.39}, A: {END: 0.6, C: 0.3}, C: {C: 0.99}}))
    features = start_from(IMAGE)
    assert (
        decoder.beam_search(features, beam_size=1, max_len=6) == [[A, END]] == decoder.greedy_search(features)
    )
    [[(ids, score)]] = decoder.beam_search(features, beam_size=1, max_len=6, length_penalty=1.0, top_n=1)
    assert ids == [A, C, C, C, C, C]
    assert score == pytest.approx(math.log(0.6 * 0.3 * 0.99**4) / 6, abs=1e-5)


def test_ties_go_to_the_lower_word_id():
    # Four equally likely first words: beam width 1 sees a tie at its cut-off (2 candidates out of 4).
    log_probs = table(
        {IMAGE: {A: 0.24, B: 0.24, C: 0.24, D: 0.24}, A: {END: 0.9}, B: {END: 0.9}, C: {END: 0.9}}
    )
    decoder = markov_decoder(log_probs)
    features = start_from(IMAGE)
    assert decoder.greedy_search(features) == [[A, END]]
    assert decoder.beam_search(features, beam_size=1) == [[A, END]]
    result = decoder.beam_search(features, beam_size=3, top_n=3)[0]
    assert [ids for ids, _ in result] == [[A, END], [B, END], [C, END]]
    assert result[0][1] == result[1][1] == result[2][1]


def test_top_k_first_matches_a_stable_sort_on_rows_full_of_ties():
    generator = torch.Generator().manual_seed(0)
    for k, levels in ((1, 3), (4, 5), (6, 40), (6, 100000)):
        scores = torch.randint(0, levels, (50, 300), generator=generator).float()
        scores[::7, ::3] = float("-inf")
        values, indices = top_k_first(scores, k)
        expected_values, expected_indices = scores.sort(dim=-1, descending=True, stable=True)
        assert torch.equal(values, expected_values[:, :k])
        assert torch.equal(indices, expected_indices[:, :k])


def test_no_decoder_returns_an_empty_caption():
    # "<end>" (0.6) and "<start> <end>" (0.3 * 0.5) are the likeliest sequences, but a caption needs a word:
    # the best one with a word is <start> B <end> (0.3 * 0.3 * 0.9), then A <end> (0.02 * 0.9 = 0.018).
    log_probs = table({IMAGE: {END: 0.6, START: 0.3}, START: {END: 0.5, B: 0.3}, A: {END: 0.9}, B: {END: 0.9}})
    decoder = markov_decoder(log_probs)
    features = start_from(IMAGE, IMAGE)
    assert decoder.greedy_search(features) == [[START, B, END]] * 2
    assert decoder.sample(features[:1].view(1, 1, -1)) == [START, B, END]
    assert decoder.beam_search(features, beam_size=1) == [[START, B, END]] * 2
    (ids, score), (second, _) = decoder.beam_search(features, beam_size=3, top_n=2)[0]
    assert ids == [START, B, END] and score == pytest.approx(log_prob(log_probs, ids), abs=1e-5)
    assert second[-1] == END and any(word not in (START, END) for word in second)
    drawn = decoder.sample_search(start_from(*[IMAGE] * 500), generator=torch.Generator().manual_seed(0))
    assert all(any(word not in (START, END) for word in ids) for ids in drawn if ids[-1] == END)


def test_a_caption_that_never_ends_stops_at_max_len():
    log_probs = table({IMAGE: {A: 0.9}, A: {B: 0.9}, B: {A: 0.9}})
    decoder = markov_decoder(log_probs)
    features = start_from(IMAGE)
    assert decoder.greedy_search(features, max_len=5) == [[A, B, A, B, A]]
    [[(ids, score)]] = decoder.beam_search(features, beam_size=3, max_len=5, top_n=1)
    assert ids == [A, B, A, B, A] and score == pytest.approx(5 * math.log(0.9), abs=1e-5)
    assert decoder.beam_search(features, beam_size=2, max_len=1) == [[A]]
    assert decoder.greedy_search(features, max_len=1) == [[A]]
    generator = torch.Generator().manual_seed(0)
    drawn = decoder.sample_search(start_from(*[IMAGE] * 200), max_len=5, generator=generator)
    assert max(len(ids) for ids in drawn) == 5 and all(ids[-1] == END for ids in drawn if len(ids) < 5)


def test_beam_search_never_reports_hypotheses_it_did_not_find():
    # Three words, <end> ruled out first: after one step only <start> and A exist, fewer than top_n=3.
    decoder = markov_decoder(table({}, vocab=3))
    [result] = decoder.beam_search(torch.eye(4)[[3]], beam_size=3, max_len=1, top_n=3)
    assert [ids for ids, _ in result] == [[START], [A]]
    assert [score for _, score in result] == pytest.approx([math.log(1 / 3)] * 2, abs=1e-5)


def test_every_decoder_ends_the_caption_at_the_end_id_it_is_given():
    decoder = markov_decoder(TRAP)
    features = start_from(IMAGE)
    assert decoder.greedy_search(features, end_id=C) == [[A, C]]  # not A C <end>
    assert decoder.beam_search(features, beam_size=1, end_id=C) == [[A, C]]
    assert decoder.sample_search(features, top_k=1, end_id=C) == [[A, C]]


def test_greedy_search_and_sample_continue_from_the_states_they_are_given():
    """The template's `sample(inputs, states)`: decoding from the states after a first step continues the caption
    that decoding from the image gives (a random LSTM, whose states matter)."""
    decoder = random_decoder(seed=0, num_layers=2, end_bias=0.4)
    features = torch.randn(10, 12, generator=torch.Generator().manual_seed(1))
    captions = decoder.greedy_search(features, max_len=12)
    _, states = decoder.step(features)
    first = torch.tensor([ids[0] for ids in captions])
    continued = decoder.greedy_search(decoder.embed(first), max_len=11, states=states)
    long = [i for i, ids in enumerate(captions) if len(ids) > 2]  # the continuation may not end at once
    assert len(long) >= 3
    assert [continued[i] for i in long] == [captions[i][1:] for i in long]
    i = max(long, key=lambda i: len(set(captions[i])))  # a caption of several words, not one repeated
    one = (states[0][:, i : i + 1].contiguous(), states[1][:, i : i + 1].contiguous())
    assert decoder.sample(decoder.embed(first[i : i + 1]).view(1, 1, -1), one, max_len=11) == captions[i][1:]


def test_a_batch_of_mixed_lengths_equals_one_image_at_a_time():
    log_probs = table({**TRAP_ROWS, END: {A: 0.5}, START: {START: 0.8}})
    decoder = markov_decoder(log_probs)
    states = [IMAGE, A, B, C, END, START]
    features = start_from(*states)
    greedy = decoder.greedy_search(features, max_len=6)
    # From B and C, <end> (0.97, 0.98) may not come first: the tie between the other words goes to <start>.
    assert greedy == [[A, C, END], [C, END], [START] * 6, [START] * 6, [A, C, END], [START] * 6]
    assert greedy == [decoder.greedy_search(start_from(s), max_len=6)[0] for s in states]
    for beam_size in (1, 2, 3):
        batched = decoder.beam_search(features, beam_size, max_len=6, top_n=beam_size)
        alone = [decoder.beam_search(start_from(s), beam_size, max_len=6, top_n=beam_size)[0] for s in states]
        assert [[ids for ids, _ in r] for r in batched] == [[ids for ids, _ in r] for r in alone]
        for state, ours, theirs in zip(states, batched, alone, strict=True):
            assert [s for _, s in ours] == pytest.approx([s for _, s in theirs], abs=1e-5)
            assert [s for _, s in ours] == pytest.approx(
                [log_prob(log_probs, ids, state) for ids, _ in ours], abs=1e-4
            )


@pytest.mark.parametrize(("num_layers", "seed", "end_bias"), [(1, 3, 0.3), (2, 0, 0.4)])
def test_random_decoders_batched_equals_single_and_beam_one_equals_greedy(num_layers, seed, end_bias):
    decoder = random_decoder(seed, num_layers, end_bias)
    features = torch.randn(10, 12, generator=torch.Generator().manual_seed(1))
    greedy = decoder.greedy_search(features, max_len=12)
    assert len({len(ids) for ids in greedy}) > 1, "the test needs captions of different lengths"
    assert any(ids[-1] == END_ID for ids in greedy)
    assert decoder.beam_search(features, beam_size=1, max_len=12) == greedy
    assert [decoder.sample(f.view(1, 1, -1), max_len=12) for f in features] == greedy
    beam = decoder.beam_search(features, beam_size=4, max_len=12)
    assert beam == [decoder.beam_search(f.unsqueeze(0), beam_size=4, max_len=12)[0] for f in features]
    # The scores beam search reports are the model's log-probabilities of the captions it returns.
    scored = decoder.beam_search(features, beam_size=4, max_len=12, top_n=4)
    for hypotheses, f in zip(scored, features, strict=True):
        assert [score for _, score in hypotheses] == pytest.approx(
            [sequence_log_prob(decoder, f, ids) for ids, _ in hypotheses], abs=1e-4)


def sequence_log_prob(decoder: DecoderRNN, features: torch.Tensor, ids: list[int]) -> float:
    """Log-probability of `ids` under teacher forcing (the training path, not the decoding code)."""
    with torch.no_grad():
        logits = decoder(features.unsqueeze(0), torch.tensor([ids + [0]]))[0, : len(ids)]
    return float(logits.log_softmax(-1).gather(1, torch.tensor(ids).unsqueeze(1)).sum())


def test_sample_is_greedy_search_of_one_image():
    decoder = random_decoder(seed=3, num_layers=2)
    features = torch.randn(1, 12)
    assert decoder.sample(features.view(1, 1, 12)) == decoder.greedy_search(features)[0]
    assert all(isinstance(i, int) for i in decoder.sample(features.view(1, 1, 12)))


def test_sampling_follows_the_distribution_and_is_repeatable():
    decoder = markov_decoder(TRAP)
    features = start_from(*[IMAGE] * 4000)
    first = [ids[0] for ids in decoder.sample_search(features, generator=torch.Generator().manual_seed(0))]
    assert first.count(A) / len(first) == pytest.approx(0.55, abs=0.03)
    assert first.count(B) / len(first) == pytest.approx(0.44, abs=0.03)
    # temperature 0.5 squares the probabilities: 0.55**2 / (0.55**2 + 0.44**2) = 0.61
    cold = decoder.sample_search(features, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert [ids[0] for ids in cold].count(A) / len(cold) == pytest.approx(0.61, abs=0.03)
    two = decoder.sample_search(features, top_k=2, generator=torch.Generator().manual_seed(0))
    assert {ids[0] for ids in two} == {A, B}
    everything = decoder.sample_search(features[:50], top_k=100, generator=torch.Generator().manual_seed(3))
    assert everything == decoder.sample_search(features[:50], generator=torch.Generator().manual_seed(3))
    again = decoder.sample_search(features[:50], generator=torch.Generator().manual_seed(7))
    assert again == decoder.sample_search(features[:50], generator=torch.Generator().manual_seed(7))
    assert decoder.sample_search(features[:5], top_k=1) == decoder.greedy_search(features[:5])


def test_bad_arguments_are_refused():
    decoder = markov_decoder(TRAP)
    features = start_from(IMAGE)
    with pytest.raises(ValueError, match="top_n"):
        decoder.beam_search(features, beam_size=2, top_n=3)
    with pytest.raises(ValueError, match="beam_size"):
        decoder.beam_search(features, beam_size=0)
    with pytest.raises(ValueError, match="length_penalty"):
        decoder.beam_search(features, length_penalty=-1)
    with pytest.raises(ValueError, match="temperature"):
        decoder.sample_search(features, temperature=0)
    with pytest.raises(ValueError, match="beam_size and max_len must be >= 1"):
        decoder.beam_search(features, max_len=0)
    for decode in (decoder.greedy_search, decoder.sample_search):
        with pytest.raises(ValueError, match="max_len must be >= 1, not 0"):
            decode(features, max_len=0)


def test_no_images_give_no_captions():
    decoder = random_decoder(0)
    none = torch.zeros(0, 12)
    assert decoder.greedy_search(none) == []
    assert decoder.beam_search(none, beam_size=3) == []
    assert decoder.beam_search(none, beam_size=3, top_n=2) == []
    assert decoder.sample_search(none) == []
