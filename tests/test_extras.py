"""The evaluation extras' registry and loop (extras/): which extras a configuration turns on, in which
order, how their stops are worded, and what util/logger learns from their declarations."""
import os

import pytest
import torch

import extras
from extras.base import where
from tests.helpers import RecordingStops, one_epoch_smoke_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("extras_data")


def _built(data_dir, output_dir, *flags):
    """Names of the extras a run with ``flags`` builds."""
    import datasets
    import models
    from cli.config import parse_args
    from cli.prepare import prepare

    config = prepare(parse_args([f for f in one_epoch_smoke_flags(data_dir, output_dir) if f != "--no-tensorboard"]
                                + ["--variant", "v3.0.4", *flags]))
    model, _, _ = models.build_model(config)
    return [extra.name for extra in extras.build_extras(config, model, datasets.build_dataset("val", config))]


def test_the_configuration_decides_which_extras_run_and_the_registry_their_order(data_dir, tmp_path):
    out = str(tmp_path / "out")
    assert _built(data_dir, out, "--diag_images", "2", "--vis_images", "2") == ["reference diagnostics", "pictures"]
    assert _built(data_dir, out, "--diag_images", "0", "--vis_images", "2") == ["pictures"]
    assert _built(data_dir, out, "--diag_images", "2", "--vis_images", "0") == ["reference diagnostics"]
    # pictures go to TensorBoard, which only a training run with an output directory writes
    assert _built(data_dir, out, "--diag_images", "2", "--vis_images", "2", "--no-tensorboard") == \
        ["reference diagnostics"]
    assert _built(data_dir, "", "--diag_images", "0", "--vis_images", "2") == []
    assert _built(data_dir, out, "--diag_images", "2", "--vis_images", "2", "--eval") == ["reference diagnostics"]


def test_stops_in_an_extra_name_it_and_where_the_run_was():
    assert where("pictures", 3, evaluating=False) == "the pictures of epoch 3 (its checkpoint is written)"
    assert where("reference diagnostics", -1, evaluating=False) == "the reference diagnostics at initialisation"
    assert where("reference diagnostics", 7, evaluating=True) == "the reference diagnostics of the evaluation"


class _Tail:
    def __init__(self, *run_extras):
        self.model, self.stop, self.extras = torch.nn.Linear(1, 1), RecordingStops(), list(run_extras)
        self.ctx = type("Ctx", (), {"device": torch.device("cpu")})()


class _AfterOnly(extras.EvalExtra):
    name = "after only"

    def after_evaluation(self, tail, epoch):
        return {"epoch": epoch}


class _AtInitialisation(_AfterOnly):
    name = "at initialisation too"

    def before_training(self, tail):
        return {"initial": True}


def test_before_training_runs_the_extras_that_implement_it_each_with_its_stop_point():
    tail = _Tail(_AfterOnly(), _AtInitialisation())
    assert extras.run_before_training(tail) == {"at initialisation too": {"initial": True}}
    assert tail.stop.points == ["the at initialisation too at initialisation"]
    assert _AtInitialisation.runs_before_training() and not _AfterOnly.runs_before_training()


def test_registration_refuses_a_taken_or_empty_name():
    class Twin(_AfterOnly):
        name = "pictures"

    class Nameless(_AfterOnly):
        name = ""

    for extra in (Twin, Nameless):
        with pytest.raises(ValueError, match="is empty or taken"):
            extras.register(extra)
    assert [extra.name for extra in extras.REGISTERED] == ["reference diagnostics", "pictures"]


def test_util_logger_knows_no_extra_by_name():
    """The log cleanup learns the extras' record types from their declarations (``records``)."""
    assert extras.tail_record_types() == ("diag",)
    with open(os.path.join(ROOT, "util", "logger.py")) as f:
        source = f.read()
    for extra in extras.REGISTERED:
        for kind in extra.records:
            assert f'"{kind}"' not in source and f"'{kind}'" not in source, kind
