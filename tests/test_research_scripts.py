"""The research scripts: run summary, reference visualisation, model benchmark, configs and launchers."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
for path in (ROOT, SCRIPTS):
    if path not in sys.path:
        sys.path.insert(0, path)

import bench_model  # noqa: E402
import summarize  # noqa: E402
import visualize_refs  # noqa: E402
from cli.config import expand_stages, load_variants, parse_args  # noqa: E402
from cli.run_loading import random_init_configuration  # noqa: E402

VARIANTS = ["baseline", "cascade", "v3.0.1", "v3.0.2", "v3.0.3", "v3.0.4"]
CONTROLS = ["v3.0.4_gt", "v3.0.4_gt_distance", "v3.0.4_random"]

# a small model whose cascade schedule has one guided encoder layer (the second)
TINY_GUIDED = ["--device", "cpu", "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32",
               "--nheads", "4", "--dim_feedforward", "64", "--enc_layers", "2", "--dec_layers", "2",
               "--stages", "1:1,1:1", "--num_queries_one2one", "10", "--dropout", "0.0", "--num_classes", "4"]


# ----------------------------------------------------------------------------- summarize

def _write_run(run_dir, config, records, tail=""):
    os.makedirs(run_dir, exist_ok=True)
    if config is not None:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config, f)
    with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write(tail)


def _epoch(epoch, ap, ap_large=0.03):
    """An epoch record as main.py writes it: train means plus test_<COCO stat>."""
    stats = {"AP": ap, "AP50": ap * 2, "AP75": ap / 2, "APs": 0.01, "APm": 0.02, "APl": ap_large, "AR100": 0.5}
    return {"type": "epoch", "epoch": epoch, "train_loss": 5.0, **{f"test_{k}": v for k, v in stats.items()}}


def _train(epoch, it, sec):
    return {"type": "train", "epoch": epoch, "iter": it, "iters": 20, "lr": 2e-4, "sec_per_iter": sec, "loss": 4.0}


def _tables(printed):
    """Markdown output -> {section title: {first cell: [other cells]}}."""
    sections, title = {}, None
    for line in printed.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            sections[title] = {}
        elif line.startswith("| ") and "---" not in line and title is not None:
            cells = [c.strip() for c in line.split("|")[1:-1]]
            sections[title].setdefault(cells[0], cells[1:])
    return sections


def test_summarize_table_and_plot(tmp_path, capsys):
    done = tmp_path / "v3.0.4-two_stage"
    _write_run(done, {"variant": "v3.0.4", "two_stage": True, "epochs": 2},
               [_train(0, 10, 0.50), _train(0, 20, 0.30), _epoch(0, 0.10),
                _train(1, 10, 0.40), _epoch(1, 0.20)])
    # still training: one window logged, no evaluation, and a half-written last line
    running = tmp_path / "cascade"
    _write_run(running, {"variant": "cascade", "two_stage": False, "epochs": 12}, [_train(0, 10, 1.25)],
               tail='{"type": "train", "epo')
    # small images: no large objects at all, which pycocotools reports as -1
    no_large = tmp_path / "v3.0.1"
    _write_run(no_large, {"variant": "v3.0.1", "epochs": 1}, [_train(0, 10, 0.5), _epoch(0, 0.1, ap_large=-1.0)])
    missing = tmp_path / "not_started"
    out_md, out_png = tmp_path / "results.md", tmp_path / "ap.png"

    run_dirs = [str(done), str(running), str(no_large), str(missing)]
    assert summarize.main(run_dirs + ["--out", str(out_md), "--plot", str(out_png)]) == 0
    printed = capsys.readouterr().out
    rows = _tables(printed)["Runs"]
    # AP numbers in percent from the last evaluated epoch; epochs done / planned; median s/iter
    assert rows["v3.0.4 +two-stage"][:9] == ["–", "20.0", "40.0", "10.0", "1.0", "2.0", "3.0", "2/2", "0.400"]
    assert rows["cascade"][:9] == ["–"] * 7 + ["0/12", "1.250"]
    assert rows["v3.0.1"][:9] == ["–", "10.0", "20.0", "5.0", "1.0", "2.0", "n/a", "1/1", "0.500"]
    assert "no evaluation yet" in rows["cascade"][9] and "training epoch 1" in rows["cascade"][9]
    assert "no log.jsonl" in rows["not_started"][9]
    # single runs: one value each, std n/a, n = 1 said in its own column
    variants = _tables(printed)["Variants over seeds"]
    assert variants["v3.0.1"][:3] == ["1", "–", "10.0 ± n/a [10.0]"]
    assert variants["cascade"][:3] == ["0 of 1", "–", "–"]
    assert "sample std (ddof=1" in printed
    # no seeds known: nothing can be paired
    differences = _tables(printed)["Paired difference to cascade"]
    assert differences["v3.0.1"][:3] == ["0", "–", "–"] and "not paired" in differences["v3.0.1"][-1]
    assert "no cascade +two-stage run" in differences["v3.0.4 +two-stage"][-1]
    assert out_md.read_text() == printed
    assert out_png.stat().st_size > 1000


def _seeded(root, variant, seed, epochs_ap, planned=2, config=True, two_stage=False):
    """A run directory root/variant/seedN whose log evaluates AP = epochs_ap[e] after epoch e."""
    records = []
    for epoch, ap in enumerate(epochs_ap):
        records += [_train(epoch, 10, 0.5), _epoch(epoch, ap)]
    run_dir = root / (variant + ("-two_stage" if two_stage else "")) / f"seed{seed}"
    cfg = {"variant": variant, "seed": seed, "epochs": planned, "two_stage": two_stage} if config else None
    _write_run(run_dir, cfg, records)
    return run_dir


def test_summarize_seeds_means_spreads_and_paired_differences(tmp_path, capsys):
    """Hand-computed: AP = a, AP50 = 2a, AP75 = a/2, APs = 1 %, APm = 2 % per run (see ``_epoch``)."""
    _seeded(tmp_path, "cascade", 0, [0.10, 0.30])
    _seeded(tmp_path, "cascade", 1, [0.20, 0.32])
    # resumed after epoch 0: epoch 1 logged twice; the later record (0.34) counts
    _write_run(tmp_path / "cascade" / "seed2", {"variant": "cascade", "seed": 2, "epochs": 2},
               [_epoch(0, 0.21), _train(1, 10, 9.0), _epoch(1, 0.99), _train(1, 10, 0.5), _epoch(1, 0.34)])
    _seeded(tmp_path, "v3.0.4", 0, [0.20, 0.33])
    # no seed in config.yaml: the directory name seed1 says it
    _write_run(tmp_path / "v3.0.4" / "seed1", {"variant": "v3.0.4", "epochs": 2}, [_epoch(0, 0.25), _epoch(1, 0.36)])
    _seeded(tmp_path, "v3.0.4", 3, [0.30])                       # a seed the control never ran, one epoch in
    _seeded(tmp_path, "v3.0.1", 0, [0.28], config=False)         # no config at all: variant and seed from the path
    out_png = tmp_path / "ap.png"
    argv = [str(tmp_path / "cascade"), str(tmp_path / "v3.0.4"), str(tmp_path / "v3.0.1" / "seed0"),
            "--control", "cascade", "--out", "", "--plot", str(out_png)]
    assert summarize.main(argv) == 0
    tables = _tables(capsys.readouterr().out)

    variants = tables["Variants over seeds"]
    # cascade AP 30, 32, 34: mean 32, sample std sqrt((4 + 0 + 4) / 2) = 2 (the population std would be 1.63)
    assert variants["cascade"][:7] == ["3", "0, 1, 2", "32.0 ± 2.00 [30.0, 32.0, 34.0]",
                                       "64.0 ± 4.00 [60.0, 64.0, 68.0]", "16.0 ± 1.00 [15.0, 16.0, 17.0]",
                                       "1.0 ± 0.00 [1.0, 1.0, 1.0]", "2.0 ± 0.00 [2.0, 2.0, 2.0]"]
    # v3.0.4 AP 33, 36, 30: mean 33, sample std sqrt((0 + 9 + 9) / 2) = 3; seed 3 stopped after epoch 1 of 2
    assert variants["v3.0.4"][:3] == ["3", "0, 1, 3", "33.0 ± 3.00 [33.0, 36.0, 30.0]"]
    assert variants["v3.0.4"][7] == "1/2, 2/2"
    assert variants["v3.0.1"][:3] == ["1", "0", "28.0 ± n/a [28.0]"]

    differences = tables["Paired difference to cascade"]
    assert "cascade" not in differences
    # paired on seeds 0 and 1 only: AP 33 - 30 = 3, 36 - 32 = 4 -> 3.5 ± sqrt(0.5); the unpaired
    # difference of means (33 - 32 = 1) would be wrong
    assert differences["v3.0.4"][:5] == ["2", "0, 1", "+3.5 ± 0.71 [+3.0, +4.0]", "+7.0 ± 1.41 [+6.0, +8.0]",
                                         "+1.8 ± 0.35 [+1.5, +2.0]"]
    assert differences["v3.0.4"][5:7] == ["+0.0 ± 0.00 [+0.0, +0.0]"] * 2
    assert "seeds not paired with cascade: 3" in differences["v3.0.4"][-1]
    # one pair: 28 - 30, no spread; evaluated after epoch 1 against the control's epoch 2
    assert differences["v3.0.1"][:3] == ["1", "0", "-2.0 ± n/a [-2.0]"]
    assert "seeds 0 compared at different epochs" in differences["v3.0.1"][-1]

    # the plot: mean with a min-max band over the seeds that reached each epoch
    groups = {g.label: g for g in summarize.group_runs([summarize.load_run(d) for d in summarize.expand_run_dirs(
        [str(tmp_path / "cascade"), str(tmp_path / "v3.0.4")])])}
    epochs, mean, low, high, counts = summarize.mean_curve(groups["cascade"])
    assert epochs == [0, 1] and counts == [3, 3]
    assert mean == pytest.approx([(0.10 + 0.20 + 0.21) / 3, 0.32]) and low == pytest.approx([0.10, 0.30])
    assert high == pytest.approx([0.21, 0.34])
    # seed 3 has only epoch 0: epoch 1 is the mean of seeds 0 and 1, and says so
    epochs, mean, low, high, counts = summarize.mean_curve(groups["v3.0.4"])
    assert epochs == [0, 1] and counts == [3, 2]
    assert mean == pytest.approx([0.25, (0.33 + 0.36) / 2]) and low == pytest.approx([0.20, 0.33])
    assert high == pytest.approx([0.30, 0.36])
    assert out_png.stat().st_size > 1000


def test_summarize_labels_controls(tmp_path, capsys):
    """A run whose config.yaml says ``control: oracle`` (references from ground truth) reads as a control
    in every table; it is still paired with the control variant by seed."""
    _seeded(tmp_path, "cascade", 0, [0.30])
    _write_run(tmp_path / "v3.0.4_gt" / "seed0", {"variant": "v3.0.4_gt", "seed": 0, "epochs": 1, "control": "oracle"},
               [_epoch(0, 0.40)])
    assert summarize.main([str(tmp_path / "cascade"), str(tmp_path / "v3.0.4_gt"), "--control", "cascade",
                           "--out", "", "--plot", ""]) == 0
    tables = _tables(capsys.readouterr().out)
    assert "v3.0.4_gt (oracle control)" in tables["Variants over seeds"]
    paired = tables["Paired difference to cascade"]["v3.0.4_gt (oracle control)"]
    assert paired[:3] == ["1", "0", "+10.0 ± n/a [+10.0]"]


def test_summarize_resumed_log_keeps_the_last_record_per_epoch(tmp_path):
    """A resume that logs epochs 1 and 2 again: one point per epoch, the later record's numbers."""
    records = [_train(0, 10, 0.5), _epoch(0, 0.1), _train(1, 10, 0.5), _epoch(1, 0.2), _train(2, 10, 0.5),
               _epoch(2, 0.3), _train(1, 10, 0.7), _epoch(1, 0.25), _train(2, 10, 0.7), _epoch(2, 0.35)]
    _write_run(tmp_path / "run", {"variant": "cascade", "seed": 0, "epochs": 3}, records)
    run = summarize.load_run(str(tmp_path / "run"))
    assert [p["epoch"] for p in run.curve] == [0, 1, 2]
    assert [p["AP"] for p in run.curve] == pytest.approx([0.1, 0.25, 0.35])
    assert run.epochs_logged == 3 and run.iter_times == [0.5, 0.7, 0.7]


