"""The optimizer factory: parametrisations, parameter groups, both forms (Theorem 1, constant case)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_spa import SPA
from lightning_spa.factory import GroupedSGD, GroupedSPA, build_optimizer, resolve_hyperparameters, spa_param_groups


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(x)))


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 6) -> list[torch.Tensor]:
    for k in range(steps):
        x, y = _batch(k)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _twins() -> tuple[Net, Net]:
    torch.manual_seed(0)
    a = Net()
    b = Net()
    b.load_state_dict(a.state_dict())
    return a, b


def test_resolve_both_parametrisations() -> None:
    eta, c = resolve_hyperparameters(lr=0.1, momentum=0.9)
    assert eta == pytest.approx(1.0) and c == pytest.approx(0.1)
    eta, c = resolve_hyperparameters(lr=0.05, momentum=0.0)  # plain SGD: c = 1, eta = lr
    assert (eta, c) == (0.05, 1.0)
    assert resolve_hyperparameters(eta=2.0, c=0.5) == (2.0, 0.5)
    assert resolve_hyperparameters() == (1.0, 0.1)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"lr": 0.1, "momentum": 0.9, "c": 0.1}, "not both"),
        ({"eta": 1.0, "momentum": 0.9}, "not both"),
        ({"lr": 0.1}, "`momentum` is missing"),
        ({"c": 0.1}, "`eta` is missing"),
        ({"lr": 0.1, "momentum": 1.0}, "`momentum`=1.0"),
        ({"lr": 0.1, "momentum": -0.1}, "`momentum`=-0.1"),
        ({"lr": 0.0, "momentum": 0.9}, "`lr`=0.0"),
        ({"eta": 1.0, "c": 0.0}, "`c`=0.0"),
        ({"eta": 1.0, "c": 1.5}, "`c`=1.5"),
        ({"eta": float("inf"), "c": 0.1}, "`eta`=inf"),
    ],
)
def test_bad_combinations_name_the_argument(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        resolve_hyperparameters(**kwargs)
    with pytest.raises(ValueError, match=named):
        GroupedSPA(Net(), **kwargs)


def test_param_groups_no_decay_and_multipliers() -> None:
    net = Net()
    groups = spa_param_groups(net, weight_decay=1e-4, lr_multipliers={"head": 10.0})
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(net.named_parameters())
    decayed = {n for n, p in named.items() if by_id[id(p)]["weight_decay"] == 1e-4}
    assert decayed == {"body.0.weight", "head.weight"}  # biases, BatchNorm and LayerNorm weights excluded
    boosted = {n for n, p in named.items() if by_id[id(p)]["lr_multiplier"] == 10.0}
    assert boosted == {"head.weight", "head.bias"}
    assert sum(len(g["params"]) for g in groups) == len(named)
    assert len(groups) == 4  # (x1, decay), (x1, none), (x10, decay), (x10, none)


class Attention(nn.Module):
    """A transformer block's parameters: attention (``in_proj_bias``), norms, linear biases."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Linear(8, 8)


@pytest.mark.parametrize("cls", [GroupedSPA, GroupedSGD])
@pytest.mark.parametrize("source", ["module", "named_parameters"])
def test_attention_biases_are_not_decayed(cls: type, source: str) -> None:
    net = Attention()
    params = net if source == "module" else net.named_parameters()
    opt = cls(params, eta=1.0, c=0.1, weight_decay=0.05)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    decayed = {n for n, p in net.named_parameters() if decay[id(p)] == 0.05}
    assert decayed == {"attn.in_proj_weight", "attn.out_proj.weight", "mlp.weight"}
    # in_proj_bias, out_proj.bias, mlp.bias and the LayerNorm's weight and bias: no decay
    assert len(decay) == len(list(net.parameters()))


