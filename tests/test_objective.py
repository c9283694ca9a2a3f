"""CLIPZSSObjective: every term, every ablation switch, gradients and determinism on random inputs."""

import pytest
import torch
import torch.nn.functional as F

from clipzss.config import load_config
from clipzss.data.transforms import PAD_INDEX
from clipzss.method.objective import CLIPZSSObjective, seen_logits
from clipzss.method.plm import region_weights
from clipzss.models.teacher import TeacherOutput

C, NS = 32, 4


def make_cfg(*overrides):
    base = [
        "plm.kmeans.scales=[2, 4]",
        "plm.kmeans.iters=3",
        "plm.kmeans.fuse_threshold=0.5",
        "plm.synthesizer.heads=4",
        "plm.nel_weight=1",  # every term on (the default leaves NEL off)
    ]
    base += ["glm.bank_size=8"]
    return load_config(None, base + list(overrides))


def batch(B=2):
    R = F.normalize(torch.randn(B, C, 8, 8), dim=1).requires_grad_(True)
    teacher = TeacherOutput(
        cls=F.normalize(torch.randn(B, C), dim=-1), dense=F.normalize(torch.randn(B, C, 4, 4), dim=1)
    )
    labels = torch.randint(0, NS, (B, 32, 32))
    labels[:, :, 16:] = 255  # right half unlabelled: potential classes live here
    return R, teacher, labels


def run(cfg, seed=0):
    torch.manual_seed(seed)
    objective = CLIPZSSObjective(cfg, F.normalize(torch.randn(NS, C), dim=-1))
    R, teacher, labels = batch()
    losses, report = objective(R, teacher, labels)
    return objective, R, teacher, labels, losses, report


def test_all_terms_finite_nonzero_and_summed():
    objective, R, teacher, labels, losses, report = run(make_cfg())
    assert set(losses) == {"glm", "nel", "ce", "bce", "total"}
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value) and value != 0, name
    torch.testing.assert_close(losses["total"], losses["glm"] + losses["nel"] + losses["ce"] + losses["bce"])
    assert report["plm/potential_classes"] > 0 and 0 < report["plm/pseudo_coverage"] <= 1
    assert {"plm/kmeans_inertia", "plm/fused_clusters", "scale/alpha", "scale/beta"} <= set(report)
    assert not any(v.requires_grad for v in report.values())


def directional_derivative(objective, R, teacher, labels, params, term: str = "total") -> tuple[float, float]:
    """(<dL/dx, v>, its central difference (L(x + eps v) - L(x - eps v)) / 2 eps) in float64, for a random direction
    v over R and ``params``; eval mode, so the GLM bank stays as it is between the evaluations. The pixel losses are
    computed in float32 whatever R's dtype, hence a step of 1e-3 and agreement to 1e-3."""
    objective.double().eval()
    R = R.detach().double().requires_grad_(True)
    teacher = TeacherOutput(cls=teacher.cls.double(), dense=teacher.dense.double())
    inputs = [R, *params]
    grads = torch.autograd.grad(objective(R, teacher, labels)[0][term], inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]
    directions = [torch.randn_like(x) for x in inputs]
    analytic = sum(float((g * v).sum()) for g, v in zip(grads, directions, strict=True))
    eps, values = 1e-3, []
    with torch.no_grad():
        for sign in (1, -1):
            for x, v in zip(inputs, directions, strict=True):
                x.add_(sign * eps * v)
            values.append(float(objective(R, teacher, labels)[0][term]))
            for x, v in zip(inputs, directions, strict=True):
                x.sub_(sign * eps * v)
    return analytic, (values[0] - values[1]) / (2 * eps)


def test_gradients_match_finite_differences():
    objective, R, teacher, labels, *_ = run(make_cfg())
    synth = [p for p in objective.plm.synthesizer.parameters() if p.requires_grad]
    analytic, numeric = directional_derivative(objective, R, teacher, labels, [])
    assert analytic != 0 and analytic == pytest.approx(numeric, rel=1e-3)  # with respect to the features R
    # the synthesizer's prototypes enter the pixel logits detached: its parameters learn from the text loss only
    analytic, numeric = directional_derivative(objective, R.detach(), teacher, labels, synth, term="bce")
    assert analytic != 0 and analytic == pytest.approx(numeric, rel=1e-3)


