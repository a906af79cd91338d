"""The guidance refactor computes what the code before it computed, bit for bit.

``tests/data/guidance_identity.pt`` holds, for v3.0.1-v3.0.4 and the flag combinations that
existed before candidate sources and ranking rules became registered parts (both one-to-many
forms), the outputs, encoder references and gradients of a fixed small model on a fixed batch,
computed by the pre-refactor code (``tests/guidance_fixture.py`` says how it was made). Under the
torch version that made it the comparison is exact (``torch.equal``); under another one to 1e-6.
The fixture was computed on one thread and the cases run on one thread here too: the thread count
changes the order of the float sums, so two threads differ from one in the last bit.
"""
import os

import pytest
import torch

from tests.guidance_fixture import all_cases, run_case, unpack

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "guidance_identity.pt")


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, weights_only=True)


def test_fixture_covers_every_case(fixture):
    assert sorted(fixture["cases"]) == sorted(f"{case}/{form}" for case, form in all_cases())


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case,form", all_cases())
def test_outputs_match_the_pre_refactor_code(fixture, one_thread, case, form):
    expected = unpack(fixture["cases"][f"{case}/{form}"])
    got = run_case(case, form)
    assert sorted(got) == sorted(expected)
    exact = str(torch.__version__) == fixture["torch"]
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        if exact:
            assert torch.equal(got[name], value), f"{case}/{form}: {name} differs"
        else:
            assert torch.allclose(got[name], value, rtol=0, atol=1e-6), f"{case}/{form}: {name} differs"
