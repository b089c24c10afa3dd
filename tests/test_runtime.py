"""Devices, mixed precision and seed derivation: no silent fallback, streams that never collide."""

import contextlib
import itertools

import pytest
import torch
from torch import nn

from dmae.runtime import autocast, derive_seed, module_device, resolve_device, use_bf16


def test_derive_seed_is_a_pure_function_of_its_arguments():
    assert derive_seed(0, 1, 2, 3) == derive_seed(0, 1, 2, 3)
    base = derive_seed(7, 10, 20, 30)
    # changing any one argument changes the seed
    assert (
        len(
            {
                base,
                derive_seed(8, 10, 20, 30),
                derive_seed(7, 11, 20, 30),
                derive_seed(7, 10, 21, 30),
                derive_seed(7, 10, 20, 31),
            }
        )
        == 5
    )
    # the keys are ordered and their count matters: no (a, b) / (b, a) or trailing-zero collisions
    assert derive_seed(7, 1, 2) != derive_seed(7, 2, 1)
    assert len({derive_seed(7), derive_seed(7, 0), derive_seed(7, 0, 0)}) == 3
    # the seed's own value and the first key are not interchangeable either
    assert derive_seed(1, 2) != derive_seed(2, 1)


def test_derive_seed_has_no_collisions_on_a_grid():
    grid = [(s, a, b, c) for s, a, b, c in itertools.product(range(3), range(20), range(10), range(6))]
    seeds = [derive_seed(*args) for args in grid]
    assert len(set(seeds)) == len(grid) == 3600
    assert all(0 <= s < 2**63 for s in seeds)
    assert max(seeds) > 2**62  # the values spread over the whole 63-bit range, not just small integers


def test_derive_seed_takes_negative_and_huge_integers():
    s = derive_seed(-1, -5, 2**70)
    assert 0 <= s < 2**63
    assert derive_seed(-1, -5, 2**70) == s
    assert derive_seed(-1, -5, 2**70 + 1) != s
    torch.Generator().manual_seed(s)  # accepted


def test_module_device():
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu")

    class BufferOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.ones(1, device="meta"))

    assert module_device(BufferOnly()) == torch.device("meta")  # the buffer's device, not a default
    with pytest.raises(ValueError, match="ReLU has no parameters or buffers to tell its device; pass device="):
        module_device(nn.ReLU())


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="--device 'cuda' asked for, but PyTorch sees no CUDA device"):
            resolve_device("cuda")
        with pytest.raises(RuntimeError, match="'cuda:1'"):
            resolve_device("cuda:1", local_rank=1)
    else:
        assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    with pytest.raises(RuntimeError):
        resolve_device("gpu")  # not a device name torch knows


def test_precision():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not use_bf16(cpu, "auto")
    assert use_bf16(cuda, "auto")
    assert use_bf16(cpu, "bf16")
    assert not use_bf16(cuda, "fp32")
    with pytest.raises(ValueError, match="precision must be auto, bf16 or fp32, got 'fp16'"):
        use_bf16(cpu, "fp16")
    with pytest.raises(ValueError, match="'fp16'"):
        autocast(cpu, "fp16")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(cpu, "auto"):
        assert (a @ b).dtype == torch.float32
    assert isinstance(autocast(cpu, "fp32"), contextlib.nullcontext)
    with autocast(cpu, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32  # only inside the context
