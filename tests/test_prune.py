"""prune: structured channel pruning and 2:4 masks on the digits CNN and the real ResNet-20."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgec.analysis import total_macs
from edgec.artifact import Artifact
from edgec.config import from_dict
from edgec.data import load_data_config, preprocess
from edgec.errors import BudgetError, ConfigError, EdgecError
from edgec.onnx_export import export_onnx
from edgec.passes.prune import PruneParams, PrunePass, conv_widths, prune_channels, round_width
from edgec.pipeline import Context
from edgec.recipes import load_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits_train(digits_config):
    return load_data_config(digits_config.resolve(digits_config.data)).load("calibration")


def run_prune(model, spec, params, target, data=None, seed=0):
    ctx = Context(target, spec, data, Path("."), seed=seed)
    torch.manual_seed(seed)
    return PrunePass().run(Artifact("torch", copy.deepcopy(model)), params, ctx)


def ort_logits(model, spec, x):
    session = ort.InferenceSession(export_onnx(model, spec), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_digits_pruned_exports_runs_and_keeps_multiples(digits_model, digits_config,
                                                        local_target, digits_train):
    params = PruneParams(ratio=0.5, scope="local", finetune_epochs=5, time_budget_s=120,
                         holdout=200, batch=64, lr=0.05)
    result = run_prune(digits_model, digits_config.input, params, local_target, digits_train)
    pruned, report = result.payload, result.lineage[-1].report
    assert report["widths"] == {"conv1": [16, 8], "conv2": [32, 16]}
    assert pruned.conv1.out_channels % local_target.channel_multiple == 0
    assert pruned.conv2.out_channels % local_target.channel_multiple == 0
    assert report["macs_after"] < report["macs_before"] == total_macs(digits_model,
                                                                      digits_config.input)
    # unpruned: 98.5 % on this held-out slice; pruned without fine-tune: about 22 %
    assert report["finetune"]["epochs"] == 5 and report["holdout_top1"] > 90
    x = preprocess(digits_train.images[:8], digits_config.input)
    np.testing.assert_allclose(ort_logits(pruned, digits_config.input, x),
                               pruned(torch.from_numpy(x)).detach().numpy(), atol=1e-4)


def test_pruning_is_deterministic_with_a_fixed_seed(digits_model, digits_config, local_target,
                                                    digits_train):
    params = PruneParams(ratio=0.3, importance="taylor", finetune_epochs=0.3, holdout=200,
                         batch=64, seed=3)
    first = run_prune(digits_model, digits_config.input, params, local_target, digits_train)
    second = run_prune(digits_model, digits_config.input, params, local_target, digits_train)
    for (name, a), (_, b) in zip(first.payload.state_dict().items(),
                                 second.payload.state_dict().items()):
        assert torch.equal(a, b), name


def test_unreachable_budget_names_best_drop(digits_model, digits_config, local_target,
                                            digits_train):
    params = PruneParams(ratios=(0.9, 0.8), budget_points=0.0, channel_multiple=2,
                         holdout=300)
    with pytest.raises(BudgetError, match=r"best achievable drop \d+\.\d+ points at ratio"):
        run_prune(digits_model, digits_config.input, params, local_target, digits_train)


def test_budget_picks_the_largest_ratio_inside_it(digits_model, digits_config, local_target,
                                                  digits_train):
    params = PruneParams(ratios=(0.9, 0.0), budget_points=0.0, holdout=300)
    report = run_prune(digits_model, digits_config.input, params, local_target,
                       digits_train).lineage[-1].report
    assert report["ratio"] == 0.0  # 0.9 (16→8, 32→8 without fine-tune) must drop accuracy
    assert [t["ratio"] for t in report["trials"]] == [0.0, 0.9]  # steps from the smallest up
    assert report["trials"][1]["holdout_drop_points"] > 0


def test_search_prunes_iteratively_and_shares_the_epochs(digits_model, digits_config,
                                                          local_target, digits_train):
    params = PruneParams(ratios=(0.6, 0.3), budget_points=100.0, channel_multiple=2,
                         finetune_epochs=0.6, time_budget_s=600, holdout=300, batch=64)
    report = run_prune(digits_model, digits_config.input, params, local_target,
                       digits_train).lineage[-1].report
    first, second = report["trials"]
    assert (first["ratio"], second["ratio"], report["ratio"]) == (0.3, 0.6, 0.6)
    # each step gets an equal share of the epochs
    assert first["finetune"]["epochs"] == pytest.approx(0.3, abs=0.05)
    assert second["finetune"]["epochs"] == pytest.approx(0.3, abs=0.05)
    assert second["macs"] < first["macs"] < report["macs_before"]
    # widths count from the unpruned model, so the second step prunes the first one further
    assert all(after <= before for before, after in report["widths"].values())


def test_mac_ratios_reach_the_mac_cut_with_the_fewest_channels(digits_model, digits_config,
                                                               local_target, digits_train):
    params = PruneParams(ratios=(0.2, 0.4), ratio_of="macs", budget_points=100.0,
                         channel_multiple=1, finetune_epochs=0.2, holdout=300, batch=64,
                         finetune_augment="flip")
    report = run_prune(digits_model, digits_config.input, params, local_target,
                       digits_train).lineage[-1].report
    first, second = report["trials"]
    assert (report["ratio"], report["ratio_of"]) == (0.4, "macs")
    for trial in (first, second):
        assert trial["macs"] <= (1 - trial["ratio"]) * report["macs_before"]
    # pruning the unpruned model by 0.002 fewer channels than the first step's would miss its cut
    fewer = copy.deepcopy(digits_model)
    prune_channels(fewer, digits_config.input, first["channel_ratio"] - 0.002)
    assert total_macs(fewer, digits_config.input) > 0.8 * report["macs_before"]
    assert first["channel_ratio"] < second["channel_ratio"] < 1


def test_taylor_importance_reaches_a_mac_cut(digits_model, digits_config, local_target,
                                             digits_train):
    """The bisection's probes rank channels by Taylor importance too (they need gradients)."""
    params = PruneParams(ratio=0.3, ratio_of="macs", importance="taylor", finetune_epochs=0.0)
    report = run_prune(digits_model, digits_config.input, params, local_target,
                       digits_train).lineage[-1].report
    assert report["macs_reduction"] >= 0.3 and report["channel_ratio"] > 0


