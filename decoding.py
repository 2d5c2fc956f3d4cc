"""Greedy, beam and sampled decoding, written once for every caption decoder.

A decoder takes part by implementing three methods (the `StepDecoder` protocol below); nothing else of it is used:

* `init_state(features, states=None) -> state`: the state before the first word, for a batch of images whose
  `features` tensor has the batch as its first dim (an image embedding [B, E] for DecoderRNN; for an attention
  decoder the grid [B, 49, 2048]). `states` continues from states a caller already has (the template's
  `sample(inputs, states)`). The state is whatever the decoder wants: this module never looks inside it.
* `decode_step(tokens, state) -> (logits [N, V], state)`: the next-word logits of every row, given the
  previous words `tokens` (a LongTensor [N]), or `tokens=None` at the first step, when nothing has been emitted
  yet (DecoderRNN then feeds the image embedding it holds in the state). The logits must be a fresh tensor:
  decoding edits them in place (`forbid_empty_caption`).
* `reorder_state(state, indices) -> state`: the rows `indices` (a LongTensor) of the state, in that order. Beam
  search calls it once to expand B images to B*k beams (`indices = arange(B).repeat_interleave(k)`, so the beams
  of one image are adjacent rows) and after every step to follow the beams that survive.

A Show-Attend-Tell decoder whose state is (h, c, the 49x2048 grid) only writes those three methods and gets all
of greedy, beam and sampled decoding. Extra per-step outputs, such as attention weights, can be collected later
through the state (the decoder appends them to it in `decode_step` and `reorder_state` keeps them in step with
the beams); nothing here needs to change for that.

The step returns logits, not log-probabilities: greedy's argmax and sampling's softmax(logits / temperature)
then work on exactly the values the model computes, and normalising (`log_softmax`) is beam search's own job,
the one search that adds scores across steps.

All searches return, per image, the generated ids as the template's `sample()` does: starting with the model's
first prediction (for a trained model that is <start>) and ending with <end> when it was generated, never
before a word other than <start> (`forbid_empty_caption`); `Vocabulary.decode` turns them into words.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

START_ID, END_ID = 0, 1  # fixed by Vocabulary: <start>, <end>, <unk> are ids 0, 1, 2


class StepDecoder(Protocol):
    """What a decoder implements to be decoded by this module (see the module docstring)."""

    def init_state(self, features: torch.Tensor, states: Any = None) -> Any: ...

    def decode_step(self, tokens: torch.Tensor | None, state: Any) -> tuple[torch.Tensor, Any]: ...

    def reorder_state(self, state: Any, indices: torch.Tensor) -> Any: ...


def forbid_empty_caption(logits: torch.Tensor, has_word: torch.Tensor, end_id: int) -> None:
    """Rule out <end> (in place) in the rows [N, V] whose caption has no word yet besides <start>.

    A weakly trained model often finds "<start> <end>" the single most likely sequence; an empty caption is never
    the answer a user wants, and every decoder here (greedy, beam, sampling) follows this one rule.
    """
    logits[:, end_id] = logits[:, end_id].masked_fill(~has_word, float("-inf"))


def cut_at_end(ids: list[int], end_id: int = END_ID) -> list[int]:
    """The ids up to and including the first <end>."""
    return ids[: ids.index(end_id) + 1] if end_id in ids else ids


def top_k_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk` along the last dim whose ties go to the lower index, as argmax does, on every backend.

    topk leaves the order of equal values open; here the selected ones are put in index order, and when the k-th
    value is tied with values left out (rare outside hand-made models) a stable sort of the whole row decides.
    """
    values, indices = scores.topk(k, dim=-1)
    if bool(((scores >= values[..., -1:]).sum(-1) > k).any()):
        values, indices = scores.sort(dim=-1, descending=True, stable=True)
        return values[..., :k], indices[..., :k]
    indices, order = indices.sort(dim=-1)
    values, order = values.gather(-1, order).sort(dim=-1, descending=True, stable=True)
    return values, indices.gather(-1, order)


# ---------------------------------------------------------------------------------------------------------------
# Greedy and sampled decoding: one word per image and step, fed back in
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_search(
    decoder: StepDecoder, features: torch.Tensor, max_len: int = 20, end_id: int = END_ID, states: Any = None
) -> list[list[int]]:
    """Most likely next word at every step, for a batch of images; ties go to the lower id."""
    return _generate(decoder, features, _most_likely, max_len, end_id, states)


