"""The reference diagnostics in runs (--diag_images): probe set, records, no effect on training, scripts."""
import json
import os
import random
import sys

import numpy as np
import pytest
import torch

import main as main_module
from datasets.probe import probe_batches, probe_indices
from tests.helpers import RecordingStops, one_epoch_smoke_flags
from util.checkpoint import load_checkpoint
from cli.config import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

import bench_diagnostics  # noqa: E402
import diagnose  # noqa: E402

# tiny guided (v3.0.4) and stock (baseline) runs: 2 epochs, so the diagnostics after epoch 0 come
# before training epoch 1, where a leak into training would show; trained BatchNorm and dropout make
# the weights sensitive to a model left in eval mode and to a moved random generator
VARIANTS = {"v3.0.4": ["--variant", "v3.0.4", "--stages", "1:1,1:1"],
            "baseline": ["--variant", "baseline", "--stages", "2:2"]}
COMMON = ["--epochs", "2", "--lr_drop", "1", "--backbone_norm", "bn", "--dropout", "0.1"]
NUM_VAL = 4
ACROSS_EVALUATIONS = ("D3/token_instability", "D3/matching_instability")


class _Ids:
    """A stand-in dataset with image ids out of order."""

    def __init__(self, ids):
        self.ids = ids


def test_probe_is_the_lowest_image_ids_and_says_when_it_takes_all():
    indices, message = probe_indices(_Ids([7, 3, 9, 1]), 2)
    assert indices == [3, 1] and message == ""
    indices, message = probe_indices(_Ids([7, 3, 9, 1]), 6)
    assert indices == [3, 1, 0, 2]
    assert message == "--diag_images 6 is more than the 4 validation images: the reference diagnostics use all 4"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("diag_data")


def _val_dataset(data_dir):
    import datasets

    args = parse_args(one_epoch_smoke_flags(data_dir, "", num_val=NUM_VAL))
    return datasets.build_dataset("val", args)


def test_probe_batches_equal_the_validation_loaders(data_dir):
    """Built by indexing, they hold exactly what the validation DataLoader gives (same order, padding, targets)."""
    import datasets
    from torch.utils.data import DataLoader, SequentialSampler

    dataset = _val_dataset(data_dir)
    loader = DataLoader(dataset, batch_size=3, sampler=SequentialSampler(dataset), collate_fn=datasets.collate_fn)
    probe = list(probe_batches(dataset, probe_indices(dataset, NUM_VAL)[0], 3))
    assert len(probe) == len(loader) == 2
    for (samples, targets), (expected, expected_targets) in zip(probe, loader):
        assert torch.equal(samples.tensors, expected.tensors) and torch.equal(samples.mask, expected.mask)
        for target, other in zip(targets, expected_targets):
            assert target.keys() == other.keys()
            assert all(torch.equal(target[k], other[k]) for k in target)


def _generator_states():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


class _Scalars:
    """Records what TensorboardLogger.scalars would write."""

    def __init__(self):
        self.calls = []

    def scalars(self, prefix, values, step):
        self.calls.append((prefix, dict(values), step))


def _diagnostics_tail(data_dir, tmp_path, *flags):
    """(config, an EpochTail of a tiny v3.0.4 model with this run's extras, the model)."""
    import models
    from extras import build_extras
    from runner.tail import EpochTail
    from util.logger import JsonlLogger

    config = main_module.prepare(parse_args(one_epoch_smoke_flags(data_dir, "", num_val=NUM_VAL)
                                            + VARIANTS["v3.0.4"] + ["--backbone_norm", "bn", *flags]))
    model, _, _ = models.build_model(config)
    dataset = _val_dataset(data_dir)
    tail = EpochTail(config=config, ctx=None, model=model, postprocessors={}, val_loader=None, base_ds=None,
                     logger=JsonlLogger(str(tmp_path / "log.jsonl")), tb_logger=_Scalars(), trainable=0,
                     stop=RecordingStops(), extras=build_extras(config, model, dataset))
    tail.ctx = main_module.RunContext(place=None, device=torch.device("cpu"), output_dir=str(tmp_path), resume="")
    return config, tail, model


