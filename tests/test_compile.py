"""The registered operator (torch.library), torch.compile / torch.export through it, and main.py --compile.

On CPU the registered op ``msda::ms_deform_attn`` runs the PyTorch path as its kernel, so its
fake, autograd and schema registrations can be checked here; on a GPU the same registrations
front the compiled kernels. The dispatcher sends CPU tensors straight to the PyTorch path, so
the "compiled route" (what CUDA tensors take) is forced with a patch where a test needs it.

Backends. ``inductor`` (torch.compile's default) generates and compiles C++ for every graph,
about 20 s for one attention module and ~150 s for a detector training step on 2 CPU cores;
the detector tests use ``aot_eager``, which runs the same graph capture (dynamo), functionalised
forward and backward graphs (AOT autograd) and fake-tensor propagation, and only skips code
generation. The module test runs inductor itself.
"""
import copy
import functools

import pytest
import torch

import models
import ops
import ops.dispatch as dispatch
from models.level_layout import LevelLayout
from models.ms_deform_attn import MSDeformAttn
from ops import ms_deform_attn_pytorch, ms_deform_attn_registered
from ops.ms_deform_attn_cuda import _backward_op, _forward_op
from tests.helpers import TINY, simple_targets
from tests.test_ops import make_inputs
from cli.config import parse_args

LEVELS = [(6, 8), (3, 4)]


@pytest.fixture
def compiled_route(monkeypatch):
    """The dispatcher takes the compiled-op route (the registered op) for CPU tensors too."""
    monkeypatch.setattr(dispatch, "_impl_for_device_type", lambda device_type: "cuda")
    torch._dynamo.reset()
    yield monkeypatch
    torch._dynamo.reset()


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def op_inputs(dtype=torch.float32, seed=0):
    """value (2, Lin, 2, 4), shapes, starts, locations (2, 5, 2, 2, 2, 2), weights; some samples off the map."""
    return make_inputs(2, 5, 2, 4, LEVELS, 2, dtype=dtype, spread=(-0.3, 1.3), seed=seed)


def count_op_nodes(graph: torch.fx.Graph, name: str) -> int:
    return sum(1 for node in graph.nodes if name in str(node.target))


