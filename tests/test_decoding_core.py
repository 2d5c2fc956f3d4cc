"""decoding.py on its own: a hand-made decoder that is no LSTM and no DecoderRNN, only the three step methods."""

import itertools
import math

import pytest
import torch

import decoding
from decoding import END_ID, START_ID
from model import DecoderRNN

START, END, A, B, C, D = START_ID, END_ID, 2, 3, 4, 5
VOCAB = 6
IMAGE = VOCAB  # the start state: the row of the table before the first word

pytestmark = pytest.mark.usefixtures("one_thread")


class MarkovDecoder:
    """Next-word log-probabilities log_probs[word before the previous one, previous word] (a [S, S, V] table;
    a [S, V] one ignores the word before), row S-1 standing for "no word yet"; its "features" are the start states,
    a LongTensor [B]. Its state is those two words per row, so beam search must follow the beams with
    `reorder_state`. Every row is shifted by a constant (as a model's logits are): searches normalise themselves.
    """

    def __init__(self, log_probs: torch.Tensor):
        self.log_probs = log_probs if log_probs.dim() == 3 else log_probs.expand(log_probs.shape[0], -1, -1)
        self.reorders: list[torch.Tensor] = []

    def init_state(self, features: torch.Tensor, states=None) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            (torch.full_like(features, self.log_probs.shape[0] - 1), features) if states is None else states
        )

    def decode_step(self, tokens: torch.Tensor | None, state: tuple[torch.Tensor, torch.Tensor]):
        before, previous = state if tokens is None else (state[1], tokens)
        return self.log_probs[before, previous] + 0.5 * previous.unsqueeze(1), (before, previous)

    def reorder_state(self, state: tuple[torch.Tensor, torch.Tensor], indices: torch.Tensor):
        self.reorders.append(indices)
        return tuple(rows.index_select(0, indices) for rows in state)


def table(rows: dict[int, dict[int, float]], vocab: int = VOCAB) -> torch.Tensor:
    """Log-probabilities [vocab + 1, vocab] per previous state; unnamed words share the rest evenly."""
    probs = torch.empty(vocab + 1, vocab, dtype=torch.float64)
    for state in range(vocab + 1):
        named = rows.get(state, {})
        rest = (1.0 - sum(named.values())) / (vocab - len(named))
        probs[state] = torch.tensor([named.get(word, rest) for word in range(vocab)])
    return probs.log()


def random_table(seed: int, vocab: int = VOCAB, end_bias: float = 0.0) -> torch.Tensor:
    """A random second-order table [vocab + 1, vocab + 1, vocab] with peaked rows; `end_bias` makes <end> likely
    enough to vary caption lengths."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(vocab + 1, vocab + 1, vocab, generator=generator, dtype=torch.float64)
    logits[..., END] += end_bias
    return logits.log_softmax(-1)


def starts(*states: int) -> torch.Tensor:
    """The MarkovDecoder's "features": its start states."""
    return torch.tensor(states, dtype=torch.long)


def log_prob(decoder: MarkovDecoder, ids: list[int], state: int = IMAGE) -> float:
    """Exact log-probability of the decoder generating `ids` from `state`."""
    total, before = 0.0, decoder.log_probs.shape[0] - 1
    for word in ids:
        total, before, state = total + float(decoder.log_probs[before, state, word]), state, word
    return total


# Greedy takes A (0.55) and ends with A C <end> (0.189); B <end> is more likely (0.427).
TRAP = table({IMAGE: {A: 0.55, B: 0.44}, A: {C: 0.35, D: 0.33, END: 0.31}, B: {END: 0.97}, C: {END: 0.98}})


def test_greedy_is_trapped_where_beam_search_finds_the_better_caption():
    decoder = MarkovDecoder(TRAP)
    assert decoding.greedy_search(decoder, starts(IMAGE)) == [[A, C, END]]
    assert decoding.beam_search(decoder, starts(IMAGE), beam_size=1) == [[A, C, END]]
    assert decoding.beam_search(decoder, starts(IMAGE), beam_size=2) == [[B, END]]
    [hypotheses] = decoding.beam_search(decoder, starts(IMAGE), beam_size=3, top_n=2)
    assert [ids for ids, _ in hypotheses] == [[B, END], [A, C, END]]
    expected = [math.log(0.44 * 0.97), math.log(0.55 * 0.35 * 0.98)]
    assert [s for _, s in hypotheses] == pytest.approx(expected, abs=1e-5)


