"""One optimiser step of the trainer: gradient accumulation equals one big batch, clipping and the scheduler act once
per step, bf16 autocast keeps the PLM in fp32; the lr schedule and the optimiser's parameter groups."""

import math

import pytest
import torch
import torch.multiprocessing as mp
from step_fixtures import build_run, fixed_batch, micro_batches, one_step, step_config

from clipzss.method.objective import CLIPZSSObjective
from clipzss.models.students import build_student
from clipzss.train import TrainModule, build_optimizer, poly_with_warmup


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _plain_gradients(run, images, labels) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The reference: autograd of the objective on the whole batch, outside the trainer."""
    model = run.accelerator.unwrap_model(run.model)
    losses, _ = model(images, labels, None)
    losses["total"].backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads, {f"loss/{k}": float(v.detach()) for k, v in losses.items()}


def test_grad_accum_of_k_micro_batches_equals_one_batch_k_times_larger(assets, tmp_path):
    accelerator = _accelerator()
    cfg = step_config(assets, tmp_path / "ref")
    reference = build_run(cfg, accelerator)
    images, labels = fixed_batch(cfg, 4, len(reference.train_set.class_names))
    grads, losses = _plain_gradients(reference, images, labels)
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])))

    # k x b: accumulated, accumulated and clipped to half the gradient's norm, one batch of 4 clipped the same way
    for k, b, clip in ((2, 2, 0.0), (2, 2, norm / 2), (1, 4, norm / 2)):
        overrides = {"optim.grad_accum": k, "optim.grad_clip": clip, "data.batch_size": b}
        run = build_run(step_config(assets, tmp_path / f"k{k}_{clip > 0}", **overrides), accelerator)
        applied, means = one_step(run, micro_batches(images, labels, b))
        assert set(means) == {"loss/nel", "loss/ce", "loss/total"}
        for term, value in means.items():  # the mean over micro-batches of per-image means: the batch's loss
            assert math.isclose(value, losses[term], rel_tol=1e-5), (k, term, value, losses[term])
        scale = clip / norm if clip else 1.0
        assert set(applied) >= set(grads) and not any(applied[n].any() for n in set(applied) - set(grads))
        for name, g in grads.items():
            # float32 sums in another order; q/k gradients are ~1e-10 at init (near-uniform attention): pure noise
            error = float(torch.linalg.vector_norm(applied[name] - scale * g))
            assert error <= 1e-5 * float(torch.linalg.vector_norm(g)) + 1e-7 * norm, (k, clip, name, error)
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a) for a in applied.values()]))
        assert math.isclose(float(total), clip or norm, rel_tol=1e-4)  # clipped once, on the accumulated gradient
        assert run.scheduler.last_epoch == 1  # one scheduler step per optimiser step, not per micro-batch
        assert run.optimizer.param_groups[0]["lr"] == pytest.approx(poly_with_warmup(run.cfg)(1))


def _bf16_worker(rank: int, assets: dict, out: str) -> None:
    """In a fresh process (Accelerate fixes mixed precision once per process): a full-objective step under bf16."""
    from accelerate import Accelerator

    import clipzss.method.plm as plm

    torch.set_num_threads(1)
    seen: list[tuple[torch.dtype, bool]] = []
    kmeans = plm.multiscale_kmeans

    def recording_kmeans(dense, *args, **kwargs):
        seen.append((dense.dtype, torch.is_autocast_enabled("cpu")))
        return kmeans(dense, *args, **kwargs)

    plm.multiscale_kmeans = recording_kmeans
    features: list[torch.dtype] = []
    cfg = step_config(assets, __import__("pathlib").Path(out), **{"glm.weight": 0.5, "plm.enabled": "true"})
    run = build_run(cfg, Accelerator(cpu=True, mixed_precision="bf16"))
    student = run.accelerator.unwrap_model(run.model).student
    student.register_forward_hook(lambda module, args, output: features.append(output.dtype))
    images, labels = fixed_batch(cfg, 2, len(run.train_set.class_names))
    applied, means = one_step(run, micro_batches(images, labels, 2))
    assert features == [torch.bfloat16]  # autocast is on: the student ran in bf16
    assert seen == [(torch.float32, False)]  # the PLM clustered fp32 tokens with autocast off
    assert {"loss/glm", "loss/nel", "loss/ce", "loss/bce", "loss/total"} <= set(means)
    assert all(math.isfinite(v) and v > 0 for v in means.values()), means
    assert all(torch.isfinite(a).all() for a in applied.values())
    assert sum(int(a.ne(0).any()) for a in applied.values()) > len(applied) // 2  # most parameters were updated


def test_bf16_autocast_runs_the_full_objective_with_the_plm_in_fp32(assets, tmp_path):
    mp.spawn(_bf16_worker, args=(assets, str(tmp_path / "bf16")), nprocs=1, join=True)


def test_poly_schedule_with_linear_warmup(assets, tmp_path):
    cfg = step_config(assets, tmp_path, **{"optim.warmup_iters": 10, "optim.max_iters": 100, "optim.poly_power": 2})
    factor = poly_with_warmup(cfg)
    assert factor(0) == pytest.approx(1e-6)  # warm-up starts at 1e-6 of the lr
    assert factor(5) == pytest.approx((1 - 0.05) ** 2 * (1e-6 + (1 - 1e-6) * 0.5))
    assert factor(10) == pytest.approx(0.9**2)  # warm-up over: pure poly
    assert factor(50) == pytest.approx(0.25)
    assert factor(100) == 0 and factor(150) == 0  # never negative past max_iters
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 0.25)


def test_parameter_groups_backbone_vs_head_lr_and_no_decay(assets, tmp_path):
    cfg = step_config(assets, tmp_path, **{"optim.lr": 1e-3, "optim.head_lr_mult": 10, "optim.weight_decay": 0.05,
                                           "loss.learnable_scale": "true"})  # fmt: skip
    model = TrainModule(build_student(cfg.student, 32), CLIPZSSObjective(cfg, torch.randn(5, 32)))
    frozen = next(model.student.backbone.parameters())
    frozen.requires_grad_(False)
    optimizer = build_optimizer(model, cfg)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(group_of)  # each parameter in one group
    named = dict(model.named_parameters())
    assert set(group_of) == {id(p) for p in named.values() if p.requires_grad}  # frozen ones are left out
    kinds = set()
    for name, p in named.items():
        if not p.requires_grad:
            continue
        group, backbone, no_decay = group_of[id(p)], name.startswith("student.backbone."), p.ndim <= 1
        assert group["lr"] == pytest.approx(1e-3 if backbone else 1e-2), name
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name  # norms, biases, scalar scales: no decay
        kinds.add((backbone, no_decay))
    assert kinds == {(True, True), (True, False), (False, True), (False, False)}
    assert "objective.log_alpha" in named and group_of[id(named["objective.log_alpha"])]["weight_decay"] == 0.0
