"""``MAEModule``: masked-autoencoder pretraining of a small timm ViT with lightly's MAE parts.

Masked autoencoding on plankton images beat ImageNet pretraining when labels were few (Kareinen
et al., "Self-Supervised Pretraining for Fine-Grained Plankton Recognition", CVPR workshops
2025, with fine-tuning); this baseline brings that recipe, at the suite's small image sizes, next
to SimCLR and DINO, and is judged like them by probes on its frozen features.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from lightly.models import utils
from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from datamodules.views import Recipe, View, Views

from .self_supervised import SelfSupervisedModule


def mae_view(image_size: int, channels: int) -> View:
    """One lightly MAE view: a bicubic random resized crop of 20-100% of the image. lightly's
    horizontal flip is the recipe's random flips and quarter turns here (plankton have no
    orientation); MAE uses no colour augmentation, so ``channels`` changes nothing."""
    recipe = Recipe(size=image_size, scale=(0.2, 1.0), interpolation="bicubic")
    return Views(((recipe, 1),))


class MaskedViT(MaskedVisionTransformerTIMM):
    """lightly's masked ViT as the suite's backbone: called on images, the class token of the
    full, unmasked encoder ``(B, num_features)`` (what the online classifier, the kNN monitor and
    the probes read); ``encode(images, idx_keep=...)`` runs only the kept tokens."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__(vit=vit)
        self.num_features = vit.num_features
        # The encoder's own mask token: MAE drops masked tokens instead of replacing them, so it
        # never receives a gradient, which DDP would report as an unused parameter.
        self.mask_token.requires_grad_(False)