def test_summarize_duplicate_seed_is_left_out_with_a_note(tmp_path):
    first = _seeded(tmp_path / "a", "cascade", 0, [0.3])
    second = _seeded(tmp_path / "b", "cascade", 0, [0.5])
    groups = summarize.group_runs([summarize.load_run(str(first)), summarize.load_run(str(second))])
    assert len(groups) == 1 and [r.path for r in groups[0].runs] == [str(first)]
    assert groups[0].values("AP") == pytest.approx([0.3]) and str(second) in groups[0].notes[0]


def test_summarize_reads_upstream_list_form(tmp_path):
    record = {"epoch": 3, "train_loss": 1.0, "test_coco_eval_bbox": [0.3, 0.5, 0.31, 0.1, 0.3, 0.4] + [0.0] * 6}
    _write_run(tmp_path / "run", None, [record])
    run = summarize.load_run(str(tmp_path / "run"))
    assert run.final["AP"] == pytest.approx(0.3) and run.final["APl"] == pytest.approx(0.4)
    assert run.epochs_logged == 4 and run.label == "run"


def _diag(epoch, fsr, coverage=None):
    """A diag record as main.py writes it: overall means under short keys, per-layer keys below them."""
    record = {"type": "diag", "epoch": epoch, "N": 8, "D4/fg_in_img": fsr, "D4/fg_in_img/enc0/lvl0": fsr + 1.0,
              "diag_time": 0.5}
    if coverage is not None:
        record["D6/coverage"] = coverage
    return record


