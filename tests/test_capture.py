"""Activation capture: in-place activations and residual adds, ResNet-style models, weight sharing,
eval-mode / no_grad forwards, and gradient accumulation with the plain ``loss.backward()``."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from steps import train_step
from torch import nn

from spngd_ext import SPNGD

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("float64_default")]


def snapshot_factors(opt) -> dict:
    return {n: {k: v.clone() for k, v in d.items()} for n, d in opt.factors().items()}


def assert_factors_equal(fa: dict, fb: dict, exact: bool = True, what: str = "") -> None:
    assert set(fa) == set(fb), what
    for n in fa:
        assert set(fa[n]) == set(fb[n]), f"{what} {n}"
        for k in fa[n]:
            if exact:
                assert torch.equal(fa[n][k], fb[n][k]), (
                    f"{what} {n}.{k}: max diff {(fa[n][k] - fb[n][k]).abs().max().item():.3e}"
                )
            else:
                torch.testing.assert_close(
                    fa[n][k], fb[n][k], rtol=1e-10, atol=1e-13, msg=lambda m, n=n, k=k: f"{what} {n}.{k}: {m}"
                )


# ================================================================================ in-place
class ResidualNet(nn.Module):
    """Conv→BN→ReLU(inplace)→Conv→BN→ReLU(inplace)→Conv→BN→(+= residual)→ReLU(inplace)→Linear."""

    def __init__(self, inplace: bool, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inplace = inplace
        self.conv0, self.bn0 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.relu0, self.relu1, self.relu2 = (nn.ReLU(inplace=inplace) for _ in range(3))
        self.fc = nn.Linear(4, 5)
        with torch.no_grad():
            for bn in (self.bn0, self.bn1, self.bn2):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)

    def forward(self, x):
        h = self.relu0(self.bn0(self.conv0(x)))
        out = self.relu1(self.bn1(self.conv1(h)))
        out = self.bn2(self.conv2(out))
        if self.inplace:
            out += h
        else:
            out = out + h
        out = self.relu2(out)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@pytest.mark.parametrize("fisher", ["emp", "mc"])
def test_inplace_model_gives_exactly_the_same_factors_and_updates(fisher):
    a, b = ResidualNet(inplace=True), ResidualNet(inplace=False)
    b.load_state_dict(a.state_dict())
    kw = dict(lr=0.1, momentum=0.9, damping=1e-2, fisher=fisher, backend="torch", seed=4)
    oa, ob = SPNGD(a, **kw), SPNGD(b, **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x, y = torch.randn(6, 2, 5, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
        for model, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            out = model(x)
            opt.backward(F.cross_entropy(out, y), out)
            opt.step()
        fa = snapshot_factors(oa)
        assert {n for n, d in fa.items() if d} == {"conv0", "bn0", "conv1", "bn1", "conv2", "bn2", "fc"}
        assert_factors_equal(fa, snapshot_factors(ob), exact=True, what=f"step {step}")
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), f"step {step} {n}: {(p - q).abs().max().item():.3e}"


def test_inplace_capture_sees_the_pre_modification_output_gradient():
    """The BN output that ReLU(inplace) and the residual add overwrite: its G-side statistic must be
    the gradient w.r.t. the BN output itself, checked against an independent autograd computation."""
    model = ResidualNet(inplace=True)
    ref = ResidualNet(inplace=False)
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 5, (6,))
    opt = SPNGD(model, lr=0.0, momentum=0.0, fisher="emp", backend="torch")
    opt.zero_grad()
    out = model(x)
    opt.backward(F.cross_entropy(out, y), out)
    opt.step()
    # brute force for bn2 (the one modified by the in-place residual add): per-channel u = [Σ g x̂, Σ g]
    store = {}

    def fwd(mod, inp, o):
        store["x"] = inp[0].detach().clone()
        o.register_hook(lambda gr: store.__setitem__("g", gr.detach().clone()))

    h = ref.bn2.register_forward_hook(fwd)
    F.cross_entropy(ref(x), y).backward()
    h.remove()
    xs = store["x"]
    xhat = (xs - xs.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        xs.var((0, 2, 3), unbiased=False, keepdim=True) + ref.bn2.eps
    )
    gn = store["g"] * x.shape[0]
    ug, ub = (gn * xhat).sum((2, 3)), gn.sum((2, 3))
    expected = torch.stack([(ug * ug).mean(0), (ug * ub).mean(0), (ub * ub).mean(0)], dim=1)
    torch.testing.assert_close(opt.factors()["bn2"]["F"], expected, rtol=1e-10, atol=1e-13)


# ================================================================================ ResNet
class BasicBlock(nn.Module):
    """torchvision-style BasicBlock: ReLU(inplace=True) and an in-place residual add."""

    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)  # the same ReLU module called twice, as in torchvision


class MiniResNet18(nn.Module):
    """ResNet-18 topology (7×7 stem, max-pool, 4 stages × 2 BasicBlocks) with narrow widths."""

    def __init__(self, num_classes: int = 10, widths=(8, 16, 24, 32)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(c, w, stride), BasicBlock(w, w)))
            c = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet_models():
    models = [pytest.param(lambda: MiniResNet18(), id="basicblock-resnet18-topology")]
    if importlib.util.find_spec("torchvision") is not None:

        def tv():
            import torchvision

            return torchvision.models.resnet18(num_classes=10)

        models.append(pytest.param(tv, id="torchvision-resnet18"))
    return models


# The convolutions checked against im2col: the 7×7 stride-2 stem, a 3×3 stride-1 one (the PyTorch
# path's shifted-correlation route), a 3×3 stride-2 one and a 1×1 stride-2 downsample (im2col route).
RESNET_CONVS = ("conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.0.downsample.0")


def relative_error(got: torch.Tensor, expect: torch.Tensor) -> float:
    return ((got.double() - expect).norm() / expect.norm()).item()


@pytest.mark.parametrize("factory", _resnet_models())
def test_resnet18_style_model_factors_match_im2col_and_per_example_gradients(factory):
    """One fisher="emp" step of a train-mode ResNet-18 (fp32, batch 8, 3×32×32): the captured A of
    four convolutions equals (1/N)·Σ patchesᵀpatches from F.unfold of the input that conv saw, G of
    layer1.0.conv1 equals (1/(N·T))·Σ gᵀg of its per-position output gradients (×N), the fc layer's
    A equals (1/N)·Σ [h;1][h;1]ᵀ and its G equals (1/N)·Σ (p_n − e_{y_n})(p_n − e_{y_n})ᵀ, the
    per-example gradients of the cross-entropy written from the softmax (all float64 here); the fc
    update is lr·Ĝ⁻¹[∇W | ∇b]Â⁻¹ from opt.inverses(). Tolerances (relative Frobenius error): 1e-5 for
    the factors, float32 sums of ≤ 2,048 rows (measured ≤ 3.3e-7); 1e-3 for the fc update, a float32
    product with a 513×513 damped inverse read back as a difference of float32 weights (measured
    6.4e-5). An error of 1% in any of them fails."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    model = factory()
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    lr = 0.05
    opt = SPNGD(model, lr=lr, momentum=0.9, damping=1e-2, fisher="emp", backend="torch")
    kinds = [layer.kind for layer in opt.layers]
    assert (
        kinds.count("conv2d") == n_conv == 20 and kinds.count("batchnorm") == n_bn == 20 and kinds.count("linear") == 1
    )
    modules = dict(model.named_modules())
    inputs, out_grads = {}, {}

    def record(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach().clone()  # clone: a later in-place ReLU may reuse the storage
            if name == "layer1.0.conv1":
                output.register_hook(lambda g: out_grads.__setitem__(name, g.detach().clone()))

        return hook

    handles = [modules[name].register_forward_hook(record(name)) for name in (*RESNET_CONVS, "fc")]
    n = 8
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    fc_before = {k: v.detach().clone() for k, v in modules["fc"].named_parameters()}
    opt.zero_grad()
    out = model(x)
    opt.backward(F.cross_entropy(out, y), out)
    fc_grad = {k: v.grad.detach().clone() for k, v in modules["fc"].named_parameters()}
    opt.step()
    for h in handles:
        h.remove()
    assert opt.counters["steps"] == 1 and opt.counters["skipped_steps"] == 0 and opt.counters["factor_updates"] == 1
    factors = opt.factors()
    for layer in opt.layers:
        assert factors[layer.name], f"{layer.name} has no statistics"

    tol = 1e-5
    for name in RESNET_CONVS:
        conv = modules[name]
        cols = F.unfold(
            inputs[name].double(), conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
        )
        cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (N·T, C·kh·kw), no bias column
        err = relative_error(factors[name]["A"], cols.T @ cols / n)
        assert err <= tol, f"{name}.A: relative error {err:.2e}"
    grad_rows = (
        (out_grads["layer1.0.conv1"].double() * n)
        .permute(0, 2, 3, 1)
        .reshape(-1, modules["layer1.0.conv1"].out_channels)
    )
    err = relative_error(factors["layer1.0.conv1"]["G"], grad_rows.T @ grad_rows / grad_rows.shape[0])
    assert err <= tol, f"layer1.0.conv1.G: relative error {err:.2e}"

    h = torch.cat([inputs["fc"].double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    err = relative_error(factors["fc"]["A"], h.T @ h / n)
    assert err <= tol, f"fc.A: relative error {err:.2e}"
    per_example = torch.softmax(out.detach().double(), dim=1) - F.one_hot(y, 10).double()  # ∂ℓ_n/∂z_n
    err = relative_error(factors["fc"]["G"], per_example.T @ per_example / n)
    assert err <= tol, f"fc.G: relative error {err:.2e}"

    a_inv, g_inv = (t.double() for t in opt.inverses()["fc"])
    u = g_inv @ torch.cat([fc_grad["weight"], fc_grad["bias"][:, None]], dim=1).double() @ a_inv
    moved = torch.cat(
        [
            fc_before["weight"] - modules["fc"].weight.detach(),
            (fc_before["bias"] - modules["fc"].bias.detach())[:, None],
        ],
        dim=1,
    )
    err = relative_error(moved, lr * u)
    assert err <= 1e-3, f"fc update: relative error {err:.2e}"
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ================================================================================ weight sharing
class SharedNet(nn.Module):
    """``lin`` is applied twice in one forward (shared weights)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        h = torch.tanh(self.lin(h))
        return self.head(h)


def _rows(model, module, x, y, calls):
    """Every call's input rows (+1) and per-example output gradients N·∂loss/∂s of ``module``."""
    rows_a, rows_g = [], []

    def fwd(mod, inp, out):
        rows_a.append(torch.cat([inp[0].detach(), torch.ones(inp[0].shape[0], 1)], 1))
        out.register_hook(lambda g: rows_g.append(g.detach() * x.shape[0]))

    h = module.register_forward_hook(fwd)
    F.cross_entropy(model(x), y).backward()
    h.remove()
    model.zero_grad()
    assert len(rows_a) == calls and len(rows_g) == calls
    return torch.cat(rows_a), torch.cat(rows_g)


@pytest.mark.parametrize("use_opt_backward", [True, False], ids=["opt.backward", "loss.backward"])
def test_shared_layer_factors_average_the_rows_of_both_calls(use_opt_backward):
    """Library behaviour (capture.py docstring): each call of a shared layer contributes its rows;
    A and G are the averages over the 2N rows of both calls. The plain ``loss.backward()`` path
    (fisher='emp') must give the same factors as ``opt.backward(loss, out)``."""
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    model = SharedNet()
    ref = SharedNet()
    a_rows, g_rows = _rows(ref, ref.lin, x, y, calls=2)
    A_ref = a_rows.T @ a_rows / a_rows.shape[0]
    G_ref = g_rows.T @ g_rows / g_rows.shape[0]
    ha, hg = _rows(ref, ref.head, x, y, calls=1)
    opt = SPNGD(model, lr=0.1, momentum=0.0, fisher="emp", backend="torch")
    train_step(model, opt, x, y, use_opt_backward)
    est = opt.factors()["lin"]
    torch.testing.assert_close(est["A"], A_ref, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(est["G"], G_ref, rtol=1e-10, atol=1e-13)
    # the non-shared head sees its N rows as usual
    head = opt.factors()["head"]
    torch.testing.assert_close(head["A"], ha.T @ ha / ha.shape[0], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(head["G"], hg.T @ hg / hg.shape[0], rtol=1e-10, atol=1e-13)


# ================================================================================ eval / no_grad
def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4))


@pytest.mark.parametrize("fisher", ["emp", "mc"])
def test_eval_mode_and_no_grad_forwards_do_not_change_factors(fisher):
    a = _net()
    b = _net()
    b.load_state_dict(a.state_dict())
    kw = dict(lr=0.1, momentum=0.9, damping=1e-2, fisher=fisher, backend="torch", seed=1)
    oa, ob = SPNGD(a, **kw), SPNGD(b, **kw)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x, y = torch.randn(8, 1, 5, 5, generator=g), torch.randint(0, 4, (8,), generator=g)
        other = torch.randn(5, 1, 5, 5, generator=g) * 3.0
        # reference: a plain step
        oa.zero_grad()
        out = a(x)
        oa.backward(F.cross_entropy(out, y), out)
        oa.step()
        # the same step, with stray forwards before and after the training forward
        ob.zero_grad()
        with torch.no_grad():
            b(other)  # training mode, no grad
        b.eval()
        b(other)  # eval mode, grad enabled (e.g. a validation loss)
        with torch.no_grad():
            b(other)
        b.train()
        out = b(x)
        ob.backward(F.cross_entropy(out, y), out)
        b.eval()
        val = F.cross_entropy(b(other), torch.zeros(5, dtype=torch.long))  # eval forward between backward and step
        b.train()
        ob.step()
        assert torch.isfinite(val)
        assert_factors_equal(snapshot_factors(oa), snapshot_factors(ob), exact=True, what=f"step {step}")
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), f"step {step} {n}"


def test_forward_in_eval_mode_only_refreshes_nothing():
    """A step whose only forward ran in eval mode has no new statistics: factors stay as they were."""
    model = _net()
    opt = SPNGD(model, lr=0.1, fisher="emp", backend="torch")
    x, y = torch.randn(8, 1, 5, 5), torch.randint(0, 4, (8,))
    out = model(x)
    opt.backward(F.cross_entropy(out, y), out)
    opt.step()
    before = snapshot_factors(opt)
    model.eval()
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(8, 1, 5, 5)), y).backward()
    opt.step()
    assert_factors_equal(before, snapshot_factors(opt), exact=True, what="after eval-mode step")


# ================================================================================ accumulation
def _no_bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.Flatten(), nn.Linear(2 * 2 * 2, 4)
    )


@pytest.mark.parametrize("k", [2, 4])
def test_gradient_accumulation_with_plain_backward_matches_the_whole_batch(k):
    whole = _no_bn_net()
    parts = _no_bn_net()
    parts.load_state_dict(whole.state_dict())
    kw = dict(lr=0.2, momentum=0.9, weight_decay=1e-3, damping=1e-2, fisher="emp", backend="torch")
    ow, op = SPNGD(whole, **kw), SPNGD(parts, **kw)
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        x, y = torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
        ow.zero_grad()
        F.cross_entropy(whole(x), y).backward()
        ow.step()
        op.zero_grad()
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (F.cross_entropy(parts(xs), ys) / k).backward()
        op.step()
        assert_factors_equal(snapshot_factors(ow), snapshot_factors(op), exact=False, what=f"step {step}")
        for (n, p), q in zip(whole.named_parameters(), parts.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-13, msg=lambda m, n=n, s=step: f"step {s} {n}: {m}")
