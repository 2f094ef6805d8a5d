"""Issue 13 part 3: the fast pre-training step (static-shape heads, foreach LARS, no host sync,
torch.compile) computes what the eager step computes."""

from __future__ import annotations

import copy

import pytest
import torch

from anaus_core.models.anaus_model import _project_rows
from anaus_core.models.heads import build_projector
from anaus_core.optim import LARS, param_groups_excluding_norm_and_bias
from anaus_core.train import pretrain, read_metrics
from tests.test_pretrain import data_source, tiny_config, tiny_shards  # noqa: F401 (fixture)


@pytest.mark.parametrize("valid_rows", [7, 1, 0])
@pytest.mark.parametrize("training", [True, False])
def test_masked_head_equals_selecting_the_valid_rows(valid_rows, training):
    torch.manual_seed(0)
    head = build_projector(in_dim=12, hidden_dim=16, out_dim=8).train(training)
    with torch.no_grad():
        head.layers[1].running_mean.normal_()
    reference = copy.deepcopy(head)
    vectors = torch.randn(3, 4, 12, requires_grad=True)
    valid = torch.zeros(3, 4, dtype=torch.bool)
    valid.view(-1)[torch.randperm(12)[:valid_rows]] = True
    fast = _project_rows(head, vectors, valid, static=True)
    slow = _project_rows(reference, vectors, valid, static=False)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    for name, buffer in head.layers[1].named_buffers():
        torch.testing.assert_close(buffer, dict(reference.layers[1].named_buffers())[name], msg=name)
    grad_fast, = torch.autograd.grad(fast.square().sum(), vectors)
    grad_slow, = torch.autograd.grad(slow.square().sum(), vectors)
    torch.testing.assert_close(grad_fast, grad_slow, rtol=1e-5, atol=1e-6)


def test_foreach_lars_equals_the_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    twin = copy.deepcopy(model)
    fast = LARS(param_groups_excluding_norm_and_bias(model), lr=0.5, weight_decay=1e-2, foreach=True)
    loop = LARS(param_groups_excluding_norm_and_bias(twin), lr=0.5, weight_decay=1e-2, foreach=False)
    with torch.no_grad():
        model[2].bias.zero_(), twin[2].bias.zero_()   # a zero-norm parameter: trust 1
    for step in range(5):
        x = torch.randn(8, 6)
        for net, opt in ((model, fast), (twin, loop)):
            for group in opt.param_groups:
                group["lr"] = 0.5 / (step + 1)
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fast.state_dict()["state"][0]["momentum_buffer"],
                               loop.state_dict()["state"][0]["momentum_buffer"], rtol=1e-6, atol=1e-7)


def test_static_photometric_path_equals_the_subset_path():
    from anaus_core.augment.photometric import apply_params, byol_view_configs, sample_params

    images = torch.rand(6, 1, 24, 24)
    for config in byol_view_configs():
        params = sample_params(6, config, generator=torch.Generator().manual_seed(3), device="cpu")
        torch.testing.assert_close(apply_params(images, params, config, static=True),
                                   apply_params(images, params, config, static=False))


def _step_losses(shards, tmp_path, name, **overrides):
    config = tiny_config(shards, **{"run.steps": 5, "run.checkpoint_every": 0, "optim.accumulation_steps": 2,
                                    "data.batch_size": 8, **overrides})
    pretrain(config, tmp_path / name, data=data_source(config))
    return [{k: v for k, v in r.items() if k.startswith("loss")} for r in read_metrics(tmp_path / name / "metrics.jsonl")]


def test_fast_step_gives_the_eager_losses_over_5_steps(tiny_shards, tmp_path):
    eager = _step_losses(tiny_shards, tmp_path, "eager", **{"model.static_shapes": "off", "optim.foreach": False,
                                                           "run.compile": "off"})
    fast = _step_losses(tiny_shards, tmp_path, "fast", **{"model.static_shapes": "on", "optim.foreach": True,
                                                         "run.compile": "off"})
    assert len(eager) == len(fast) == 5
    for step, (a, b) in enumerate(zip(eager, fast)):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (step, key)