def test_unreachable_mac_ratio_is_a_pass_error(digits_model, digits_config, local_target):
    params = PruneParams(ratio=0.99, ratio_of="macs", channel_multiple=8)
    with pytest.raises(EdgecError, match="ratio 0.99 of MACs cannot be reached"):
        run_prune(digits_model, digits_config.input, params, local_target)


def test_second_step_prunes_the_first_further_to_the_same_total(digits_model, digits_config):
    spec = digits_config.input
    once, twice = copy.deepcopy(digits_model), copy.deepcopy(digits_model)
    unpruned = conv_widths(digits_model)
    prune_channels(once, spec, 0.5, scope="global")
    prune_channels(twice, spec, 0.25, scope="global")
    prune_channels(twice, spec, 0.5, scope="global", reference_widths=unpruned)
    assert sum(conv_widths(twice).values()) == sum(conv_widths(once).values())


@pytest.mark.parametrize("bad", [{"ratio": 1.0}, {"ratio": -0.1}, {"ratios": [0.2, 1.5]},
                                 {"ratio_of": "flops"}, {"finetune_augment": "mixup"},
                                 {"ratio_of": "macs", "stage_ratios": {"layer3": 0.4}},
                                 {"stage_ratios": {"layer3": 2.0}}, {"mode": "4:8"},
                                 {"importance": "l3"}, {"budget_points": -1.0}])
def test_invalid_params_are_config_errors(bad):
    with pytest.raises(ConfigError) as info:
        from_dict(PruneParams, bad, "recipe.toml step 1 (prune)")
    assert isinstance(info.value, EdgecError) and "recipe.toml" in str(info.value)


def test_invalid_ratio_in_a_recipe_names_the_file(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('[[step]]\npass = "prune"\nratio = 1.2\n')
    with pytest.raises(ConfigError, match=r"bad.toml step 1 \(prune\).*ratio 1.2"):
        load_recipe(recipe)


def test_prune_int8_recipe_chains_for_local(local_target):
    pipeline = load_recipe(ROOT / "passes" / "prune-int8.toml")
    assert [s.pass_.name for s in pipeline.steps] == ["prune", "fuse", "export", "quantize"]
    assert pipeline.steps[0].params.budget_points == 1.0
    pipeline.check_target(local_target)


def test_round_width():
    assert [round_width(k, 64, 16) for k in (3, 20, 24.5, 40, 60, 64)] == [16, 16, 32, 32, 64, 64]
    assert round_width(11.2, 16, 8) == 8 and round_width(12.8, 16, 8) == 16


def test_resnet20_prunes_inner_channels_only_and_runs_in_ort(resnet20, resnet20_config,
                                                            cifar_train_slice, local_target):
    spec = resnet20_config.input
    params = PruneParams(ratio=0.5, scope="local", channel_multiple=16, finetune_epochs=0.05,
                         holdout=500, batch=64)
    result = run_prune(resnet20, spec, params, local_target, cifar_train_slice)
    pruned, report = result.payload, result.lineage[-1].report
    assert report["macs_before"] == 40_551_040
    assert 0.30 < report["macs_reduction"] < 0.34
    inner = {f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)}
    assert set(report["widths"]) <= inner
    for name, module in pruned.named_modules():
        if isinstance(module, torch.nn.Conv2d) and name in report["widths"]:
            assert module.out_channels % 16 == 0
    # residual streams keep their widths: the option-A zero-padded shortcuts stay exact
    assert [pruned.layer1[0].conv2.out_channels, pruned.layer2[0].conv2.out_channels,
            pruned.layer3[2].conv2.out_channels] == [16, 32, 64]
    assert report["finetune"]["steps"] > 0
    x = preprocess(cifar_train_slice.images[:4], spec)
    np.testing.assert_allclose(ort_logits(pruned, spec, x),
                               pruned(torch.from_numpy(x)).detach().numpy(), atol=1e-3)


