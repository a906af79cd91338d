"""Distributed training on the CPU (gloo): 2 processes x batch 1 == 1 process x batch 2, and the launchers.

The same file is the worker: ``python tests/test_distributed.py OUT_FILE`` run by two processes with
torchrun-style environment variables computes one step and (rank 0) saves loss and gradients.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # when run as a worker script
    sys.path.insert(0, REPO)

from tests.helpers import TINY, tiny_args  # noqa: E402

# the richest loss: box refinement, two-stage proposals, hybrid one-to-many queries
MODEL_FLAGS = ["--with_box_refine", "--two_stage", "--mixed_selection", "--look_forward_twice",
               "--num_queries_one2many", "12", "--k_one2many", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    """Two images of the SAME size (so a batch of two has no padding) and their targets."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 96, 112, generator=g) for _ in range(2)]
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.5]])},
    ]
    return images, targets


def _build():
    import models

    args = tiny_args(*MODEL_FLAGS)
    torch.manual_seed(0)  # identical initial weights in every process
    model, criterion, _ = models.build_model(args)
    return args, model, criterion


def _step(model, criterion, images, targets):
    """Forward + backward of one batch; returns (logged loss values, gradients by name)."""
    from engine import weigh_losses
    from util.dist import reduce_dict
    from util.nested_tensor import nested_tensor_from_tensor_list

    outputs = model(nested_tensor_from_tensor_list(images))
    total, values = weigh_losses(criterion(outputs, targets), criterion.weight_dict)
    total.backward()
    values = {k: v for k, v in values.items() if k != "class_error"}  # a per-batch accuracy, not additive
    values = {k: float(v) for k, v in reduce_dict({k: v.detach() for k, v in values.items()}).items()}
    inner = getattr(model, "module", model)  # DDP's names carry a 'module.' prefix
    grads = {n: p.grad.detach().clone() for n, p in inner.named_parameters() if p.grad is not None}
    return values, grads


def worker(out_file: str) -> None:
    from util.dist import init_distributed_mode

    args, model, criterion = _build()
    place = init_distributed_mode(args.device, args.local_rank)
    assert place.distributed and place.world_size == 2 and place.backend == "gloo" and place.device == "cpu"
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    images, targets = _batch()
    mine = slice(place.rank, place.rank + 1)
    values, grads = _step(ddp, criterion, images[mine], targets[mine])
    # a second step: DDP complains here if some parameter got no gradient in the first one
    model.zero_grad(set_to_none=True)
    _step(ddp, criterion, images[mine], targets[mine])
    if place.rank == 0:
        torch.save({"values": values, "grads": grads}, out_file)
    torch.distributed.destroy_process_group()


def test_two_processes_match_one_process(tmp_path):
    out_file = str(tmp_path / "ddp.pt")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), out_file], cwd=REPO,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)

    _, model, criterion = _build()
    images, targets = _batch()
    single_values, single_grads = _step(model, criterion, images, targets)
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"parameters without gradient in training (DDP would need find_unused_parameters): {unused}"

    ddp = torch.load(out_file)
    assert ddp["values"].keys() == single_values.keys()
    for k, v in single_values.items():
        assert ddp["values"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    assert ddp["grads"].keys() == single_grads.keys()
    for name, grad in single_grads.items():
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-3, atol=1e-5, msg=name)


def _tiny_run_flags(tmp_path):
    return [*TINY, "--dataset_file", "synthetic", "--coco_path", str(tmp_path / "data"),
            "--synthetic_num_train", "8", "--synthetic_num_val", "4", "--synthetic_image_size", "96",
            "--min_size", "96", "--max_size", "128", "--no-random_crop", "--num_workers", "0", "--batch_size", "1",
            "--epochs", "1", "--max_iters_per_epoch", "2", "--print_freq", "1", "--no-tensorboard",
            "--output_dir", str(tmp_path / "out")]


@pytest.mark.parametrize("launcher", ["dist_train.sh", "run_dist_launch.sh"])
def test_launcher_runs_main_on_two_cpu_processes(tmp_path, launcher):
    env = dict(os.environ, MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", launcher), "2", *_tiny_run_flags(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "checkpoint.pth").is_file() and (out / "detections_val.json").is_file()
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    # only rank 0 writes: one record per window and one epoch record
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 2]
    assert len([r for r in records if r["type"] == "epoch"]) == 1
    assert proc.stdout.count("number of params") == 1  # only rank 0 prints


if __name__ == "__main__":
    worker(sys.argv[1])
