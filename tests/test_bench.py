"""The bench's naive reference computes the same margins as the fast lens (so its ratios compare like with like)."""

import torch

import dipreg
from dipreg.bench.core import BenchContext
from dipreg.bench.lens import naive_full_vocab_margins


def test_naive_full_vocabulary_lens_equals_the_two_row_lens(tiny_model, tiny_tokenizer, tiny_pairs):
    fast = dipreg.trajectories(tiny_model, tiny_tokenizer, tiny_pairs, batch_size=3)
    naive = naive_full_vocab_margins(BenchContext(tiny_model, tiny_tokenizer, tiny_pairs, 3, 1))
    torch.testing.assert_close(naive[0::2], fast.margin_a, atol=1e-4, rtol=0)
    torch.testing.assert_close(naive[1::2], fast.margin_b, atol=1e-4, rtol=0)