@pytest.mark.parametrize(
    ("overrides", "keys", "modules"),
    [
        (["glm.weight=0"], {"nel", "ce", "bce"}, {"plm", "synthesizer"}),
        (["plm.synthesizer.enabled=false"], {"glm", "nel", "ce"}, {"glm", "plm"}),
        (["plm.enabled=false"], {"glm", "nel", "ce"}, {"glm"}),
        (["plm.kmeans.scales=[2]"], {"glm", "nel", "ce", "bce"}, {"glm", "plm", "synthesizer"}),
        (["plm.bce_weight=0"], {"glm", "nel", "ce"}, {"glm", "plm", "synthesizer"}),
    ],
)
def test_each_switch_removes_exactly_its_terms(overrides, keys, modules):
    objective, *_, losses, _ = run(make_cfg(*overrides))
    assert set(losses) == keys | {"total"}
    assert all(torch.isfinite(v) and v != 0 for v in losses.values())
    built = {"glm": objective.glm, "plm": objective.plm, "synthesizer": objective.plm and objective.plm.synthesizer}
    assert {name for name, module in built.items() if module is not None} == modules


def test_baseline_trains_without_teacher():
    cfg = make_cfg("glm.weight=0", "plm.enabled=false")
    objective = CLIPZSSObjective(cfg, torch.randn(NS, C))
    assert not objective.needs_teacher and not list(objective.parameters())
    R, _, labels = batch()
    losses, _ = objective(R, None, labels)
    assert set(losses) == {"nel", "ce", "total"}
    with pytest.raises(ValueError, match="teacher"):
        CLIPZSSObjective(make_cfg(), torch.randn(NS, C))(R, None, labels)


def test_learnable_scales_get_gradients():
    objective, *_, losses, report = run(make_cfg("loss.learnable_scale=true", "loss.alpha=10.0"))
    torch.testing.assert_close(report["scale/alpha"], torch.tensor(10.0))
    _, R, teacher, labels = objective, *batch()
    for scale in (objective.log_alpha, objective.log_beta):
        analytic, numeric = directional_derivative(objective, R, teacher, labels, [scale])
        assert analytic != 0 and analytic == pytest.approx(numeric, rel=1e-3)


def test_deterministic():
    first, second = run(make_cfg())[4], run(make_cfg())[4]
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_gather_argument_feeds_the_global_negatives():
    cfg = make_cfg("plm.enabled=false")
    objective = CLIPZSSObjective(cfg, torch.randn(NS, C))
    R, teacher, labels = batch()
    extra = F.normalize(torch.randn(2, C), dim=-1)
    plain = objective(R, teacher, labels)[0]["glm"]
    objective.glm.bank_filled.zero_()
    gathered = objective(R, teacher, labels, gather=lambda s: torch.cat([s, extra]))[0]["glm"]
    assert gathered > plain  # more negatives, same positive


def test_pseudo_labels_keep_seen_and_label_unlabelled():
    objective, _, teacher, labels, *_ = run(make_cfg())
    fused = objective.pseudo_labels(teacher, labels)
    seen = labels != 255
    assert torch.equal(fused[seen], labels[seen])
    assert ((fused[~seen] >= NS) & (fused[~seen] != 255)).any()
    off = CLIPZSSObjective(make_cfg("plm.enabled=false"), torch.randn(NS, C))
    assert torch.equal(off.pseudo_labels(teacher, labels), labels)


def test_seen_logits_is_scaled_cosine():
    R, text = torch.randn(1, C, 2, 3), torch.randn(5, C)
    logits = seen_logits(R, text, 7.0)
    expected = 7.0 * F.cosine_similarity(R[:, None], text[None, :, :, None, None], dim=2)
    torch.testing.assert_close(logits, expected)


def test_padding_is_never_a_potential_class():
    objective, R, teacher, labels, *_ = run(make_cfg())
    padded = labels.clone()
    padded[:, 24:] = PAD_INDEX  # bottom rows are crop padding
    as_ignore = padded.masked_fill(padded == PAD_INDEX, 255)
    assert (objective.pseudo_labels(teacher, as_ignore)[:, 24:, 16:] >= NS).any()  # old: padding became potential
    fused = objective.pseudo_labels(teacher, padded)
    assert (fused[:, 24:] == 255).all()
    losses, _ = objective(R, teacher, padded)
    assert torch.isfinite(losses["total"])


def test_seen_and_potential_parts_are_normalised_apart():
    objective = CLIPZSSObjective(make_cfg("plm.potential_weight=0.5"), F.normalize(torch.randn(NS, C), dim=-1))
    x = torch.randn(1, NS + 2, 8, 8)
    target = torch.full((1, 8, 8), 255)
    target[0, :2] = 1  # 16 seen pixels
    target[0, 2:] = NS + torch.randint(0, 2, (6, 8))  # 48 potential pixels
    valid = torch.ones(1, NS + 2, dtype=torch.bool)
    ce = F.cross_entropy(x, target, ignore_index=255, reduction="none")
    seen, potential = target < NS, (target >= NS) & (target != 255)
    expected = ce[seen].mean() + 0.5 * ce[potential].mean()
    torch.testing.assert_close(objective._pixel_losses(x, target, valid)["ce"], expected)
    joint = CLIPZSSObjective(make_cfg("plm.loss_norm=joint"), objective.seen_text)
    torch.testing.assert_close(joint._pixel_losses(x, target, valid)["ce"], ce[target != 255].mean())
    nel = objective.nel
    expected_nel = nel(x, target, valid & (torch.arange(NS + 2) < NS)) + 0.5 * nel(
        x, target, valid & (torch.arange(NS + 2) >= NS)
    )
    torch.testing.assert_close(objective._pixel_losses(x, target, valid)["nel"], expected_nel)