def test_two_four_mask_survives_fine_tune_and_reports_acceleration_honestly(
        digits_model, digits_config, local_target, digits_train):
    params = PruneParams(mode="2:4", finetune_epochs=2, holdout=200, batch=64, lr=0.05)
    result = run_prune(digits_model, digits_config.input, params, local_target, digits_train)
    report = result.lineage[-1].report
    assert report["accelerated"] is False and "dense" in report["why"]
    assert report["finetune"]["steps"] > 0 and report["holdout_top1"] > 50
    weight = result.payload.conv2.weight.detach().reshape(32, -1).reshape(32, -1, 4)
    assert bool(((weight == 0).sum(dim=2) >= 2).all())
    assert report["sparsity"] >= 0.5
    assert float((result.payload.fc.weight == 0).float().mean()) < 0.1  # classifier kept dense


def test_shifted_view_is_deterministic_and_breaks_memorisation(resnet20, resnet20_config,
                                                               cifar_train_slice):
    from edgec.accuracy import shifted, top1, torch_logits

    spec = resnet20_config.input
    x = torch.from_numpy(preprocess(cifar_train_slice.images[:16], spec))
    assert torch.equal(shifted(x, 3), shifted(x, 3)) and not torch.equal(shifted(x, 3), x)
    assert shifted(x, 3).shape == x.shape
    labels = cifar_train_slice.labels
    plain = top1(torch_logits(resnet20, cifar_train_slice, spec), labels)
    moved = top1(torch_logits(resnet20, cifar_train_slice, spec, view="shifted"), labels)
    # the pretrained ResNet-20 saw these training images: ~99.8 % plain, ~64 % shifted
    assert plain > 0.99 and 0.4 < moved < 0.8


def test_fine_tune_follows_the_splits_augmentation(digits_model, digits_config, digits_train):
    """Flipped images give a different fine-tune than plain ones; the same seed, the same one."""
    from edgec.train import distill

    def tuned(augment):
        student = copy.deepcopy(digits_model)
        data = dataclasses.replace(digits_train.head(256), augment=augment)
        distill(student, digits_model, data, digits_config.input, epochs=1, lr=0.05, batch=64,
                progress=False, precision="fp32")
        return student.conv1.weight.detach()

    assert torch.equal(tuned("flip"), tuned("flip"))
    assert not torch.equal(tuned("flip"), tuned("none"))


def test_shifted_fine_tune_augmentation_is_seeded_and_moves_images(digits_model, digits_config,
                                                                   digits_train):
    from edgec.train import UNLABELLED, _augment, distillation_loss

    x = torch.from_numpy(preprocess(digits_train.images[:64], digits_config.input))
    moved, which = _augment(x, "crop-flip-shifted", np.random.default_rng(0))
    again, same = _augment(x, "crop-flip-shifted", np.random.default_rng(0))
    assert torch.equal(moved, again) and torch.equal(which, same)
    cropped, none = _augment(x, "crop-flip", np.random.default_rng(0))
    changed = (moved != cropped).flatten(1).any(1)
    assert none is None and moved.shape == x.shape and 0.25 < which.float().mean() < 0.75
    assert torch.equal(changed, which)  # exactly the flagged images were moved
    # moved images are distilled only: their labels do not enter the loss
    logits, teacher = torch.randn(4, 10), torch.randn(4, 10)
    labels = torch.tensor([1, 2, UNLABELLED, UNLABELLED])
    soft = distillation_loss(logits, teacher, labels, 4.0, 1.0)
    hard = torch.nn.functional.cross_entropy(logits[:2], labels[:2])
    assert float(distillation_loss(logits, teacher, labels, 4.0, 0.9)) == pytest.approx(
        float(0.9 * soft + 0.1 * hard))