@pytest.mark.gpu
def test_compiled_step_gives_the_eager_losses(tiny_shards, tmp_path):
    # GPU only: on this project's 2-core CPU machines inductor's C++ build of ResNet-18 forward +
    # backward took over 10 minutes (and compile is off on the CPU by default anyway)
    cuda = {"run.device": "cuda", "run.amp": False, "data.pin_memory": True}
    eager = _step_losses(tiny_shards, tmp_path, "eager", **{**cuda, "run.compile": "off"})
    compiled = _step_losses(tiny_shards, tmp_path, "compiled", **{**cuda, "run.compile": "on"})
    assert len(eager) == len(compiled) == 5
    for step, (a, b) in enumerate(zip(eager, compiled)):
        for key in a:   # TF32 matmuls on both sides; the fused kernels round differently
            assert b[key] == pytest.approx(a[key], rel=5e-3, abs=1e-4), (step, key)


@pytest.mark.slow
def test_compiled_graphs_capture_the_step_without_recompiling(tiny_shards):
    # torch.compile's graph capture (dynamo + AOT autograd) on the CPU with the "aot_eager"
    # backend: the same losses and BatchNorm buffers as eager over 4 steps (the damaged-core
    # forward swaps BN buffers: no recompile), one graph per encoder and batch size. Inductor's
    # code generation is what the GPU test above adds.
    import torch._dynamo

    from anaus_core.train.trainer import build_model, make_generator

    config = tiny_config(tiny_shards)
    eager = build_model(config)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled.compile_for_training(backend="aot_eager")
    batch = next(iter(data_source(config).loader(epoch=0, skip_batches=0, batch_size=4, rank=0, world_size=1)))
    cpu = torch.device("cpu")
    for step in range(4):
        losses = []
        for method in (eager, compiled):
            generator = make_generator(cpu, step)
            prepared = method.prepare_batch(batch, device=cpu, generator=generator)
            method.begin_step([prepared], generators=[generator])
            out = method(prepared, generator=generator)
            out["loss"].backward()
            with torch.no_grad():
                for p in method.parameters():
                    if p.grad is not None:
                        p.sub_(0.01 * p.grad)
                        p.grad = None
            method.after_optimizer_step(step=step, total_steps=10)
            losses.append({k: v.detach() for k, v in out.items()})
        for key in losses[0]:
            torch.testing.assert_close(losses[1][key], losses[0][key], rtol=1e-5, atol=1e-6, msg=key)
    for name, buffer in eager.online_encoder.named_buffers():
        torch.testing.assert_close(dict(compiled.online_encoder.named_buffers())[name], buffer, msg=name)
    # online: views (2B) and damaged core (B); target: views and core -> 4 graphs, no recompiles
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4


@pytest.mark.gpu
def test_cuda_step_never_synchronises_with_the_host(tiny_shards):
    # torch's sync debug mode raises on any host-device synchronisation (.item(), nonzero,
    # boolean tests of device tensors, blocking device-to-host copies) inside the block
    from anaus_core.train.trainer import _autocast, build_model, build_optimizer, make_generator

    config = tiny_config(tiny_shards, **{"run.device": "cuda"})
    device = torch.device("cuda")
    method = build_model(config).to(device)
    optimizer = build_optimizer(method, config, 0.01)
    batch = next(iter(data_source(config).loader(epoch=0, skip_batches=0, batch_size=4, rank=0, world_size=1)))
    batch = {key: value.pin_memory() for key, value in batch.items()}   # as the loader delivers it on CUDA
    for step in range(2):   # the first step allocates the LARS state
        generator = make_generator(device, step)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            prepared = method.prepare_batch(batch, device=device, generator=generator)
            with _autocast(device, True):
                method.begin_step([prepared], generators=[generator], step=step)
                loss = method(prepared, generator=generator, step=step)["loss"]
            loss.backward()
            optimizer.step()
            method.after_optimizer_step(step=step, total_steps=10)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        optimizer.zero_grad(set_to_none=True)