def test_pseudo_weights_are_teacher_token_means_over_each_region_or_student_centroids():
    cfg = make_cfg("plm.synthesizer.enabled=false")
    objective, R, teacher, labels, *_ = run(cfg)
    out = objective.plm(R, teacher, labels, objective.seen_text, torch.tensor(1.0), torch.tensor(1.0))
    up = F.interpolate(teacher.dense, size=out.labels.shape[-2:], mode="nearest")  # [B, C, H, W] token per pixel
    expected = torch.zeros_like(out.pseudo)  # [B, Kp, C]; absent regions stay zero
    for b in range(out.pseudo.shape[0]):
        for k in range(out.pseudo.shape[1]):
            pixels = out.labels[b] == NS + k
            if pixels.any():
                expected[b, k] = F.normalize(up[b][:, pixels].mean(dim=1), dim=0)
    assert expected.abs().sum() > 0  # some potential regions exist
    torch.testing.assert_close(out.pseudo, expected)
    assert not out.pseudo.requires_grad
    student = CLIPZSSObjective(make_cfg("plm.synthesizer.query=student"), objective.seen_text)
    out = student.plm(R, teacher, labels, objective.seen_text, torch.tensor(1.0), torch.tensor(1.0))
    assert out.pseudo.requires_grad  # queries from the student's centroids: CE reaches them


def test_synthesizer_is_trained_by_its_text_loss_only():
    objective, R, teacher, labels, losses, _ = run(make_cfg("plm.bce_weight=0"))
    assert "bce" not in losses
    losses["total"].backward()
    assert all(p.grad is None for p in objective.plm.synthesizer.parameters())


def test_a_learnable_nel_bias_lets_features_align_with_their_text():
    """Without a bias, NEL's sigmoid calls a class absent only at cos(R, T) < 0, so fitting every negative of 20
    classes holds R away from its own text too (|cos| < 0.07 in training); a learnable bias
    (plm.nel_learnable_bias) moves the decision point and frees R to align with its text."""
    classes, dim = 20, 32
    torch.manual_seed(0)
    text = F.normalize(torch.randn(classes, dim), dim=-1)
    labels = torch.arange(classes).repeat_interleave(8).view(1, 1, -1).expand(1, 4, classes * 8)  # 8 px per class

    def fitted(*overrides):
        cfg = make_cfg("plm.enabled=false", "glm.weight=0", "plm.ce_weight=0", *overrides)
        objective = CLIPZSSObjective(cfg, text)
        R = torch.randn(1, dim, 4, classes * 8, requires_grad=True)
        optimizer = torch.optim.Adam([R, *objective.parameters()], lr=0.05)
        for _ in range(600):
            optimizer.zero_grad()
            objective(F.normalize(R, dim=1), None, labels)[0]["total"].backward()
            optimizer.step()
        own = text[labels[0]].permute(2, 0, 1)  # [C, 4, W]: each pixel's own text
        return float((F.normalize(R.detach(), dim=1)[0] * own).sum(0).mean()), objective

    without, _ = fitted()
    aligned, objective = fitted("plm.nel_learnable_bias=true")
    assert without < 0.3 and aligned > 0.6, (without, aligned)
    assert objective.nel_bias.item() < -4.6  # it moved down from the focal prior logit -4.595


@pytest.mark.parametrize(("H", "W", "h", "w"), [(32, 32, 8, 8), (13, 10, 4, 3), (7, 9, 7, 9), (5, 6, 8, 8)])
def test_region_weights_count_the_pixels_nearest_upsampling_gives_each_cell(H, W, h, w):
    labels = torch.randint(0, 4, (2, H, W))
    labels[0, : H // 2] = 255  # ignored
    counts = region_weights(labels, 3, h, w)  # id 3 is outside the 3 regions: ignored too
    cells = torch.arange(h * w, dtype=torch.float).view(1, 1, h, w)
    cell = F.interpolate(cells, size=(H, W), mode="nearest")[0, 0].long()  # [H, W] the cell each pixel reads
    expected = torch.zeros(2, 3, h * w)
    for b in range(2):
        for n in range(3):
            expected[b, n] = torch.bincount(cell[labels[b] == n], minlength=h * w).float()
    torch.testing.assert_close(counts, expected, rtol=0, atol=0)
