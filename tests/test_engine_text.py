"""Incremental detokenisation and stop strings (real tokenizer of the tiny model), and per-row sampling."""

from __future__ import annotations

import pytest
import torch

from server.engine.sampling import make_generator, sample_batch
from server.engine.text import IncrementalText
from server.engine.types import SamplingParams

WORDS = ["what", "is", "this", "digit", "?", "7", "user", ":"]


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny.processor.tokenizer


def run(tok, stop=(), extra=()):
    text = IncrementalText(tok, tuple(stop))
    deltas = [text.push(i) for i in tok.convert_tokens_to_ids(WORDS) + list(extra)]
    return deltas, text


def test_deltas_concatenate_to_the_full_decode(tok):
    deltas, text = run(tok, extra=[2, 0])  # EOS and pad are special: they add no text
    assert "".join(deltas) + text.flush() == tok.decode(
        tok.convert_tokens_to_ids(WORDS), skip_special_tokens=True
    )
    assert all(d for d in deltas[: len(WORDS)])  # a word-level tokenizer yields text at every token


def test_stop_string_cuts_the_text_and_holds_back_its_prefix(tok):
    deltas, text = run(tok, stop=["digit ?"])
    assert text.stopped
    assert "".join(deltas) + text.flush() == "what is this "
    assert "digit" not in "".join(deltas)


def test_no_stop_string_means_nothing_is_held_back(tok):
    deltas, text = run(tok)
    assert text.flush() == ""
    assert not text.stopped


def test_greedy_rows_take_the_argmax_and_seeded_rows_repeat():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    greedy, sampled = SamplingParams(), SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    params = [greedy, sampled, sampled]
    first = sample_batch(logits, params, [make_generator(p, torch.device("cpu")) for p in params])
    again = sample_batch(logits, params, [make_generator(p, torch.device("cpu")) for p in params])
    assert first[0] == int(logits[0].argmax())
    assert first == again
    assert make_generator(greedy, torch.device("cpu")) is None


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[10.0, 9.0, -10.0, -10.0]])
    params = [SamplingParams(temperature=1.0, top_p=0.5, seed=1)]
    picks = {
        sample_batch(logits, params, [make_generator(params[0], torch.device("cpu"))])[0] for _ in range(1)
    }
    gen = make_generator(params[0], torch.device("cpu"))
    picks |= {sample_batch(logits, params, [gen])[0] for _ in range(50)}
    assert picks == {0}  # token 0 alone holds > 50 % of the mass