def test_the_extras_loop_restores_generators_and_modes_around_the_diagnostics(data_dir, tmp_path):
    """The evaluation transform draws from Python's random and the pass switches to eval mode; after
    the loop every generator and every module's train/eval flag is as before."""
    from extras import run_after_evaluation

    _, tail, model = _diagnostics_tail(data_dir, tmp_path, "--diag_images", "3", "--batch_size", "2")
    model.train()
    model.backbone.eval()  # a mixed state must come back as it was, not as all-train
    modes = [m.training for m in model.modules()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    before = _generator_states()
    logged = run_after_evaluation(tail, 0)
    after = _generator_states()
    assert logged["reference diagnostics"] and before[0] == after[0] and np.array_equal(before[1], after[1])
    assert torch.equal(before[2], after[2])
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # BN statistics too
    # the transform did draw: without the restore the stream would have moved
    random.seed(1)
    _val_dataset(data_dir)[0]
    assert random.getstate() != before[0]


class _Careless:
    """An extra that draws from every generator and leaves the model in eval mode."""

    name = "careless pass"

    def after_evaluation(self, tail, epoch):
        random.random(), np.random.rand(), torch.rand(1)
        tail.model.eval()
        return {"drawn": 3}


def test_the_loop_protects_every_extra_once_and_stops_after_each(data_dir, tmp_path):
    """The protection is the loop's, not each extra's: an extra that moves every generator and switches
    the model to eval leaves no trace; each extra is followed by its own stop point."""
    from extras import run_after_evaluation

    _, tail, model = _diagnostics_tail(data_dir, tmp_path, "--diag_images", "0")
    assert tail.extras == []  # --diag_images 0, no output directory: neither extra is on
    tail.extras = [_Careless()]
    model.train()
    before = _generator_states()
    assert run_after_evaluation(tail, 2) == {"careless pass": {"drawn": 3}}
    after = _generator_states()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])
    assert all(m.training for m in model.modules())
    assert tail.stop.points == ["the careless pass of epoch 2 (its checkpoint is written)"]


def test_only_the_main_process_runs_the_extras_every_process_stops_after_them(monkeypatch, data_dir, tmp_path):
    """Distributed runs measure on rank 0 alone (nothing collective inside); every rank builds the same
    extras and reaches the stop point after each, which is collective."""
    import extras.base
    from extras import run_after_evaluation

    _, tail, _ = _diagnostics_tail(data_dir, tmp_path, "--diag_images", "2")
    (extra,) = tail.extras
    assert extra.name == "reference diagnostics" and extra.indices == [0, 1]
    monkeypatch.setattr(extras.base, "is_main_process", lambda: False)
    assert run_after_evaluation(tail, 0) == {"reference diagnostics": {}}
    assert tail.stop.points == ["the reference diagnostics of epoch 0 (its checkpoint is written)"]
    assert not (tmp_path / "log.jsonl").exists()


def test_one_evaluation_writes_one_diag_record_and_its_scalars(data_dir, tmp_path):
    """The diagnostics extra: the record (type, epoch, N, every metric) and the same metrics as
    TensorBoard scalars under diag/ at the evaluation's step (epoch + 1)."""
    from extras import run_after_evaluation

    _, tail, _ = _diagnostics_tail(data_dir, tmp_path, "--diag_images", "3")
    metrics = run_after_evaluation(tail, 4)["reference diagnostics"]
    (record,) = _read_log(tmp_path / "log.jsonl")
    assert record["type"] == "diag" and record["epoch"] == 4 and record["N"] == 3 and record["diag_time"] > 0
    assert {k: v for k, v in record.items() if k[:1] == "D"} == metrics and "D6/coverage" in metrics
    assert tail.tb_logger.calls == [("diag", metrics, 5)]


