"""Numbers elsfast's documentation states about the authors' code (Kambm/convolutional_diffusion, SPEC section 4)
that can be checked without it: the legacy cosine's abar(1), and an emulation of the authors' per-chunk averaging.

The authors' IS, LS and circular ELS modules add, for every chunk of training images their data loader yields,
the chunk's *mean* of exp(logit) (and of exp(logit) * value) under a common stabiliser, where an exact machine
adds the sums. That is a softmax in which every entry of a chunk of n images is weighted 1/n, i.e. whose logits
are lowered by log n. `authors_chunk_mean` below emulates it in a few lines with elsfast's exact reduction
(`ReduceState`), chunk by chunk; the benchmarks/bench_authors_code.py cases run the authors' code itself when it is
on disk. docs/reproduction.md ("The authors' code") cites these results.
"""

import math

import torch
import torch.nn.functional as F

import elsfast
from elsfast import datasets
from elsfast.common import schedules
from elsfast.reduce.state import ReduceState

F64 = torch.float64
N = 200  # training images; the authors' loader yields them in chunks of 64: 64, 64, 64, 8
CHUNK = 64


def test_legacy_cosine_reaches_1_554e_4_at_t_1():
    abar1 = schedules.abar_cosine_legacy(1.0)
    assert f"{abar1:.3e}" == "1.554e-04"
    assert "abar(1) = cos^2(pi/2 / 1.008) = 1.554e-4" in schedules.__doc__


def _ls_logits(x: torch.Tensor, train: torch.Tensor, abar: float, P: int) -> torch.Tensor:
    """LS logits (natural log) `[H*W, 1, N]`: -||x_p - a phi_p||^2 / (2 (1 - abar)), zero-padded P x P patches."""
    d2 = ((x - math.sqrt(abar) * train) ** 2).sum(1, keepdim=True)  # [N, 1, H, W]
    patch_sums = F.unfold(d2, P, padding=P // 2).sum(1)  # [N, H*W]
    return (-patch_sums / (2 * (1 - abar))).T.unsqueeze(1)


def authors_chunk_mean(logits: torch.Tensor, values: torch.Tensor, chunks: list[int], *, mean: bool) -> torch.Tensor:
    """Emulation: merge per-chunk states; with `mean`, each chunk's entries weighted 1 / (its size), as the authors'
    `torch.mean` over a chunk does. `logits` `[G, 1, N]` (natural log), `values` `[G, N, E]` -> `[G, 1, E]`."""
    state, start = None, 0
    for n in chunks:
        part = logits[:, :, start : start + n] - (math.log(n) if mean else 0.0)
        chunk = ReduceState.from_logits(part / math.log(2), values[:, start : start + n])  # logits in bits
        state = chunk if state is None else state.merge_(chunk)
        start += n
    return state.finalize()


def _chunks_of_class(labels: torch.Tensor, label: int | None) -> list[int]:
    """Chunk sizes after the authors' per-chunk class filter (`images[labels == label]`), empty chunks skipped."""
    sizes = [
        int((labels[s : s + CHUNK] == label).sum()) if label is not None else len(labels[s : s + CHUNK])
        for s in range(0, len(labels), CHUNK)
    ]
    return [n for n in sizes if n]


def test_emulated_chunk_averaging_is_wrong_by_up_to_half_a_pixel_range_and_exact_with_one_chunk():
    mnist = datasets.load("mnist-embedded", pad_to=32)
    images, labels = mnist.images[:N], mnist.labels[:N]
    train = images.to(F64) / 127.5 - 1
    exact_machine = elsfast.ScoreMachine(images, labels, machine="ls", padding="zeros", dtype=F64)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for abar in (0.3, 0.7):
        for P in (7, 9):
            clean = mnist.images[1000:1001].to(F64) / 127.5 - 1  # a digit outside the 200
            x = math.sqrt(abar) * clean + math.sqrt(1 - abar) * torch.randn(clean.shape, generator=gen, dtype=F64)
            for label in (None, int(mnist.labels[1000])):
                keep = torch.ones(N, dtype=torch.bool) if label is None else labels == label
                logits, values = _ls_logits(x, train[keep], abar, P), train[keep].reshape(int(keep.sum()), -1)
                values = values.T.unsqueeze(-1)  # [H*W, n, 1]: each pixel's own dictionary (LS)
                exact = authors_chunk_mean(logits, values, [int(keep.sum())], mean=False).reshape(x.shape)
                ref = exact_machine.denoise(x, abar, P, labels=None if label is None else [label])
                torch.testing.assert_close(exact, ref, rtol=0, atol=1e-12)  # the emulation's reduction is exact
                one_chunk = authors_chunk_mean(logits, values, [int(keep.sum())], mean=True).reshape(x.shape)
                torch.testing.assert_close(one_chunk, exact, rtol=0, atol=1e-12)  # one chunk: exact, with labels
                chunked = authors_chunk_mean(logits, values, _chunks_of_class(labels, label), mean=True)
                worst = max(worst, float((chunked.reshape(x.shape) - exact).abs().max()))
            # equal chunks (4 of 50): every weight 1/50, exact again
            logits, values = _ls_logits(x, train, abar, P), train.reshape(N, -1).T.unsqueeze(-1)
            equal = authors_chunk_mean(logits, values, [N // 4] * 4, mean=True).reshape(x.shape)
            exact = authors_chunk_mean(logits, values, [N], mean=False).reshape(x.shape)
            torch.testing.assert_close(equal, exact, rtol=0, atol=1e-12)
    # chunks 64, 64, 64, 8 (and their class-filtered sizes): not "1.5-3%" of anything, but up to half the range
    assert 0.98 < worst < 1.0, worst  # 0.99 (docs/reproduction.md)


def test_valid_dictionary_misses_training_images_in_the_border_ring():
    """The authors' circular ELS (`dictionary="valid"`, which elsfast reproduces) does not return a training
    image at abar -> 1 in the ring of P // 2 pixels along the border, whose wrapped patches are in no training image;
    the paper's dictionary (`"same"`) does, everywhere."""
    train = torch.randint(0, 256, (6, 1, 10, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    phi = train[2:3].to(F64) / 127.5 - 1
    abar, P, r = 1 - 1e-9, 5, 2
    x = math.sqrt(abar) * phi
    ring = torch.ones(10, 10, dtype=torch.bool)
    ring[r:-r, r:-r] = False
    for dictionary in ("valid", "same"):
        m = elsfast.ScoreMachine(train, machine="els", padding="circular", dictionary=dictionary, dtype=F64)
        err = (m.denoise(x, abar, P) - phi).abs()[0, 0]
        assert float(err[~ring].max()) < 1e-6, dictionary
        assert (float(err[ring].max()) > 0.1) == (dictionary == "valid"), dictionary
