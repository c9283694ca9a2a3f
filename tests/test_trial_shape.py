"""Trial shapes from the command line: workers per trial (per backbone), resources Tune reserves, device-hours."""

import pytest

pytest.importorskip("ray")
backbones = pytest.importorskip("sweeps.backbones")
benchmark = pytest.importorskip("sweeps.benchmark")
from clipzss.sweep.shape import DRIVER_RESOURCES, TrialShape, check_shape, parse_workers  # noqa: E402


def test_workers_per_backbone_with_a_default():
    opts = backbones.parse_args(
        ["--archs", "segformer_b0,swin_base,resnet50", "--workers-per-trial", "segformer_b0=1,swin_base=4,2",
         "--cpus-per-worker", "8", "--gpus-per-worker", "1", "--placement", "spread"]
    )  # fmt: skip
    shape = opts.shape
    assert [shape.workers({"student.arch": a}) for a in opts.archs] == [1, 4, 2]
    assert shape.resources({"student.arch": "segformer_b0"}) == {"CPU": 8, "GPU": 1}
    assert shape.resources({"student.arch": "swin_base"}) == DRIVER_RESOURCES  # workers: their own group
    assert shape.devices({"student.arch": "swin_base"}) == 4 and shape.placement == "spread"
    assert shape.spec() == "segformer_b0=1,swin_base=4,2"


def test_the_benchmark_grid_takes_the_same_flags_and_the_old_names_still_work():
    opts = benchmark.parse_args(["--workers-per-trial", "2", "--cpus-per-trial", "3", "--gpus-per-trial", "0"])
    assert (opts.shape.default_workers, opts.shape.cpus_per_worker, opts.shape.gpus_per_worker) == (2, 3, 0)
    assert opts.shape.devices({"student.arch": "x"}) == 2  # CPU processes count as devices on CPU
    one = TrialShape(cpus_per_worker=1, gpus_per_worker=0.25)
    assert one.resources({}) == {"CPU": 1, "GPU": 0.25} and one.devices({}) == 0.25  # a shared GPU


@pytest.mark.parametrize(
    ("spec", "message"),
    [("0", "'0' is not a positive worker count"), ("swin_base=x", "'swin_base=x' is not a positive"),
     ("2,3", "two defaults"), ("", "'' is not a positive")],
)  # fmt: skip
def test_a_bad_workers_spec_names_the_item(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_workers(spec)


def test_shapes_that_cannot_mean_what_was_asked_are_refused():
    with pytest.raises(ValueError, match="names swin_large, not among the swept --archs"):
        check_shape(TrialShape(2, (("swin_large", 4),)), ("swin_base",))
    with pytest.raises(ValueError, match="--gpus-per-worker 0.5: a fraction of a GPU is for one-worker trials"):
        check_shape(TrialShape(2, gpus_per_worker=0.5), ("swin_base",))
    with pytest.raises(ValueError, match="--gpus-per-worker 2.0: one Accelerate process drives one GPU"):
        check_shape(TrialShape(1, gpus_per_worker=2.0), ("swin_base",))
    check_shape(TrialShape(1, gpus_per_worker=0.5), ("swin_base",))  # a fraction for one worker is fine