def test_negative_diag_images_is_a_one_line_error(capsys, tmp_path):
    assert main_module.cli(one_epoch_smoke_flags(tmp_path / "data", tmp_path / "out") + ["--diag_images", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: invalid configuration: --diag_images -1 must be >= 0"


def test_resumed_log_keeps_one_diag_record_per_finished_epoch(tmp_path):
    """A kill between an epoch's diag record and its epoch record: the tail is redone, so that diag
    record goes; so do those of epochs trained again. Finished epochs keep theirs, and the record at
    initialisation (epoch -1, which has no epoch record) stays."""
    from extras import tail_record_types
    from util.logger import JsonlLogger, read_jsonl

    lines = [{"type": "diag", "epoch": -1, "N": 2},
             {"type": "diag", "epoch": 0, "N": 2}, {"type": "epoch", "epoch": 0},
             {"type": "diag", "epoch": 1, "N": 2},                          # epoch 1's tail was cut here
             {"type": "diag", "epoch": 2, "N": 2}, {"type": "epoch", "epoch": 2}]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert "diag" in tail_record_types()  # declared by the diagnostics extra, not known to util/logger
    assert JsonlLogger(str(path)).drop_epochs_from(2, tail_record_types()) == (3, 0)
    assert read_jsonl(str(path)) == lines[:3]
    # a run restarted before its first checkpoint
    assert JsonlLogger(str(path)).drop_epochs_from(0, tail_record_types()) == (2, 0)
    assert read_jsonl(str(path)) == lines[:1]


# ----------------------------------------------------------------------------- whole runs

def _read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


_RUNS = {}


def _run(data_dir, tmp_root, variant, images):
    """One cached 2-epoch run: (output dir, printed text)."""
    key = (variant, images)
    if key not in _RUNS:
        out = tmp_root / f"{variant}_diag{images}"
        flags = one_epoch_smoke_flags(data_dir, out, num_val=NUM_VAL) + COMMON + VARIANTS[variant]
        torch.manual_seed(0)
        from contextlib import redirect_stdout
        from io import StringIO

        printed = StringIO()
        with redirect_stdout(printed):
            main_module.main(parse_args(flags + ["--diag_images", str(images)]))
        _RUNS[key] = (out, printed.getvalue())
    return _RUNS[key]


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    return tmp_path_factory.mktemp("diag_runs")


def _families(record):
    return {key.split("/")[0] for key in record if key[:1] == "D" and key[1:2].isdigit()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_diagnostics_change_nothing_in_training(variant, data_dir, run_root):
    """With and without diagnostics (more probe images than the split: all 4 used): bit-identical
    weights after each epoch, identical losses and AP. The diagnostics run before the first training
    step (epoch -1) and after each evaluation."""
    off, _ = _run(data_dir, run_root, variant, 0)
    on, printed = _run(data_dir, run_root, variant, 6)
    for name in ("checkpoint0000.pth", "checkpoint0001.pth"):
        a, b = load_checkpoint(str(off / name))["model"], load_checkpoint(str(on / name))["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    timing = ("sec_per_iter", "data_sec_per_iter", "epoch_time", "eval_time", "train_epoch_time")

    def comparable(path, kind):
        return [{k: v for k, v in r.items() if k not in timing and "time" not in k}
                for r in _read_log(path / "log.jsonl") if r["type"] == kind]

    assert comparable(off, "train") == comparable(on, "train")
    assert comparable(off, "epoch") == comparable(on, "epoch")  # losses and every COCO number
    assert not [r for r in _read_log(off / "log.jsonl") if r["type"] == "diag"]
    assert printed.count("the reference diagnostics use all 4") == 1
    kinds = [(r["type"], r.get("epoch")) for r in _read_log(on / "log.jsonl") if r["type"] in ("diag", "train")]
    assert kinds[0] == ("diag", -1) and kinds.count(("diag", -1)) == 1  # before the first training window


def test_diag_records_guided_and_stock(data_dir, run_root):
    """One diag record at initialisation (epoch -1) and one per evaluation: D1-D6 for v3.0.4; D4-D5
    for the baseline."""
    guided, _ = _run(data_dir, run_root, "v3.0.4", 6)
    records = [r for r in _read_log(guided / "log.jsonl") if r["type"] == "diag"]
    assert [(r["epoch"], r["N"]) for r in records] == [(-1, NUM_VAL), (0, NUM_VAL), (1, NUM_VAL)]
    # one guidance update per forward (stages 1:1,1:1): D3 is the across-evaluation one, absent at init
    assert _families(records[0]) == {"D1", "D2", "D4", "D5", "D6"}
    assert all(_families(r) == {"D1", "D2", "D3", "D4", "D5", "D6"} for r in records[1:])
    assert all(v == v for r in records for v in r.values() if isinstance(v, float))  # never NaN
    for key in ("D4/off_image", "D4/off_image/enc0/lvl0", "D4/fg_in_img", "D4/fg_in_img/enc0/lvl0",
                "D4/fg_in_chance", "D4/own_in_img", "D6/coverage/lvl0"):
        assert key in records[0], key  # overall and per layer/level
    assert not any(key.startswith("D4/fsr") or key.startswith("D4/own_obj") for r in records for key in r)
    # across evaluations: from the first evaluation on, compared with the pass at initialisation
    assert "D3/token_instability" not in records[0] and "D3/token_instability" in records[1]
    # at initialisation the attention weights are uniform: values fixed by construction (4 heads here)
    assert records[0]["D5/entropy"] == pytest.approx(1.0, abs=1e-6)
    assert records[0]["D5/n_eff"] == pytest.approx(16.0, rel=1e-6)
    assert records[0]["D5/self_share"] == pytest.approx(0.25, abs=1e-7)
    assert records[0]["D5/distance"] == pytest.approx(2.5, rel=1e-6)

    stock, _ = _run(data_dir, run_root, "baseline", 6)
    records = [r for r in _read_log(stock / "log.jsonl") if r["type"] == "diag"]
    assert [r["epoch"] for r in records] == [-1, 0, 1]
    assert all(_families(r) == {"D4", "D5"} for r in records)


def _diag_epochs(run_dir):
    return [r["epoch"] for r in _read_log(run_dir / "log.jsonl") if r["type"] == "diag"]


def test_the_record_at_initialisation_is_written_once_per_run(data_dir, run_root, tmp_path):
    """A resumed run never measures the initialisation again: resumed with the epoch -1 record in its
    log it keeps that one; resumed from a checkpoint whose log has none it does not invent one. A run
    restarted before its first checkpoint (no checkpoint, the record logged) keeps the record it has."""
    import shutil

    trained, _ = _run(data_dir, run_root, "v3.0.4", 6)
    flags = COMMON + VARIANTS["v3.0.4"] + ["--diag_images", str(NUM_VAL)]
    resumed = tmp_path / "resumed"
    shutil.copytree(trained, resumed)
    main_module.main(parse_args(one_epoch_smoke_flags(data_dir, resumed, num_val=NUM_VAL) + flags
                                + ["--resume", str(resumed / "checkpoint0000.pth")]))  # trains epoch 1 again
    assert _diag_epochs(resumed) == [-1, 0, 1]

    without = tmp_path / "without"
    shutil.copytree(trained, without)
    lines = (without / "log.jsonl").read_text().splitlines(keepends=True)
    (without / "log.jsonl").write_text("".join(line for line in lines if '"epoch": -1' not in line))
    assert _diag_epochs(without) == [0, 1]
    main_module.main(parse_args(one_epoch_smoke_flags(data_dir, without, num_val=NUM_VAL) + flags
                                + ["--resume", str(without / "checkpoint0000.pth")]))
    assert _diag_epochs(without) == [0, 1]

    restarted = tmp_path / "restarted"
    restarted.mkdir()
    (restarted / "log.jsonl").write_text(json.dumps({"type": "diag", "epoch": -1, "N": 99}) + "\n")
    from contextlib import redirect_stdout
    from io import StringIO

    printed = StringIO()
    with redirect_stdout(printed):
        main_module.main(parse_args(one_epoch_smoke_flags(data_dir, restarted, num_val=NUM_VAL)
                                    + VARIANTS["v3.0.4"] + ["--diag_images", "2", "--auto_resume"]))
    records = [r for r in _read_log(restarted / "log.jsonl") if r["type"] == "diag"]
    assert [(r["epoch"], r["N"]) for r in records] == [(-1, 99), (0, 2)]
    assert "already holds the reference diagnostics at initialisation" in printed.getvalue()


def test_eval_runs_the_diagnostics_when_asked(data_dir, run_root, tmp_path):
    trained, _ = _run(data_dir, run_root, "v3.0.4", 0)
    flags = one_epoch_smoke_flags(data_dir, tmp_path / "eval", num_val=NUM_VAL) + COMMON + VARIANTS["v3.0.4"]
    main_module.main(parse_args(flags + ["--eval", "--resume", str(trained / "checkpoint.pth"), "--diag_images", "2"]))
    records = [r for r in _read_log(tmp_path / "eval" / "log.jsonl") if r["type"] == "eval_diag"]  # --eval's own type
    assert len(records) == 1 and records[0]["epoch"] == 1 and records[0]["N"] == 2
    assert "D6/coverage" in records[0]


def test_diagnose_script_on_consecutive_checkpoints(data_dir, run_root, tmp_path):
    """Config from the checkpoint; two checkpoints in order give what the run itself logged after
    those epochs (same weights, same probe images), across-evaluation D3 included."""
    trained, _ = _run(data_dir, run_root, "v3.0.4", 6)
    paths = [str(trained / "checkpoint0000.pth"), str(trained / "checkpoint0001.pth")]
    out = tmp_path / "diag"
    assert diagnose.main(["--resume", *paths, "--out", str(out), "--diag_images", str(NUM_VAL), "--coco_path",
                          str(data_dir), "--device", "cpu"]) == 0
    report = json.load(open(out / "diagnostics.json"))
    assert report["N"] == NUM_VAL and [e["epoch"] for e in report["evaluations"]] == [0, 1]
    assert report["config"]["variant"] == "v3.0.4" and any(k.startswith("D4") for k in report["describe"])
    logged = [r for r in _read_log(trained / "log.jsonl") if r["type"] == "diag" and r["epoch"] >= 0]
    for index, (evaluation, record) in enumerate(zip(report["evaluations"], logged)):
        metrics = evaluation["metrics"]
        # the run's first evaluation compared with its pass at initialisation; the script has none before it
        expected = {k for k in record if k[:1] == "D" and (index > 0 or not k.startswith(ACROSS_EVALUATIONS))}
        assert metrics.keys() == expected
        assert all(metrics[k] == pytest.approx(record[k], rel=1e-6, abs=1e-9) for k in metrics)
    assert "D3/token_instability" in report["evaluations"][1]["metrics"]
    assert (out / "diagnostics.png").stat().st_size > 10_000
    assert diagnose.main(["--resume", str(tmp_path / "missing.pth"), "--out", str(out)]) == 2


def test_bench_diagnostics_reports_interleaved_medians(data_dir, capsys):
    tiny = one_epoch_smoke_flags(data_dir, "", num_val=NUM_VAL)
    argv = ["--variants", "stock", "v3.0.4", "--images", "2", "6", "--repeats", "1", *tiny]
    assert bench_diagnostics.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    summaries = [line for line in lines if "ratio" in line]
    assert [(s["variant"], s["N"]) for s in summaries] == [("stock", 2), ("stock", NUM_VAL), ("v3.0.4", 2),
                                                           ("v3.0.4", NUM_VAL)]
    for summary in summaries:
        # one repeat: the median ratio is that repeat's (evaluation + pass) / evaluation
        assert summary["ratio"] == pytest.approx(summary["eval_on_s"] / summary["eval_off_s"])
        assert summary["eval_on_s"] == pytest.approx(summary["eval_off_s"] + summary["diag_s"])
        assert summary["diag_s"] > 0 and summary["val_images"] == NUM_VAL


@pytest.mark.slow
def test_two_processes_diagnose_on_rank_zero_only(tmp_path):
    """torchrun, 2 CPU processes, 2 epochs: rank 0 measures after each evaluation while rank 1 goes on;
    the run finishes (no rank waits forever) with one diag record per evaluation."""
    import subprocess

    from tests.test_distributed import _free_port, _tiny_run_flags

    env = dict(os.environ, MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", PYTHON=sys.executable)
    flags = _tiny_run_flags(tmp_path) + ["--epochs", "2", "--diag_images", "2", "--variant", "v3.0.4",
                                         "--stages", "1:1,1:1"]
    proc = subprocess.run(["bash", os.path.join(SCRIPTS, "dist_train.sh"), "2", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = _read_log(tmp_path / "out" / "log.jsonl")
    assert [(r["epoch"], r["N"]) for r in records if r["type"] == "diag"] == [(-1, 2), (0, 2), (1, 2)]
    assert proc.stdout.count("reference diagnostics on 2 probe images") == 3