# ----------------------------------------------------------------------------------------------
# The registered op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("need_grad_value", [True, False], ids=["value_grad", "no_value_grad"])
def test_opcheck_forward_and_backward_ops(dtype, need_grad_value):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch agree with the kernel."""
    value, ss, starts, loc, attn = op_inputs(dtype)
    fwd_args = (value.requires_grad_(need_grad_value), ss, starts, loc.requires_grad_(True),
                attn.requires_grad_(True))
    torch.library.opcheck(_forward_op, fwd_args)  # raises with the failing check's name
    grad_out = torch.randn(2, 5, 8, dtype=dtype)
    bwd_args = (value.detach(), ss, starts, loc.detach(), attn.detach(), grad_out, need_grad_value)
    torch.library.opcheck(_backward_op, bwd_args)


def test_registered_op_matches_pytorch_path_with_autograd():
    """Output and all three gradients through torch.ops.msda equal autograd through the PyTorch path."""
    value, ss, starts, loc, attn = op_inputs(torch.float64)
    grad_out = torch.randn(2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = []
    for fn in (ms_deform_attn_registered, ms_deform_attn_pytorch):
        leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
        out = fn(leaves[0], ss, starts, leaves[1], leaves[2])
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_registered_op_dtypes_and_missing_value_grad():
    """bf16 value with bf16 locations: output bf16; locations reach the op as fp32, gradients come back bf16."""
    value, ss, starts, loc, attn = op_inputs()
    value, loc = value.bfloat16(), loc.bfloat16().requires_grad_(True)
    attn.requires_grad_(True)
    out = ms_deform_attn_registered(value, ss.int(), starts.int(), loc, attn)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert value.grad is None and loc.grad.dtype == torch.bfloat16 and attn.grad.dtype == torch.float32
    expected = ms_deform_attn_pytorch(value, ss, starts, loc.detach().float(), attn.detach())
    assert torch.equal(out, expected)


def test_cuda_only_entry_point_refuses_cpu_tensors():
    value, ss, starts, loc, attn = op_inputs()
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        ops.ms_deform_attn_cuda(value, ss, starts, loc, attn)


# ----------------------------------------------------------------------------------------------
# torch.compile / torch.export of the attention module


def module_and_inputs(seed=0):
    torch.manual_seed(seed)
    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    with torch.no_grad():  # non-zero offsets and weights so sampling is not at the initial pattern
        module.sampling_offsets.weight.normal_(0, 0.3)
        module.attention_weights.weight.normal_(0, 0.3)
    g = torch.Generator().manual_seed(seed)
    len_in = sum(h * w for h, w in LEVELS)
    query = torch.randn(2, 5, 16, generator=g)
    reference = torch.rand(2, 5, 2, 2, generator=g)
    flat = torch.randn(2, len_in, 16, generator=g)
    padding = torch.zeros(2, len_in, dtype=torch.bool)
    padding[1, -5:] = True
    layout = LevelLayout(torch.tensor(LEVELS), LEVELS, torch.tensor([0, LEVELS[0][0] * LEVELS[0][1]]), padding)
    return module, (query, reference, flat, layout), {}


def forward_backward(module, args, kwargs):
    """Output and the gradients of every parameter and of the query, for a fixed output weighting."""
    module.zero_grad(set_to_none=True)
    query = args[0].clone().requires_grad_(True)
    out = module(query, *args[1:], **kwargs).output
    weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
    (out * weights).sum().backward()
    return [out.detach(), query.grad] + [p.grad for p in module.parameters()]


@pytest.mark.slow
def test_module_compiles_fullgraph_with_inductor_and_matches_eager(fresh_dynamo):
    """The CPU route (PyTorch path inlined into the graph) under the default backend, fullgraph."""
    module, args, kwargs = module_and_inputs()
    expected = forward_backward(module, args, kwargs)
    got = forward_backward(torch.compile(module, fullgraph=True), args, kwargs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_module_compiles_fullgraph_through_registered_op(compiled_route):
    """The CUDA route: the registered op is one node of a single graph, forward and backward match eager."""
    module, args, kwargs = module_and_inputs()
    expected = forward_backward(module, args, kwargs)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.graph)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(module, fullgraph=True, backend=recording_backend)
    got = forward_backward(compiled, args, kwargs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)
    assert len(graphs) == 1 and count_op_nodes(graphs[0], "msda.ms_deform_attn") == 1
    assert count_op_nodes(graphs[0], "grid_sampler") == 0 and count_op_nodes(graphs[0], "grid_sample") == 0


def test_export_sees_one_operator_node(compiled_route):
    module, args, kwargs = module_and_inputs()
    exported = torch.export.export(module, args, kwargs=kwargs)
    graph = exported.graph
    assert count_op_nodes(graph, "msda.ms_deform_attn") == 1
    assert count_op_nodes(graph, "grid_sampler") == 0
    torch.testing.assert_close(exported.module()(*args, **kwargs), module(*args, **kwargs), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# The detector and main.py --compile

SMALL = ["--hidden_dim", "32", "--enc_layers", "1", "--dec_layers", "1", "--num_feature_levels", "2",
         "--dim_feedforward", "64"]


def small_detector(*extra):
    args = parse_args(TINY + SMALL + list(extra))
    args.num_classes = 5
    torch.manual_seed(0)
    model, criterion, _ = models.build_model(args)
    return args, model, criterion


def small_batch():
    from util.nested_tensor import nested_tensor_from_tensor_list

    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 64, 80, generator=g), torch.randn(3, 72, 56, generator=g)]
    return nested_tensor_from_tensor_list(images), simple_targets()


def test_detector_traces_without_graph_breaks(compiled_route):
    """The whole detector forward is one graph, and every deformable attention call is one op node."""
    _, model, _ = small_detector()
    samples, _ = small_batch()
    calls = []
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.register_forward_hook(lambda *_: calls.append(1))
    model(samples)
    eager_calls = len(calls)
    explained = torch._dynamo.explain(model)(samples)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    assert eager_calls >= 2  # encoder and decoder attention
    assert count_op_nodes(explained.graphs[0].graph, "msda.ms_deform_attn") == eager_calls


def test_compile_flag_is_off_by_default_and_parses():
    assert parse_args(TINY).compile is False
    assert parse_args(TINY + ["--compile"]).compile is True


def test_compile_flag_training_step_matches_eager(fresh_dynamo, monkeypatch):
    """One train_step of main.py's --compile model equals the eager step: losses and updated weights."""
    import main as main_module
    from engine import train_step
    from util.optim import build_optimizer

    args, model, criterion = small_detector("--compile")
    eager_model = copy.deepcopy(model)
    samples, targets = small_batch()
    # main.py calls torch.compile(model); see the module docstring for the backend.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = main_module.compile_if_asked(model, args)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert main_module.compile_if_asked(eager_model, parse_args(TINY)) is eager_model

    def one_step(trained, called):
        optimizer = build_optimizer(trained, args)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        values, _ = train_step(called, criterion, samples, targets, optimizer, torch.device("cpu"), "off", 0.1,
                               params)
        return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in values.items()}

    before = [p.detach().clone() for p in model.parameters()]
    eager_values = one_step(eager_model, eager_model)
    compiled_values = one_step(model, compiled)
    assert eager_values.keys() == compiled_values.keys()
    for key, value in eager_values.items():
        assert compiled_values[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    moved = 0
    for p_compiled, p_eager, p_before in zip(model.parameters(), eager_model.parameters(), before):
        torch.testing.assert_close(p_compiled, p_eager, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(p_compiled, p_before))
    assert moved > 0  # the step really trained