def test_summarize_reference_diagnostics_table_and_plot(tmp_path, capsys):
    """Hand-computed: the last diagnosed epoch per seed, mean ± sample std over seeds per variant."""
    for seed, (fsr, cov) in enumerate([(0.2, 0.5), (0.4, 0.7)]):
        _write_run(tmp_path / "v3.0.4" / f"seed{seed}", {"variant": "v3.0.4", "seed": seed, "epochs": 2},
                   [_epoch(0, 0.1), _diag(0, 9.0, 9.0), _epoch(1, 0.3 + seed / 10), _diag(1, fsr, cov)])
    # a resumed baseline: epoch 1 diagnosed twice, the later record counts
    _write_run(tmp_path / "baseline" / "seed0", {"variant": "baseline", "seed": 0, "epochs": 2},
               [_epoch(0, 0.1), _diag(0, 0.1), _diag(1, 0.9), _diag(1, 0.3), _epoch(1, 0.2)])
    _seeded(tmp_path, "cascade", 0, [0.2, 0.3])  # no diagnostics: no column
    png = tmp_path / "ap.png"
    argv = [str(tmp_path / name) for name in ("v3.0.4", "baseline", "cascade")] + ["--out", "", "--plot", str(png)]
    assert summarize.main(argv) == 0
    tables = _tables(capsys.readouterr().out)
    diag = tables["Reference diagnostics over seeds"]
    assert diag["metric"] == ["v3.0.4", "baseline"]
    assert diag["AP (%)"] == ["35.0 ± 7.07 (n=2)", "20.0 ± n/a (n=1)"]
    assert diag["epochs diagnosed"] == ["1", "1"]
    # 0.2, 0.4: mean 0.3, sample std sqrt(0.02) = 0.141; per-layer keys are not rows
    assert diag["D4/fg_in_img"] == ["0.300 ± 0.141 (n=2)", "0.300 ± n/a (n=1)"]
    assert diag["D6/coverage"] == ["0.600 ± 0.141 (n=2)", "–"]
    assert not any(key.count("/") > 1 for key in diag)
    # diag records neither evaluate nor train: the AP curve and the epoch count are the epoch records'
    run = summarize.load_run(str(tmp_path / "baseline" / "seed0"))
    assert [p["epoch"] for p in run.curve] == [0, 1] and run.epochs_logged == 2 and not run.notes
    assert [p["D4/fg_in_img"] for p in run.diag_curve] == pytest.approx([0.1, 0.3])
    assert (tmp_path / "ap_diag.png").stat().st_size > 1000
    # the tables of runs without diagnostics are unchanged: no new section, no diag plot
    capsys.readouterr()
    assert summarize.main([str(tmp_path / "cascade"), "--out", "", "--plot", str(tmp_path / "c.png")]) == 0
    assert "Reference diagnostics" not in capsys.readouterr().out
    assert not (tmp_path / "c_diag.png").exists()