def test_beam_search_expands_every_image_to_adjacent_beams_first():
    decoder = MarkovDecoder(TRAP)
    decoding.beam_search(decoder, starts(IMAGE, A, B), beam_size=2)
    assert decoder.reorders[0].tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("seed", range(4))
def test_beam_size_one_is_greedy_and_a_batch_is_one_start_at_a_time(seed):
    decoder = MarkovDecoder(random_table(seed, end_bias=3.0))
    states = [IMAGE, START, END, A, B, C, D]
    greedy = decoding.greedy_search(decoder, starts(*states), max_len=8)
    assert len({len(ids) for ids in greedy}) > 1, "the test needs captions of different lengths"
    assert decoding.beam_search(decoder, starts(*states), beam_size=1, max_len=8) == greedy
    for beam_size in (2, 4):
        batched = decoding.beam_search(decoder, starts(*states), beam_size, max_len=8, top_n=beam_size)
        alone = [decoding.beam_search(decoder, starts(s), beam_size, 8, top_n=beam_size)[0] for s in states]
        assert [[ids for ids, _ in r] for r in batched] == [[ids for ids, _ in r] for r in alone]
        for state, ours, theirs in zip(states, batched, alone, strict=True):
            assert [s for _, s in ours] == pytest.approx([s for _, s in theirs], abs=1e-6)
            assert [s for _, s in ours] == pytest.approx(
                [log_prob(decoder, ids, state) for ids, _ in ours], abs=1e-4
            )


def all_captions(vocab: int, max_len: int) -> list[list[int]]:
    """Every caption a search may return: ids up to the first <end> or max_len ids, and a word before <end>."""
    captions = []
    for n in range(1, max_len + 1):
        for ids in itertools.product(range(vocab), repeat=n):
            ended = ids[-1] == END
            if END in ids[:-1] or (not ended and n < max_len):
                continue
            if ended and set(ids[:-1]) <= {START}:  # an empty caption
                continue
            captions.append(list(ids))
    return captions


def test_a_wide_beam_is_exhaustive_search_including_length_penalty():
    vocab, max_len = 5, 4
    decoder = MarkovDecoder(random_table(0, vocab))
    beam_size = (vocab - 1) ** (max_len - 1) * vocab  # never prunes
    captions = all_captions(vocab, max_len)
    for alpha in (0.0, 0.7, 1.5):
        results = decoding.beam_search(decoder, starts(vocab, 2), beam_size, max_len, alpha, top_n=6)
        for start, hypotheses in zip((vocab, 2), results, strict=True):
            best = sorted(captions, key=lambda ids: -log_prob(decoder, ids, start) / len(ids) ** alpha)[:6]
            assert [ids for ids, _ in hypotheses] == best
            assert [s for _, s in hypotheses] == pytest.approx(
                [log_prob(decoder, ids, start) / len(ids) ** alpha for ids in best], abs=1e-4
            )


def test_with_length_penalty_the_search_goes_on_while_a_live_beam_can_still_win():
    # A <end> (0.36) is found first, but A C C C C C (0.18 * 0.99**4) is better per word: 6 ids against 2.
    decoder = MarkovDecoder(table({IMAGE: {A: 0.6, B: 0.39}, A: {END: 0.6, C: 0.3}, C: {C: 0.99}}))
    assert decoding.beam_search(decoder, starts(IMAGE), beam_size=1, max_len=6) == [[A, END]]
    [[(ids, score)]] = decoding.beam_search(decoder, starts(IMAGE), 1, max_len=6, length_penalty=1.0, top_n=1)
    assert ids == [A, C, C, C, C, C]
    assert score == pytest.approx(math.log(0.6 * 0.3 * 0.99**4) / 6, abs=1e-5)


def test_beam_search_reports_only_the_hypotheses_it_found():
    # Three words, <end> ruled out first: after one step only <start> and A exist, fewer than top_n=3.
    [hypotheses] = decoding.beam_search(MarkovDecoder(table({}, vocab=3)), starts(3), 3, max_len=1, top_n=3)
    assert [ids for ids, _ in hypotheses] == [[START], [A]]