class MAEModule(SelfSupervisedModule):
    """MAE (He et al. 2022) on a small timm ViT, as in lightly's ImageNet benchmark
    (``benchmarks/imagenet/vitb16/mae.py``): lightly's ``MaskedVisionTransformerTIMM`` encodes
    the kept 25% of the patches, its ``MaskedVisionTransformerDecoderTIMM`` (which replaces the
    deprecated ``MAEDecoderTIMM``) decodes every position, and the loss is the plain MSE on the
    pixels of the masked patches (in the suite's [-1, 1] scale). Sizes suit 32-64 px images and
    CPUs; the settings that differ from lightly's ViT-B/16 benchmark say why below.

    Args:
        backbone: a timm ViT name, never pretrained; it gives the width, heads and depth (the
            default ViT-Tiny: 192 wide, 3 heads, 12 blocks; ``vit_small_patch16_224``: 384, 6,
            12). ``patch_size`` and the data's image size and channels replace the name's. A
            ResNet name is refused, and so is ``small_input_stem``: neither applies to a ViT.
        patch_size: pixels per patch side; divides the image size. 4 (lightly: 16 at 224 px)
            keeps an 8x8 grid at 32 px: 16 px patches would leave 4 tokens, too few to mask.
        depth: encoder blocks; None keeps the name's. Fewer blocks bring a training step
            closer to SimCLR's cost (``docs/tuning/mae.md``).
        decoder_dim: decoder width (lightly: 512 for a 768-wide encoder); narrower than the
            encoder, as MAE's light decoder is.
        decoder_depth: decoder blocks (lightly: 8). The decoder runs on every token, the
            masked ones too, so here a decoder block costs about two encoder blocks. MAE's
            ablation found deeper decoders help linear probes: raise it when compute allows.
        decoder_heads: decoder attention heads (32 channels each, as lightly's 512 / 16).
        mask_ratio: share of the patches masked (MAE's and lightly's 0.75).
        optimizer: MAE's and lightly's ``adamw`` (its betas are set below).
        lr: AdamW learning rate for a global batch of 256, scaled linearly (MAE's 1.5e-4).
        weight_decay: AdamW weight decay (MAE's 0.05).
        online_lr: the online classifier's learning rate, larger than the encoder's under
            AdamW.
        **shared: the other settings of ``SelfSupervisedModule`` (``warmup_epochs``, ``knn_k``,
            ``online_lr``...) and the data's.
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        patch_size: int = 4,
        depth: int | None = None,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        mask_ratio: float = 0.75,
        optimizer: str = "adamw",
        lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        online_lr: float | None = 0.004,
        **shared: object,
    ) -> None:
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be between 0 and 1, got {mask_ratio}")
        super().__init__(
            backbone=backbone,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            online_lr=online_lr,
            **shared,
        )
        vit = self.backbone.vit
        num_patches = vit.patch_embed.num_patches
        self.sequence_length = self.backbone.sequence_length  # the patches and the class token
        self.decoder_embed = nn.Linear(vit.embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=num_patches,
            embed_dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_heads,
            num_prefix_tokens=vit.num_prefix_tokens,
        )
        self.prediction_head = nn.Linear(decoder_dim, patch_size**2 * self.hparams.in_chans)

    def build_backbone(self) -> nn.Module:
        """The timm ViT named by ``backbone``, resized for the data, as a ``MaskedViT``."""
        settings = self.hparams
        name, size, patch_size = settings.backbone, settings.image_size, settings.patch_size
        if settings.get("small_input_stem"):
            raise ValueError(
                "small_input_stem applies to ResNets; a ViT's resolution is its patch_size"
            )
        if size % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide the image size {size}")
        depth = {} if settings.depth is None else {"depth": settings.depth}
        try:
            vit = timm.create_model(
                name,
                pretrained=False,
                num_classes=0,
                in_chans=settings.in_chans,
                img_size=size,
                patch_size=patch_size,
                **(settings.backbone_args or {}),
                **depth,
                global_pool="token",  # lightly reads the class token
            )
        except (TypeError, AssertionError) as error:  # a ResNet, a ViT without a class token
            raise ValueError(
                f"backbone {name!r} is not a timm ViT with a class token ({error})"
            ) from None
        if not isinstance(vit, VisionTransformer) or vit.num_prefix_tokens != 1:
            raise ValueError(
                f"backbone {name!r}: MAE needs a timm ViT with a class token and no register "
                "or distillation tokens (lightly's masking keeps token 0 as the class token)"
            )
        return MaskedViT(vit)

    def train_view(self, image_size: int, channels: int) -> View:
        return mae_view(image_size, channels)

    def ssl_step(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images = views[0]
        idx_keep, idx_mask = utils.random_token_mask(
            size=(len(images), self.sequence_length),
            mask_ratio=self.hparams.mask_ratio,
            device=images.device,
        )
        encoded = self.backbone.encode(images=images, idx_keep=idx_keep)
        # The kept tokens in their places of the full sequence; the decoder fills the masked
        # places with its mask token and adds its positional embedding.
        tokens = self.decoder_embed(encoded)
        sequence = tokens.new_zeros(len(images), self.sequence_length, tokens.shape[-1])
        sequence = utils.set_at_index(sequence, idx_keep, tokens)
        decoded = self.decoder(sequence, idx_mask=idx_mask)
        predictions = self.prediction_head(utils.get_at_index(decoded, idx_mask))
        # idx_mask indexes the sequence, whose token 0 is the class token; the patches have none.
        patches = utils.patchify(images, self.hparams.patch_size)
        targets = utils.get_at_index(patches, idx_mask - 1)
        loss = F.mse_loss(predictions.float(), targets.float())
        # As lightly: the online classifier and the kNN monitor read the class token of the
        # masked encoding, which costs nothing more; validation reads the full image's.
        return loss, encoded[:, 0]

    def configure_optimizers(self) -> dict:
        config = super().configure_optimizers()
        # MAE's and lightly's AdamW betas: a beta2 of 0.95 instead of 0.999 steadies ViT
        # pretraining. Unlike lightly, the shared optimiser's groups also decay norms, biases and
        # the tokens (lightly exempts them).
        if self.hparams.optimizer == "adamw":
            for group in config["optimizer"].param_groups:
                group["betas"] = (0.9, 0.95)
        return config