def test_summarize_diagnostics_per_epoch_table(tmp_path, capsys):
    """Hand-computed: per key and variant, mean ± std over the seeds diagnosed at each epoch; D2 per
    guidance update is kept (worry 2 is read from it), other per-layer keys are not; a lagging seed
    is counted."""
    def diag(epoch, same_obj, dec0, fsr):
        return {"type": "diag", "epoch": epoch, "N": 4, "D2/same_obj": same_obj, "D2/same_obj/dec0": dec0,
                "D2/same_obj/enc1": 0.0, "D4/fg_in_img": fsr, "D4/fsr_in": 0.5, "D5/entropy": 0.5}
    _write_run(tmp_path / "v3.0.4" / "seed0", {"variant": "v3.0.4", "seed": 0, "epochs": 2},
               [_epoch(0, 0.1), diag(0, 0.6, 0.5, 0.2), _epoch(1, 0.2), diag(1, 0.8, 0.7, 0.3)])
    _write_run(tmp_path / "v3.0.4" / "seed1", {"variant": "v3.0.4", "seed": 1, "epochs": 2},
               [_epoch(0, 0.1), diag(0, 0.4, 0.3, 0.4)])                      # still training epoch 1
    _write_run(tmp_path / "cascade" / "seed0", {"variant": "cascade", "seed": 0, "epochs": 2},
               [_epoch(0, 0.1), {"type": "diag", "epoch": 0, "N": 4, "D4/fg_in_img": 0.25},
                _epoch(1, 0.2), {"type": "diag", "epoch": 1, "N": 4, "D4/fg_in_img": 0.35}])
    argv = [str(tmp_path / "v3.0.4"), str(tmp_path / "cascade"), "--out", "", "--plot", ""]
    assert summarize.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.split("## Reference diagnostics per epoch")[1].splitlines()
            if line.startswith("| D")]
    table = {(r[0].lstrip("| "), r[1]): [c.rstrip(" |") for c in r[2:]] for r in rows}
    # D5 is a default too; no enc1, and no key of the old D4 names (not selected: nobody compares them)
    assert sorted(table) == [("D2/same_obj", "v3.0.4"), ("D2/same_obj/dec0", "v3.0.4"),
                             ("D4/fg_in_img", "cascade"), ("D4/fg_in_img", "v3.0.4"), ("D5/entropy", "v3.0.4")]
    # epoch 0: (0.6, 0.4) -> 0.5 ± 0.141; epoch 1: seed 0 only
    assert table[("D2/same_obj", "v3.0.4")] == ["0.500 ± 0.141", "0.800 (n=1)"]
    assert table[("D2/same_obj/dec0", "v3.0.4")] == ["0.400 ± 0.141", "0.700 (n=1)"]
    assert table[("D4/fg_in_img", "v3.0.4")] == ["0.300 ± 0.141", "0.300 (n=1)"]
    assert table[("D4/fg_in_img", "cascade")] == ["0.250", "0.350"]
    # the last-epoch table has the D2 stage row too
    assert "| D2/same_obj/dec0 |" in out.split("## Reference diagnostics over seeds")[1]
    # --diag_epochs with a prefix selects; alone it turns the table off
    assert summarize.main(argv + ["--diag_epochs", "D2/same_obj/"]) == 0
    out = capsys.readouterr().out.split("## Reference diagnostics per epoch")[1]
    assert "| D2/same_obj/dec0 | v3.0.4 | 0.400 ± 0.141 | 0.700 (n=1) |" in out and "D5/" not in out
    assert summarize.main(argv + ["--diag_epochs"]) == 0
    assert "per epoch" not in capsys.readouterr().out