def test_sampling_with_top_k_one_is_greedy():
    decoder = MarkovDecoder(random_table(1))
    features = starts(IMAGE, START, A, B, C, D)
    generator = torch.Generator().manual_seed(0)
    sampled = decoding.sample_search(decoder, features, top_k=1, max_len=8, generator=generator)
    assert sampled == decoding.greedy_search(decoder, features, max_len=8)
    assert decoding.sample_search(decoder, features, max_len=8, generator=generator) != sampled


def test_a_seeded_generator_repeats_and_other_seeds_differ():
    decoder = MarkovDecoder(table({}))  # every word equally likely
    features = starts(*[IMAGE] * 20)

    def draw(seed: int) -> list[list[int]]:
        return decoding.sample_search(
            decoder, features, max_len=6, generator=torch.Generator().manual_seed(seed)
        )

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
    assert len({tuple(ids) for ids in draw(0)}) > 10  # flat: the captions of one draw differ too


def test_sampling_follows_the_temperature():
    decoder = MarkovDecoder(TRAP)
    features = starts(*[IMAGE] * 4000)
    cold = decoding.sample_search(
        decoder, features, temperature=0.5, generator=torch.Generator().manual_seed(0)
    )
    # temperature 0.5 squares the probabilities: 0.55**2 / (0.55**2 + 0.44**2) = 0.61
    assert [ids[0] for ids in cold].count(A) / len(cold) == pytest.approx(0.61, abs=0.03)


def test_the_searches_check_their_arguments():
    decoder, features = MarkovDecoder(TRAP), starts(IMAGE)
    with pytest.raises(ValueError, match="max_len must be >= 1, not 0"):
        decoding.greedy_search(decoder, features, max_len=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        decoding.sample_search(decoder, features, temperature=0)
    with pytest.raises(ValueError, match="top_n must be between 1 and beam_size=2"):
        decoding.beam_search(decoder, features, beam_size=2, top_n=3)
    assert decoding.beam_search(decoder, starts(), top_n=1) == decoding.greedy_search(decoder, starts()) == []


def random_decoder_rnn(seed: int = 0) -> DecoderRNN:
    torch.manual_seed(seed)
    decoder = DecoderRNN(12, 20, 30, num_layers=2)
    with torch.no_grad():
        decoder.fc.weight.mul_(6)
        decoder.fc.bias[END_ID] += 0.4
    return decoder.eval()


def test_decoder_rnn_methods_are_the_decoding_functions():
    decoder = random_decoder_rnn()
    features = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))
    assert decoder.greedy_search(features, 12) == decoding.greedy_search(decoder, features, 12)
    assert decoder.beam_search(features, 4, 12, 0.5, top_n=3) == decoding.beam_search(
        decoder, features, 4, 12, 0.5, top_n=3
    )
    sampled = decoder.sample_search(features, 0.8, 5, generator=torch.Generator().manual_seed(2))
    assert sampled == decoding.sample_search(
        decoder, features, 0.8, 5, generator=torch.Generator().manual_seed(2)
    )
    _, states = decoder.step(features)
    tokens = torch.arange(8)
    continued = decoding.greedy_search(decoder, decoder.embed(tokens), 6, states=states)
    assert decoder.greedy_search(decoder.embed(tokens), 6, states=states) == continued
    assert continued != decoding.greedy_search(decoder, decoder.embed(tokens), 6)  # the states were used


def test_decoder_rnn_methods_go_through_decoding(monkeypatch):
    calls = []
    for name in ("greedy_search", "sample_search", "beam_search"):
        monkeypatch.setattr(decoding, name, lambda *args, name=name: calls.append((name, args)) or [[7]])
    decoder, features = random_decoder_rnn(), torch.zeros(1, 12)
    assert decoder.sample(features.view(1, 1, 12)) == [7]
    assert decoder.sample_search(features) == decoder.beam_search(features, 2) == [[7]]
    assert [(name, args[0], args[2:]) for name, args in calls] == [
        ("greedy_search", decoder, (20, END_ID, None)),
        ("sample_search", decoder, (1.0, 0, 20, END_ID, None)),
        ("beam_search", decoder, (2, 20, 0.0, None, END_ID)),
    ]
