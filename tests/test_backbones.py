"""The timm backbone every ResNet baseline shares, shaped by ``backbone_args`` (the demo's small
ResNet), and how a probe rebuilds it from a checkpoint."""

import lightning as L
import pytest
import torch

from datamodules import PlanktonDataModule
from lightning_modules import DINOModule, EncoderFeatures, SimCLRModule, SupervisedModule
from lightning_modules.baselines.backbones import create_backbone

# The demo's backbone: one block per stage at half width.
SMALL_RESNET = {"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256]}


def test_backbone_args_shape_the_timm_model_and_a_bad_one_names_the_model():
    default = create_backbone("resnet18", 1, image_size=32)
    small = create_backbone("resnet18", 1, image_size=32, backbone_args=SMALL_RESNET)
    assert small.num_features == 256 and default.num_features == 512
    assert [len(stage) for stage in (small.layer1, small.layer2, small.layer3, small.layer4)] == [
        1,
        1,
        1,
        1,
    ]
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, torch.nn.Identity)
    assert (
        sum(p.numel() for p in small.parameters())
        < sum(p.numel() for p in default.parameters()) / 8
    )
    assert small(torch.randn(2, 1, 32, 32)).shape == (2, 256)
    with pytest.raises(ValueError, match="backbone_args .* do not fit timm's 'resnet18'"):
        create_backbone("resnet18", 1, backbone_args={"no_such_setting": 1})


@pytest.mark.parametrize("cls", [SupervisedModule, SimCLRModule, DINOModule])
def test_backbone_args_travel_in_the_checkpoint_to_the_probe(cls, tiny_spec, tmp_path):
    data = PlanktonDataModule(synthetic=tiny_spec, image_size=16, batch_size=16, progress=False)
    data.setup("fit")
    module = cls(
        num_classes=data.num_classes,
        class_names=data.class_names,
        image_size=16,
        in_chans=1,
        backbone_args=SMALL_RESNET,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        precision="32-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        fast_dev_run=True,
    )
    trainer.fit(module, data)
    path = tmp_path / "small.ckpt"
    trainer.save_checkpoint(path)
    source = EncoderFeatures(str(path))
    assert source.feature_dims() == {("embedding", None): 256}
    images = torch.randn(3, 1, 16, 16)
    encoder = next(iter(module.eval().encoders().values()))
    features = source(images, torch.arange(3))[("embedding", None)]
    assert torch.allclose(features, encoder(images), atol=1e-5)