def test_summarize_shows_the_record_at_initialisation_as_the_first_point(tmp_path, capsys):
    """A hand-made log as main.py writes it: the diag record of epoch -1 before any training, then one
    per evaluation. It is the first column of the per-epoch table ('init'), the first point of the
    curves, and neither an evaluation nor a trained epoch; D6 coverage per level is tabulated."""
    def diag(epoch, fsr, cov0):
        return {"type": "diag", "epoch": epoch, "N": 4, "D4/fg_in_img": fsr, "D4/fg_in_img/enc1/lvl0": 0.0,
                "D6/coverage": 0.9, "D6/coverage/lvl0": cov0, "D6/coverage/lvl1": 1.0,
                "D6/coverage/enc1/lvl0": 0.0}
    for seed, shift in enumerate([0.0, 0.2]):
        _write_run(tmp_path / "v3.0.4" / f"seed{seed}", {"variant": "v3.0.4", "seed": seed, "epochs": 2},
                   [diag(-1, 0.1 + shift, 0.5), _train(0, 10, 0.5), _epoch(0, 0.1), diag(0, 0.2 + shift, 0.6),
                    _train(1, 10, 0.5), _epoch(1, 0.2), diag(1, 0.3 + shift, 0.7)])
    _write_run(tmp_path / "cascade" / "seed0", {"variant": "cascade", "seed": 0, "epochs": 2},
               [diag(-1, 0.5, 0.5)])                                      # started: only the record at init
    png = tmp_path / "ap.png"
    assert summarize.main([str(tmp_path / "v3.0.4"), str(tmp_path / "cascade"), "--out", "", "--plot",
                           str(png)]) == 0
    out = capsys.readouterr().out
    per_epoch = out.split("## Reference diagnostics per epoch")[1]
    assert "| metric | variant | init | epoch 0 | epoch 1 |" in per_epoch
    assert "| D4/fg_in_img | v3.0.4 | 0.200 ± 0.141 | 0.300 ± 0.141 | 0.400 ± 0.141 |" in per_epoch
    assert "| D4/fg_in_img | cascade | 0.500 | – | – |" in per_epoch
    assert "| D6/coverage/lvl0 | v3.0.4 | 0.500 ± 0.000 | 0.600 ± 0.000 | 0.700 ± 0.000 |" in per_epoch
    assert "| D6/coverage/lvl1 | v3.0.4 |" in per_epoch and "enc1" not in out
    final = _tables(out)["Reference diagnostics over seeds"]
    assert final["epochs diagnosed"] == ["1", "init"]
    assert final["D6/coverage/lvl0"] == ["0.700 ± 0.000 (n=2)", "0.500 ± n/a (n=1)"]
    run = summarize.load_run(str(tmp_path / "v3.0.4" / "seed0"))
    assert [p["epoch"] for p in run.diag_curve] == [-1, 0, 1]
    assert [p["epoch"] for p in run.curve] == [0, 1] and run.epochs_logged == 2 and not run.notes
    assert (tmp_path / "ap_diag.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- visualize_refs

def test_reference_entries_shapes():
    """Each supported reference layout becomes (x, y, colour, label) entries, duplicates dropped."""
    per_level = torch.tensor([[[[0.1, 0.2], [0.3, 0.4], [0.1, 0.2], [0.5, 0.6]]]])       # (1, 1, L=4, 2)
    entries = visualize_refs.reference_entries(per_level, 0)
    assert [e[2] for e in entries] == [0, 1, 2, 3]                   # colour per level
    per_point = torch.tensor([[0.2, 0.2], [0.7, 0.1]]).expand(1, 1, 3, 2, 2)             # (1, 1, L, P=2, 2)
    entries = visualize_refs.reference_entries(per_point, 0)
    assert sorted((e[2], e[3]) for e in entries) == [(0, "point 0"), (1, "point 1")]    # same on every level
    per_head = torch.rand(1, 2, 4, 3, 2, 2)                                              # (bs, T, H, L, P, 2)
    assert {e[2] for e in visualize_refs.reference_entries(per_head, 1)} == {0, 1}
    boxes = torch.tensor([0.5, 0.5, 0.2, 0.2]).expand(1, 1, 2, 4)                       # (1, 1, L, 4)
    assert [(e[0], e[1]) for e in visualize_refs.reference_entries(boxes, 0)] == [(0.5, 0.5)] * 2


def test_choose_tokens_spreads_over_levels():
    shapes = [(4, 4), (2, 2), (1, 1)]
    weights = torch.zeros(21)
    weights[5], weights[16 + 3], weights[20] = 1.0, 5.0, 9.0
    tokens = visualize_refs.choose_tokens(weights, shapes, 3)
    assert tokens == [5, 19, 20]  # the best of each level, finest first
    assert visualize_refs.token_position(19, shapes) == (1, 0.75, 0.75)


def test_visualize_refs_guided_random_init(tmp_path):
    """A random-init guided model: non-empty PNGs, and the guided layer's references are not stock."""
    run = visualize_refs.load_model(TINY_GUIDED + ["--variant", "v3.0.4"])
    image = torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(0))

    _, record = visualize_refs.run_model(run.model, image, run.device)
    stock, guided = record.encoder_references
    assert guided.shape[:2] == stock.shape[:2] and guided.shape[-3:] == (4, 4, 2)  # (bs, T, L, P, 2)
    # v3.0.4 keeps point 0 at the token itself; the other points come from the map
    assert torch.allclose(guided[..., 0, :], stock, atol=1e-5)
    assert not torch.allclose(guided[..., 1:, :], stock[..., None, :].expand_as(guided[..., 1:, :]), atol=1e-3)

    paths = visualize_refs.visualize(run, image, str(tmp_path / "vis"), tokens=2)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["attn_map.png", "predictions.png", "refs_token_0.png", "refs_token_1.png"]
    assert all(os.path.getsize(p) > 1000 for p in paths)


