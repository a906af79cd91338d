"""Fixtures shared by test modules."""
import pytest


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    """A folder for the small synthetic dataset, generated on first use and shared by a module's runs."""
    return tmp_path_factory.mktemp("synthetic")