@torch.no_grad()
def sample_search(
    decoder: StepDecoder,
    features: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    max_len: int = 20,
    end_id: int = END_ID,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Random captions for diversity: each word drawn from softmax(logits / temperature), optionally only
    among the `top_k` most likely words (0: all). `generator` (on the features' device) makes it repeatable."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, not {temperature}")
    draw = functools.partial(_draw, temperature=temperature, top_k=top_k, generator=generator)
    return _generate(decoder, features, draw, max_len, end_id)


def _most_likely(logits: torch.Tensor) -> torch.Tensor:
    """Greedy's pick: the id of the largest logit per row (the lowest such id on ties)."""
    return logits.argmax(-1)


def _draw(
    logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Sampling's pick: one id per row from softmax(logits / temperature), among the top_k best when top_k > 0."""
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


def _generate(
    decoder: StepDecoder,
    features: torch.Tensor,
    pick: Callable[[torch.Tensor], torch.Tensor],
    max_len: int,
    end_id: int,
    states: Any = None,
) -> list[list[int]]:
    """Feed each picked word back in until every sequence has emitted <end> or `max_len` ids (which count the
    <start> a trained model emits first, and the <end>: at most max_len - 1 words)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, not {max_len}")
    state, tokens, words = decoder.init_state(features, states), None, []
    finished = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    has_word = torch.zeros_like(finished)
    for _ in range(max_len):
        logits, state = decoder.decode_step(tokens, state)
        forbid_empty_caption(logits, has_word, end_id)
        word = pick(logits)
        words.append(word)
        finished |= word == end_id
        has_word |= word != START_ID
        if bool(finished.all()):  # the one host sync per step
            break
        tokens = word
    return [cut_at_end(ids, end_id) for ids in torch.stack(words, 1).tolist()]


# ---------------------------------------------------------------------------------------------------------------
# Beam search: all images and beams in one tensor program
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Live:
    """The live beams of every image: running log-probabilities [B, k] (-inf: not started), ids [B, k, max_len]
    and whether each caption has a word besides <start> [B*k] (rows in the decoder state's order)."""

    scores: torch.Tensor
    ids: torch.Tensor
    has_word: torch.Tensor


@dataclass
class _Pool:
    """The finished hypotheses of every image, best first: ranking scores [B, k] (-inf: none), ids
    [B, k, max_len] and lengths [B, k]."""

    scores: torch.Tensor
    ids: torch.Tensor
    lengths: torch.Tensor


@dataclass
class _Candidates:
    """One step's 2k best extensions per image [B, 2k], best first: score, beam extended, word, ids so far,
    has-a-word, emitted <end>."""

    scores: torch.Tensor
    beam: torch.Tensor
    word: torch.Tensor
    ids: torch.Tensor
    has_word: torch.Tensor
    ended: torch.Tensor


@torch.no_grad()
def beam_search(
    decoder: StepDecoder,
    features: torch.Tensor,
    beam_size: int = 3,
    max_len: int = 20,
    length_penalty: float = 0.0,
    top_n: int | None = None,
    end_id: int = END_ID,
) -> list[list[int]] | list[list[tuple[list[int], float]]]:
    """Beam search over a batch of images: all images and beams in one tensor program.

    A hypothesis is ranked by its log-probability divided by len**length_penalty, len counting its ids
    (<end> included). The default 0 ranks by plain log-probability, as Show and Tell's beam search does; with it
    beam_size=1 gives exactly `greedy_search`. Larger values favour longer captions.

    Every step extends the live beams by every word and keeps the 2*beam_size best candidates; those among the
    best beam_size that end with <end> move to a pool of finished hypotheses (the beam_size best are kept), the
    beam_size best others stay live. At `max_len` the best candidates are finished as they are. An image is
    done when no live beam can still beat the worst finished one; the loop stops when all images are done.
    Equal scores go to the higher-ranked beam, then to the lower word id (as argmax does). The host waits on
    the device twice per step (the tie check in `top_k_first` and the stop test), not per image.

    Returns per image the best id sequence; with `top_n` (<= beam_size) a list of up to top_n
    (ids, score) pairs, best first, where score is the ranking score above.
    """
    _check_beam_arguments(beam_size, max_len, length_penalty, top_n)
    batch, k, device = features.shape[0], beam_size, features.device
    if batch == 0:  # as greedy_search: no images, no captions
        return []
    # Beams of one image are adjacent rows. Only beam 0 is live at first, so the beams do not start as copies.
    rows = torch.arange(batch, device=device).repeat_interleave(k)
    state, tokens = decoder.reorder_state(decoder.init_state(features), rows), None
    live, pool = _start_beams(batch, k, max_len, end_id, device)
    for t in range(max_len):
        logits, state = decoder.decode_step(tokens, state)
        log_probs = logits.float().log_softmax(-1)
        forbid_empty_caption(log_probs, live.has_word, end_id)
        candidates = _extend(live, log_probs.view(batch, k, -1), t, end_id)
        last = t == max_len - 1
        pool = _merge_finished(pool, candidates, t + 1, last, length_penalty)
        if last:
            break
        live, rows, tokens = _select_live(candidates)
        state = decoder.reorder_state(state, rows)
        if _all_done(pool, live, max_len, length_penalty):
            break
    return _beam_results(pool, top_n)


def _check_beam_arguments(beam_size: int, max_len: int, length_penalty: float, top_n: int | None) -> None:
    """Refuse arguments beam search cannot honour, before any work."""
    if beam_size < 1 or max_len < 1:
        raise ValueError(f"beam_size and max_len must be >= 1, not {beam_size} and {max_len}")
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0, not {length_penalty}")
    if top_n is not None and not 1 <= top_n <= beam_size:
        raise ValueError(f"top_n must be between 1 and beam_size={beam_size}, not {top_n}")


def _start_beams(batch: int, k: int, max_len: int, end_id: int, device: torch.device) -> tuple[_Live, _Pool]:
    """Before the first word: beam 0 of each image live with score 0, the others not started; nothing finished."""
    minus_inf = float("-inf")
    live_scores = torch.full((batch, k), minus_inf, device=device)
    live_scores[:, 0] = 0.0
    live = _Live(
        scores=live_scores,
        ids=torch.full((batch, k, max_len), end_id, dtype=torch.long, device=device),
        has_word=torch.zeros((batch * k), dtype=torch.bool, device=device),
    )
    pool = _Pool(
        scores=torch.full((batch, k), minus_inf, device=device),
        ids=torch.full((batch, k, max_len), end_id, dtype=torch.long, device=device),
        lengths=torch.zeros((batch, k), dtype=torch.long, device=device),
    )
    return live, pool


def _extend(live: _Live, log_probs: torch.Tensor, t: int, end_id: int) -> _Candidates:
    """The 2k best extensions per image of the live beams by one word (log_probs [B, k, V]), at step `t`."""
    (batch, k, vocab_size), max_len = log_probs.shape, live.ids.shape[-1]
    scores, index = top_k_first((live.scores.unsqueeze(-1) + log_probs).view(batch, -1), 2 * k)
    beam, word = index // vocab_size, index % vocab_size
    ids = live.ids.gather(1, beam.unsqueeze(-1).expand(-1, -1, max_len))
    ids[:, :, t] = word
    has_word = live.has_word.view(batch, k).gather(1, beam) | (word != START_ID)
    return _Candidates(scores, beam, word, ids, has_word, ended=word == end_id)


def _merge_finished(
    pool: _Pool, candidates: _Candidates, length: int, last: bool, length_penalty: float
) -> _Pool:
    """The pool with this step's finished candidates merged in, the k best kept.

    Finished are the best k candidates that emitted <end>, or all best k at the last step; earlier finished
    hypotheses go first on equal scores.
    """
    k = pool.scores.shape[1]
    rank = torch.arange(2 * k, device=pool.scores.device)
    finishing = (rank < k) & (candidates.ended | last)
    new_scores = torch.where(finishing, candidates.scores / length**length_penalty, float("-inf"))
    scores, keep = torch.cat((pool.scores, new_scores), 1).sort(dim=1, descending=True, stable=True)
    scores, keep = scores[:, :k], keep[:, :k]
    max_len = pool.ids.shape[-1]
    ids = torch.cat((pool.ids, candidates.ids), 1).gather(1, keep.unsqueeze(-1).expand(-1, -1, max_len))
    lengths = torch.cat((pool.lengths, torch.full_like(new_scores, length, dtype=torch.long)), 1)
    return _Pool(scores, ids, lengths.gather(1, keep))


def _select_live(candidates: _Candidates) -> tuple[_Live, torch.Tensor, torch.Tensor]:
    """The best k candidates per image that did not emit <end>, as the new live beams; plus the rows of the
    decoder state they continue ([B*k], for `reorder_state`) and their last words (the next step's tokens)."""
    batch, k = candidates.scores.shape[0], candidates.scores.shape[1] // 2
    rank = torch.arange(2 * k, device=candidates.scores.device)
    live = torch.argsort(rank + candidates.ended * 2 * k, dim=1, stable=True)[:, :k]
    beams = _Live(
        scores=candidates.scores.gather(1, live),
        ids=candidates.ids.gather(1, live.unsqueeze(-1).expand(-1, -1, candidates.ids.shape[-1])),
        has_word=candidates.has_word.gather(1, live).view(-1),
    )
    first_row = torch.arange(batch, device=live.device).unsqueeze(1) * k  # of each image's beams
    rows = (first_row + candidates.beam.gather(1, live)).view(-1)
    return beams, rows, candidates.word.gather(1, live).view(-1)


def _all_done(pool: _Pool, live: _Live, max_len: int, length_penalty: float) -> bool:
    """Whether no live beam of any image can still beat that image's worst finished hypothesis.

    A live score only falls as words are added; divided by the longest length it is an upper bound.
    """
    best_possible = live.scores.max(1).values / max_len**length_penalty
    return bool((pool.scores[:, -1] >= best_possible).all())


def _beam_results(pool: _Pool, top_n: int | None) -> list[list[int]] | list[list[tuple[list[int], float]]]:
    """Per image the best id sequence, or with `top_n` its up to top_n (ids, score) pairs found, best first."""
    scores, ids, lengths = pool.scores.tolist(), pool.ids.tolist(), pool.lengths.tolist()
    if top_n is None:
        return [ids[b][0][: lengths[b][0]] for b in range(len(ids))]
    return [
        [(ids[b][j][: lengths[b][j]], scores[b][j]) for j in range(top_n) if scores[b][j] > float("-inf")]
        for b in range(len(ids))
    ]