def test_visualize_refs_command_line_on_image_file(tmp_path):
    from PIL import Image
    pixels = (torch.rand(50, 70, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "img.png")
    out = tmp_path / "vis"
    argv = ["--image", str(tmp_path / "img.png"), "--out", str(out), "--tokens", "1", "--eval_size", "64",
            "--max_size", "96", "--map_queries", "top"] + TINY_GUIDED + ["--variant", "cascade"]
    assert visualize_refs.main(argv) == 0
    assert sorted(os.listdir(out)) == ["attn_map.png", "predictions.png", "refs_token_0.png"]


def test_visualize_refs_on_synthetic_image(tmp_path):
    data = ["--dataset_file", "synthetic", "--coco_path", str(tmp_path / "data"), "--synthetic_num_train", "1",
            "--synthetic_num_val", "3", "--synthetic_image_size", "64", "--eval_size", "64", "--max_size", "96",
            "--num_classes", "7"]  # the synthetic category ids go up to 6: loading checks they fit the classifier
    args = random_init_configuration(TINY_GUIDED + data)
    image = visualize_refs.load_image("synthetic:2", args)
    assert image.shape[0] == 3 and min(image.shape[1:]) == 64  # val image 2 through the evaluation transforms
    assert not torch.equal(image, visualize_refs.load_image("synthetic:0", args))
    out = tmp_path / "vis"
    argv = ["--image", "synthetic:2", "--out", str(out), "--tokens", "1"] + TINY_GUIDED + data + ["--variant", "v3.0.2"]
    assert visualize_refs.main(argv) == 0
    assert sorted(os.listdir(out)) == ["attn_map.png", "predictions.png", "refs_token_0.png"]
    assert all((out / name).stat().st_size > 1000 for name in os.listdir(out))


@pytest.mark.parametrize("variant", ["v3.0.4_gt", "v3.0.4_random"])
def test_visualize_refs_runs_the_controls(tmp_path, capsys, variant):
    """The oracle reads the synthetic image's ground truth (a file has none: one line, exit 2); the
    random ranking gets its seed."""
    data = ["--dataset_file", "synthetic", "--coco_path", str(tmp_path / "data"), "--synthetic_num_train", "1",
            "--synthetic_num_val", "3", "--synthetic_image_size", "64", "--eval_size", "64", "--max_size", "96",
            "--num_classes", "7"]
    out = tmp_path / "vis"
    argv = ["--image", "synthetic:1", "--out", str(out), "--tokens", "1"] + TINY_GUIDED + data + ["--variant", variant]
    assert visualize_refs.main(argv) == 0
    assert sorted(os.listdir(out)) == ["attn_map.png", "predictions.png", "refs_token_0.png"]
    if variant == "v3.0.4_gt":
        from PIL import Image
        Image.new("RGB", (40, 30)).save(tmp_path / "img.png")
        argv[1] = str(tmp_path / "img.png")
        capsys.readouterr()
        assert visualize_refs.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--image synthetic" in err[0]


@pytest.mark.parametrize("height, width, expected", [
    # upstream's rule at eval_size 480, max_size 800 (see datasets.transforms.scaled_size)
    (100, 177, (452, 800)),   # 1.77 * 480 = 849.6 > 800: shorter side round(800 * 100 / 177) = round(451.98)
                              # = 452, longer int(452 * 177 / 100) = int(800.04) = 800
    (177, 100, (800, 452)),
    (300, 400, (480, 640)),   # shorter side binds: 480, int(480 * 400 / 300) = 640
    (37, 61, (480, 791)),     # int(480 * 61 / 37) = int(791.35) = 791, under max_size
    (480, 333, (691, 480)),   # int(480 * 480 / 333) = int(691.89) = 691
    (50, 500, (80, 800)),     # round(800 * 50 / 500) = 80, int(80 * 500 / 50) = 800
])
def test_visualize_refs_input_matches_evaluation_transform(tmp_path, height, width, expected):
    """A file image reaches the model at the size (and with the values) evaluation gives it."""
    from PIL import Image
    from datasets.coco import transforms_from_args
    pixels = (torch.rand(height, width, 3, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(pixels.numpy()).save(path)
    args = random_init_configuration(TINY_GUIDED + ["--eval_size", "480", "--max_size", "800"])

    image = visualize_refs.load_image(str(path), args)
    assert tuple(image.shape) == (3, *expected)
    evaluated, _ = transforms_from_args("val", args)(Image.open(path).convert("RGB"), None)
    assert torch.equal(image, evaluated)
    # without resizing: the file's own size, normalised as the data pipeline does (pixel 0 by hand)
    raw = visualize_refs.load_image(str(path), args, resize=False)
    assert tuple(raw.shape) == (3, height, width)
    by_hand = (pixels[0, 0].double() / 255 - torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)) \
        / torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)
    assert torch.allclose(raw[:, 0, 0].double(), by_hand, atol=1e-6)
    # drawing undoes the normalisation
    assert torch.allclose(torch.from_numpy(visualize_refs.display_image(raw))[0, 0].double() * 255,
                          pixels[0, 0].double(), atol=1e-3)


# ----------------------------------------------------------------------------- bench_model

REQUIRED_BENCH_KEYS = {"variant", "stages", "image_size", "batch_size", "device", "dtype", "step_s", "peak_mem_mb",
                       "mem_kind", "params"}


def test_bench_model_prints_json(capsys):
    argv = ["--image_size", "64", "128", "--warmup", "0", "--repeats", "1", "--batch_size", "1"] + TINY_GUIDED
    assert bench_model.main(argv + ["--variant", "v3.0.4"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1
    record = lines[0]
    assert REQUIRED_BENCH_KEYS <= set(record)
    assert record["variant"] == "v3.0.4" and record["stages"] == "1:1,1:1" and record["image_size"] == [64, 128]
    assert record["device"] == "cpu" and record["dtype"] == "fp32" and record["step_s"] > 0
    assert record["peak_mem_mb"] > 0 and record["params"] > 0


def test_bench_model_compare_interleaves(capsys):
    argv = ["--image_size", "64", "128", "--warmup", "1", "--repeats", "2", "--batch_size", "1",
            "--compare", "cascade", "v3.0.4"] + TINY_GUIDED
    assert bench_model.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [r.get("variant") for r in lines[:2]] == ["cascade", "v3.0.4"]
    assert all(r["repeats"] == 2 for r in lines[:2])
    ratio = lines[2]
    assert ratio["ratio"] == "v3.0.4/cascade"
    assert ratio["step_s"] == pytest.approx(lines[1]["step_s"] / lines[0]["step_s"], rel=1e-2)


def test_bench_model_compare_flag_sets(capsys):
    """--compare_flags: the same configuration with and without a flag set (here denoising)."""
    assert bench_model.flag_set_tokens("use_dn dn_number=4") == ["--use_dn", "--dn_number", "4"]
    assert bench_model.flag_set_tokens("base") == []
    argv = ["--image_size", "64", "128", "--warmup", "0", "--repeats", "1", "--batch_size", "1",
            "--compare_flags", "base", "use_dn dn_number=4"] + TINY_GUIDED + ["--variant", "cascade"]
    assert bench_model.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [r.get("label") for r in lines[:2]] == ["base", "use_dn dn_number=4"]
    assert lines[1]["params"] > lines[0]["params"]  # the label embedding: the flag set did reach the model
    assert lines[2]["ratio"] == "use_dn dn_number=4/base"


def test_live_tensor_bytes_counts_allocations_and_releases():
    """The CPU peak counter: new storages count until released; views and in-place ops do not."""
    base = torch.zeros(1000)                       # exists before: not counted
    with bench_model.LiveTensorBytes() as tracker:
        a = base + 1                               # 4000 new bytes
        view = a[:10]                              # a view: nothing new
        a.mul_(2)                                  # in place: nothing new
        b = torch.ones(500) * 3                    # 2000 (ones) + 2000 (product), ones freed at once
        del a, view
        after_release = tracker.live
    assert tracker.peak == 4000 + 2000 + 2000
    assert after_release == 2000 and b.numel() == 500


def test_benchmark_dispatcher_model(capsys):
    import benchmark
    argv = ["model", "--image_size", "64", "128", "--warmup", "0", "--repeats", "1", "--batch_size", "1"]
    assert benchmark.main(argv + TINY_GUIDED + ["--variant", "cascade"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["variant"] == "cascade"
    assert benchmark.main(["nonsense"]) == 2


def test_benchmark_dispatcher_op(capsys):
    import benchmark
    argv = ["op", "--impl", "pytorch", "--shape", "tiny", "--device", "cpu", "--dtype", "float32",
            "--repeats", "1", "--warmup", "0"]
    assert benchmark.main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["impl"] == "pytorch" and "fwd_ms" in record


# ----------------------------------------------------------------------------- configs and launchers

def _config_files():
    # variants.yaml holds the presets themselves, not a config for --config
    return sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml")) if not p.endswith("variants.yaml"))


@pytest.mark.parametrize("path", _config_files(), ids=os.path.basename)
def test_config_file_parses(path):
    args = parse_args(["--config", path, "--device", "cpu", "--backbone_weights", "none"])
    assert args.device == "cpu"


@pytest.mark.parametrize("variant", VARIANTS + CONTROLS)
def test_variant_config_keeps_its_preset(variant):
    """The research base file must not override the knobs the variant preset sets."""
    args = parse_args(["--config", os.path.join(ROOT, "configs", f"{variant}.yaml"), "--device", "cpu",
                       "--backbone_weights", "none"])
    assert args.variant == variant
    for key, value in load_variants()[variant].items():
        if key == "stages":  # a named schedule, stored expanded
            value = expand_stages(value, args.enc_layers, args.dec_layers)
        assert getattr(args, key) == value, f"{variant}: {key}"
    # the research setting of the notes
    assert (args.backbone, args.enc_layers, args.dec_layers, args.epochs, args.lr_drop) == ("resnet18", 6, 6, 12, 11)


def _launch(script, *args, env_extra=None, tmp_path):
    """Run a launcher with a stand-in for dist_train.sh that prints the arguments it got."""
    fake = tmp_path / "fake_dist_train.sh"
    fake.write_text('printf "%s\\n" "$@"\n')
    env = dict(os.environ, DIST_TRAIN=str(fake), **(env_extra or {}))
    done = subprocess.run(["bash", os.path.join(SCRIPTS, script), *args], env=env, capture_output=True, text=True,
                          check=True)
    return done.stdout.split("\n")[:-1]


def test_variant_script_command_line(tmp_path):
    got = _launch("v3.0.4.sh", "2", "--epochs", "1", tmp_path=tmp_path, env_extra={"COCO_PATH": "/data/coco"})
    assert got[0] == "2"
    assert got[got.index("--config") + 1] == os.path.join(ROOT, "configs", "v3.0.4.yaml")
    assert got[got.index("--coco_path") + 1] == "/data/coco"
    assert got[got.index("--output_dir") + 1] == "outputs/v3.0.4"
    assert got[-2:] == ["--epochs", "1"] and "--two_stage" not in got


def test_variant_script_two_stage_and_default_gpus(tmp_path):
    got = _launch("cascade.sh", "--lr", "1e-4", tmp_path=tmp_path, env_extra={"TWO_STAGE": "1", "TAG": "try"})
    assert got[0] == "4"
    assert got[got.index("--output_dir") + 1] == "outputs/cascade-try-two_stage"
    assert "--two_stage" in got and "--mixed_selection" in got


def test_variant_script_seed(tmp_path):
    got = _launch("v3.0.4.sh", "1", tmp_path=tmp_path, env_extra={"SEED": "7", "TWO_STAGE": "1"})
    assert got[got.index("--output_dir") + 1] == "outputs/v3.0.4-two_stage/seed7"
    assert got[got.index("--seed") + 1] == "7"
    bad = subprocess.run(["bash", os.path.join(SCRIPTS, "v3.0.4.sh")], env=dict(os.environ, SEED="x"),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "SEED" in bad.stderr


def _ablation(tmp_path, **env):
    """scripts/ablation.sh with stand-ins for the launcher and for python: the command lines it runs."""
    fake_train = tmp_path / "fake_dist_train.sh"
    fake_train.write_text('echo "train: $*"\n')
    fake_python = tmp_path / "fake_python.sh"
    fake_python.write_text('#!/usr/bin/env bash\necho "python: $*"\n')
    fake_python.chmod(0o755)
    done = subprocess.run(["bash", os.path.join(SCRIPTS, "ablation.sh"), "2", "--epochs", "1"], capture_output=True,
                          text=True, check=True,
                          env=dict(os.environ, DIST_TRAIN=str(fake_train), PYTHON=str(fake_python), **env))
    trains = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("train: ")]
    summary = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("python: ")]
    return trains, summary


def test_ablation_runs_every_seed_of_every_variant(tmp_path):
    trains, summary = _ablation(tmp_path, VARIANTS="cascade v3.0.4", STAGE_MODES="single two", SEEDS="0 1")
    runs = [(t[t.index("--output_dir") + 1], t[t.index("--seed") + 1]) for t in trains]
    expected_dirs = [f"outputs/{v}{form}/seed{s}" for form in ("", "-two_stage") for v in ("cascade", "v3.0.4")
                     for s in (0, 1)]
    assert runs == [(d, d[-1]) for d in expected_dirs]
    assert all(t[0] == "2" and t[-2:] == ["--epochs", "1"] for t in trains)
    assert summary == [["scripts/summarize.py"] + expected_dirs + ["--control", "cascade", "--out",
                                                                   "outputs/ablation.md", "--plot",
                                                                   "outputs/ablation.png"]]


def test_ablation_runs_the_controls_when_asked(tmp_path):
    trains, summary = _ablation(tmp_path, VARIANTS="cascade v3.0.4", STAGE_MODES="single", CONTROLS="1")
    rows = ["cascade", "v3.0.4"] + CONTROLS
    assert [t[t.index("--output_dir") + 1] for t in trains] == [f"outputs/{v}" for v in rows]
    assert all(t[t.index("--config") + 1].endswith(f"configs/{v}.yaml")
               for t, v in zip(trains, rows))
    trains, _ = _ablation(tmp_path, VARIANTS="cascade", STAGE_MODES="single")
    assert len(trains) == 1


def test_ablation_without_seeds_runs_once_as_before(tmp_path):
    trains, summary = _ablation(tmp_path, VARIANTS="baseline cascade", STAGE_MODES="single")
    assert [t[t.index("--output_dir") + 1] for t in trains] == ["outputs/baseline", "outputs/cascade"]
    assert not any("--seed" in t for t in trains)
    assert summary[0][1:3] == ["outputs/baseline", "outputs/cascade"]


def test_shell_scripts_are_valid_bash():
    for script in glob.glob(os.path.join(SCRIPTS, "*.sh")):
        subprocess.run(["bash", "-n", script], check=True)


def test_summarize_reads_diagnostics_computed_after_the_run(tmp_path):
    """diagnose.py's output in RUN/diagnostics/ fills the epochs the log has no diag record of; a
    logged record of the same epoch wins."""
    run_dir = tmp_path / "v3.0.4" / "seed0"
    _write_run(str(run_dir), {"variant": "v3.0.4", "seed": 0, "epochs": 2},
               [_epoch(0, 0.1), _epoch(1, 0.2), {"type": "diag", "epoch": 1, "N": 4, "D4/fg_in_img": 0.9}])
    os.makedirs(run_dir / "diagnostics")
    evaluations = [{"checkpoint": "ckpt_epoch0.pth", "epoch": 0,
                    "metrics": {"D4/fg_in_img": 0.5, "D4/fg_in_img/enc0/lvl0": 0.4}},
                   {"checkpoint": "ckpt_epoch1.pth", "epoch": 1, "metrics": {"D4/fg_in_img": 0.7}}]
    (run_dir / "diagnostics" / "diagnostics.json").write_text(json.dumps({"N": 4, "evaluations": evaluations}))
    run = summarize.load_run(str(run_dir))
    assert run.diag_curve == [{"epoch": 0.0, "D4/fg_in_img": 0.5}, {"epoch": 1.0, "D4/fg_in_img": 0.9}]
