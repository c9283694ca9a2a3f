"""The CLIP-ZSS objective step (forward + backward) reads no tensor value on the host: no device sync per step."""

import pytest
import torch
import torch.nn.functional as F
from host_reads import HostReads

from clipzss.config import load_config
from clipzss.data.transforms import PAD_INDEX
from clipzss.method.objective import CLIPZSSObjective
from clipzss.models.teacher import TeacherOutput

C, NS = 32, 5


def step_inputs(B: int = 2):
    """Student features at stride 4, teacher tokens at stride 8 of a 128-px crop, a third of it unlabelled."""
    R = F.normalize(torch.randn(B, C, 32, 32), dim=1).requires_grad_(True)
    teacher = TeacherOutput(
        cls=F.normalize(torch.randn(B, C), dim=-1), dense=F.normalize(torch.randn(B, C, 16, 16), dim=1)
    )
    labels = torch.randint(0, NS, (B, 128, 128))
    labels[:, :40] = 255
    labels[1, 110:] = PAD_INDEX
    return R, teacher, labels


def test_the_detector_sees_every_kind_of_host_read():
    x = torch.arange(6.0)
    reads = [
        lambda: x.max().item(),
        lambda: int(x.argmax()),
        lambda: bool(x.any()),
        lambda: x.tolist(),
        lambda: x[x > 2],
        lambda: x.nonzero(),
        lambda: torch.equal(x, x),
        lambda: torch.bincount(x.long()),
    ]
    for read in reads:
        with HostReads() as seen:
            read()
        assert seen.ops, read
    with HostReads() as seen:
        (x * 2).sum().exp()
    assert seen.ops == []


@pytest.mark.parametrize(
    "overrides",
    [[], ["plm.synthesizer.enabled=false"], ["plm.synthesizer.query=student"], ["plm.synthesizer.dense_memory=true"]],
)
def test_objective_step_reads_nothing_on_the_host(overrides):
    torch.manual_seed(0)
    objective = CLIPZSSObjective(load_config(None, ["glm.bank_size=8", *overrides]), torch.randn(NS, C))
    R, teacher, labels = step_inputs()
    with HostReads() as seen:
        losses, report = objective(R, teacher, labels)
        losses["total"].backward()
    assert seen.ops == []
    assert R.grad.abs().sum() > 0 and report["plm/potential_classes"] > 0  # the PLM ran and found potential classes
