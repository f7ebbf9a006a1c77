"""BatchNorm folding and re-parameterization: the deploy form of every family computes the same function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visionmlp import create_model, reparameterize
from visionmlp.models import RepMLPBlock, count_batchnorms, fold_batchnorm
from visionmlp.models.fold import fold_bn_after, fold_bn_before

# One variant per family, made small; BatchNorms that stay are the ones with no adjacent conv / linear layer.
CASES = {
    "ms_mlp_tiny": ({"depths": (1, 1, 1, 1)}, 64, 0, 0),  # LayerNorm only: deploy form == training form
    "vip_s7": ({"depths": (1, 1, 1, 1), "img_size": 56}, 56, 0, 0),  # LayerNorm only
    "raft_mlp_s": ({"img_size": 64}, 64, 0, 0),  # LayerNorm only
    # per block: proj_in_norm and the strip mixing norm fold; the pre-activation norm and the final norm stay
    "strip_mlp_tiny_light": ({"depths": (1, 1, 1, 1), "img_size": 64}, 64, 8, 5),
    # per layer: fc3_bn, two conv-branch BNs, prebn2 and both FFN BNs fold (6); prebn1 and head_norm stay;
    # the four conv embeddings fold too
    "repmlpnet_t224": ({"depths": (1, 1, 1, 1), "img_size": 64}, 64, 4 * 6 + 4, 5),
}


def randomize_batchnorms(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so that folding is actually exercised."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) - 0.5)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference over the largest absolute reference value."""
    return ((output - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("name", list(CASES))
def test_folded_model_matches_training_form_and_reloads(name, tmp_path):
    kwargs, size, folded_count, remaining = CASES[name]
    trained = create_model(name, num_classes=10, **kwargs).eval()
    randomize_batchnorms(trained)
    path = tmp_path / "trained.pt"
    torch.save({"model": trained.state_dict()}, path)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = trained(images)
        before = count_batchnorms(trained)
        folded = reparameterize(trained)
        assert before - count_batchnorms(folded) == folded_count
        assert count_batchnorms(folded) == remaining
        assert relative_error(folded(images), reference) <= 1e-5

        # the folded weights load into create_model(deploy=True), and so does the training-form checkpoint
        deploy_path = tmp_path / "deploy.safetensors"
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in folded.state_dict().items()}, str(deploy_path))
        for checkpoint in (deploy_path, path):
            loaded = create_model(name, num_classes=10, deploy=True, checkpoint_path=checkpoint, **kwargs).eval()
            assert loaded.state_dict().keys() == folded.state_dict().keys()
            assert relative_error(loaded(images), reference) <= 1e-5


def test_deploy_model_without_checkpoint_has_folded_structure():
    model = create_model("strip_mlp_tiny_light", deploy=True, img_size=64, depths=(1, 1, 1, 1))
    assert count_batchnorms(model) == 5
    assert fold_batchnorm(model) == 0  # folding twice changes nothing


def test_wrong_checkpoint_names_both_forms(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"unrelated.weight": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="neither the training form .* nor its folded deploy form"):
        create_model("raft_mlp_s", img_size=64, deploy=True, checkpoint_path=path)


def test_sequential_conv_and_linear_followed_by_batchnorm_fold():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6)).eval()
    randomize_batchnorms(model)
    images = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        reference = model(images)
        assert fold_batchnorm(model) == 2
        assert count_batchnorms(model) == 0
        assert relative_error(model(images), reference) <= 1e-5


def test_batchnorm_before_pointwise_conv_folds_and_wider_kernels_refuse():
    bn, conv = nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1)
    randomize_batchnorms(bn)
    bn.eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        reference = conv(bn(x))
        fold_bn_before(bn, conv)
        assert relative_error(conv(x), reference) <= 1e-5
    with pytest.raises(ValueError, match="dense 1x1"):
        fold_bn_before(bn, nn.Conv2d(4, 3, 3, padding=1))
    with pytest.raises(ValueError, match="running statistics"):
        fold_bn_after(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))


def test_repmlp_block_as_a_building_block_in_another_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), RepMLPBlock(8, partition_size=4, num_sharesets=2),
                          nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)).eval()
    randomize_batchnorms(model)
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        reference = model(images)
        reparameterize(model)
        assert model[1].deploy and count_batchnorms(model) == 0
        assert relative_error(model(images), reference) <= 1e-5