def test_param_groups_plain_tensors_and_globs() -> None:
    net = Net()
    groups = spa_param_groups(net.parameters(), weight_decay=0.1)  # no names: every 1-D tensor is exempt
    exempt = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert exempt == {id(p) for p in net.parameters() if p.ndim <= 1}
    with pytest.raises(ValueError, match="needs parameter names"):
        spa_param_groups(net.parameters(), lr_multipliers={"head": 2.0})
    with pytest.raises(ValueError, match=r"\['tail'\] match no trainable parameter"):
        spa_param_groups(net, lr_multipliers={"tail": 2.0})
    groups = spa_param_groups(net.named_parameters(), weight_decay=0.1, no_decay=("*.weight",))
    exempt = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert exempt == {id(p) for n, p in net.named_parameters() if n.endswith(".weight")}
    net.body[0].weight.requires_grad_(False)
    assert all(p is not net.body[0].weight for g in spa_param_groups(net) for p in g["params"])
    with pytest.raises(ValueError, match="`weight_decay`=-1"):
        spa_param_groups(net, weight_decay=-1)
    with pytest.raises(ValueError, match=r"lr_multipliers\['head'\]"):
        spa_param_groups(net, lr_multipliers={"head": 0.0})


def test_group_step_sizes() -> None:
    opt = GroupedSPA(Net(), lr=0.1, momentum=0.9, weight_decay=1e-4, lr_multipliers={"head": 10.0})
    assert isinstance(opt, SPA)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1.0 * g["lr_multiplier"]) and g["c"] == pytest.approx(0.1)
    sgd = GroupedSGD(Net(), eta=1.0, c=0.1, lr_multipliers={"head": 10.0})
    for g in sgd.param_groups:
        assert g["lr"] == pytest.approx(0.1 * g["lr_multiplier"]) and g["momentum"] == pytest.approx(0.9)


def test_spa_and_sgd_forms_give_the_same_iterates() -> None:
    a, b = _twins()
    kw = dict(weight_decay=1e-3, lr_multipliers={"head": 3.0})
    xa = _train(a, build_optimizer(a, eta=0.5, c=0.2, form="spa", **kw))
    xb = _train(b, build_optimizer(b, lr=0.1, momentum=0.8, form="sgd", **kw))
    for pa, pb in zip(xa, xb, strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_grouped_spa_matches_torch_sgd_with_manual_groups() -> None:
    a, b = _twins()
    xa = _train(a, GroupedSPA(a.named_parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2))
    decay = [p for n, p in b.named_parameters() if n in ("body.0.weight", "head.weight")]
    rest = [p for n, p in b.named_parameters() if n not in ("body.0.weight", "head.weight")]
    ref = torch.optim.SGD([{"params": decay, "weight_decay": 1e-2}, {"params": rest}], lr=0.05, momentum=0.9)
    xb = _train(b, ref)
    for pa, pb in zip(xa, xb, strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_build_optimizer_rejects_unknown_form_and_empty_params() -> None:
    with pytest.raises(ValueError, match="`form`='adam'"):
        build_optimizer(Net(), form="adam")  # type: ignore[arg-type]
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_optimizer(frozen)
    with pytest.raises(TypeError, match="param-group dicts"):
        GroupedSPA([{"params": list(Net().parameters())}])


@pytest.mark.parametrize("form", ["spa", "sgd"])
def test_both_forms_work_with_the_callbacks(form: str, tmp_path) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_spa import GradualSchedule, MomentumDiagnostics
    from lightning_spa.demos import DigitsCNN, DigitsDataModule

    def fit(form: str) -> tuple[list[torch.Tensor], EventAccumulator]:
        pl.seed_everything(0)
        model = DigitsCNN(channels=4, optimizer=lambda p: build_optimizer(p, lr=0.1, momentum=0.9, form=form))
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=30,
            log_every_n_steps=1,
            precision="64-true",
            logger=TensorBoardLogger(tmp_path, name=form, version=0),
            callbacks=[GradualSchedule([6], unit="step", transition_steps=22), MomentumDiagnostics(every_n_steps=1)],
            limit_val_batches=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(model, DigitsDataModule())
        acc = EventAccumulator(str(tmp_path / form / "version_0"))
        acc.Reload()
        return [p.detach().clone() for p in model.parameters()], acc

    params, acc = fit(form)
    reference, _ = fit("spa") if form == "sgd" else (params, acc)
    for p, q in zip(params, reference, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    ratio = acc.Scalars("spa/ratio")
    assert [e.step for e in ratio] == list(range(30))  # GroupedSGD is measured, like SPA
    assert acc.Scalars("spa/eta")[-1].value == pytest.approx(0.1)  # eta 10x down through the schedule
