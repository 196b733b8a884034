"""``ProbeModule``: one head per key of a frozen feature source, all trained together and the
best selected on validation. The backbone stays frozen in eval mode.

Its parts: ``inputs`` (every key's features, from the feature cache or the backbone), ``heads``
(their normalization and the heads), ``solver`` (L-BFGS, its weight-decay grid and the fusion of
the best keys) and ``reports`` (what a run writes); this module drives them through Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from datamodules.views import View

from ..common.classification_metrics import CalibratedClassifier
from ..diffusion.module import diffusion_view
from . import reports
from .features import FeatureKey, FeatureSource
from .grid_metrics import GridConfusion, GridScores, grid_scores
from .heads import AttentionHead, FeatureNormalization, LinearHeads, load_moved_state
from .inputs import ProbeInputs
from .solver import (
    decay_grid,
    fit_fusion,
    fusion_inputs,
    head_cross_entropy,
    lbfgs,
    lbfgs_step,
    penalized,
    select_weight_decay,
    solver_for,
    top_keys,
)


class ProbeModule(CalibratedClassifier):
    """Linear probes for every key of ``features``, selected on validation.

    Args:
        features: the frozen feature source (``DiffusionFeatures``, or an encoder's).
        mode: ``cached`` (extract once to disk, then train the heads) or ``online``.
        solver: ``lbfgs`` (full-batch logistic regression on cached features, solved rather
            than sampled; ``lbfgs_iterations`` per epoch), or ``adamw`` or ``sgd``
            (mini-batch, for online mode). None: ``lbfgs`` in cached mode, else ``adamw``.
        lr: learning rate of AdamW and SGD (L-BFGS uses a line search instead).
        weight_decay: L2 penalty on the head weights (decoupled for AdamW, in the loss for
            SGD and L-BFGS). With L-BFGS a list is a grid: every head is fitted at each decay
            and the decay whose best head scores highest on validation is kept, one for all
            heads. None: ``solver.LBFGS_DECAY_GRID`` for L-BFGS, else 1e-4.
        standardize: ``train`` (mean and std of each feature over the training set),
            ``batchnorm`` (a BatchNorm without affine parameters) or ``none``.
        l2_normalize: scale each key's feature vector to unit length (after standardizing).
        loss: ``cross_entropy``, ``class_balanced`` (inverse-frequency class weights) or
            ``logit_adjusted`` (adds ``logit_tau * log prior`` during training; Menon et al.).
        logit_tau: strength of the logit adjustment.
        lbfgs_iterations: L-BFGS iterations per epoch.
        convergence_tol: a head has converged when its training loss changed over the last
            epoch by less than this fraction of (loss + 0.1).
        select_metric: validation metric that chooses the best key.
        fusion_top_k: after fitting, a head on the concatenated features of the top-k keys is
            trained with L-BFGS and reported beside the best single key (0 disables it).
        head: ``linear`` (``LinearHeads``), or ``attention`` (``AttentionHead``: NOT linear,
            attention pooling over one key's spatial tokens, for features with ``pooling:
            tokens``). Trained by AdamW or SGD (the problem is not convex).
        augment: online mode only: flips and 90-degree rotations of the training images.
        cache_dir: feature cache folder; None: the data's cache folder (``$PLANKTON_CACHE``
            by default). A path of this machine, so not saved in the checkpoint.
        extract_batch_size: batch size of feature extraction.
        **data: the data's settings (``PlanktonModule``).
    """

    not_saved = ("features", "cache_dir")

    def __init__(
        self,
        features: FeatureSource,
        mode: Literal["cached", "online"] = "cached",
        solver: Literal["adamw", "sgd", "lbfgs"] | None = None,
        lr: float = 1e-3,
        weight_decay: float | list[float] | None = None,
        standardize: Literal["train", "batchnorm", "none"] = "train",
        l2_normalize: bool = False,
        loss: Literal["cross_entropy", "class_balanced", "logit_adjusted"] = "cross_entropy",
        logit_tau: float = 1.0,
        lbfgs_iterations: int = 50,
        convergence_tol: float = 1e-3,
        select_metric: Literal["macro_f1", "acc"] = "macro_f1",
        fusion_top_k: int = 3,
        head: Literal["linear", "attention"] = "linear",
        augment: bool = False,
        cache_dir: str | None = None,
        extract_batch_size: int = 64,
        **data: object,
    ) -> None:
        super().__init__(**data)
        self.solver = solver_for(solver, mode, head)
        self.decay_grid = decay_grid(weight_decay, self.solver)
        self.automatic_optimization = self.solver != "lbfgs"
        self.features = features.requires_grad_(False)
        self.keys: list[FeatureKey] = list(features.keys)
        num_classes = len(self.class_names)
        features.bind_data(self.hparams.in_chans, self.hparams.image_size)
        dims = features.feature_dims()
        widths = [dims[key] for key in self.keys]
        width, heads = max(widths), len(self.keys)
        self.normalization = FeatureNormalization(widths, standardize, l2_normalize)
        self.heads = (
            AttentionHead.for_features(features, self.keys, num_classes)
            if head == "attention"
            else LinearHeads(heads, width, num_classes)
        )
        self.register_load_state_dict_pre_hook(load_moved_state)
        self.register_buffer("log_prior", torch.zeros(num_classes))
        self.register_buffer("class_weight", torch.ones(num_classes))
        # Selection and convergence travel in the checkpoint, so `test` knows the best key.
        self.register_buffer("val_acc", torch.zeros(heads))
        self.register_buffer("val_macro_f1", torch.zeros(heads))
        self.register_buffer("converged", torch.zeros(heads, dtype=torch.bool))
        self.register_buffer("previous_loss", torch.full((heads,), float("nan")))
        self.register_buffer("weight_decay", torch.tensor(self.decay_grid[0], dtype=torch.float64))
        self.decay_scores: dict[float, float] = {}
        top_k = min(fusion_top_k, heads)
        top_k = top_k if top_k > 1 else 0  # fusing one key is that key: nothing to report
        self.register_buffer("fusion_keys", torch.zeros(top_k, dtype=torch.long))
        self.fusion_weight = nn.Parameter(torch.zeros(top_k * width, num_classes), False)
        self.fusion_bias = nn.Parameter(torch.zeros(num_classes), False)
        self.val_grid = GridConfusion(heads, num_classes)
        self.test_grids = nn.ModuleList()
        self.epoch_loss = torch.zeros(heads)
        self.epoch_batches = 0
        self.inputs = ProbeInputs(features, self.keys, width, mode, extract_batch_size, cache_dir)

    # -- views and features --------------------------------------------------------------------
    def train_view(self, image_size: int, channels: int) -> View | None:
        """Augmentation only for online probes that ask for it; otherwise the evaluation view."""
        if self.hparams.augment and self.hparams.mode == "online":
            return diffusion_view(image_size, channels)
        return None

    @property
    def best_index(self) -> int:
        return int(getattr(self, f"val_{self.hparams.select_metric}").argmax())

    @property
    def best_key(self) -> FeatureKey:
        return self.keys[self.best_index]

    def feature_cache_dir(self, datamodule: object) -> Path:
        """Where the features are cached: ``cache_dir``, else the data's cache folder."""
        return self.inputs.cache_folder(datamodule)

    def batch_features(self, batch: tuple, split: str) -> torch.Tensor:
        """``(keys, batch, width)`` float32 features of a batch of ``split``."""
        return self.inputs.batch(batch, split, self.trainer)

    def logits(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(keys, batch, classes)`` from raw features ``(keys, batch, width)``, by the heads'
        parameters or by ``weight`` and ``bias`` of their shapes."""
        return self.heads(self.normalization(x), weight, bias)

    def head_losses(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training loss of every head ``(keys,)``."""
        logits = self.logits(x, weight, bias)
        if self.hparams.loss == "logit_adjusted":
            logits = logits + self.hparams.logit_tau * self.log_prior
        class_weight = self.class_weight if self.hparams.loss == "class_balanced" else None
        return head_cross_entropy(logits, labels, class_weight)

    # -- fitting -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if stage == "fit":
            counts = datamodule.class_counts.to(self.log_prior)
            self.log_prior.copy_(torch.log(counts.clamp(min=1) / counts.sum()))
            self.class_weight.copy_(datamodule.class_weights.to(self.class_weight))

    def on_fit_start(self) -> None:
        self.features.eval()
        if self.hparams.mode == "cached":
            self._extract("train", "val")
        if self.hparams.standardize == "train":
            self.normalization.fit(self.inputs.collect("train", self.trainer)[0])
        if len(self.decay_grid) > 1:
            self._select_weight_decay()

    def _extract(self, *splits: str) -> None:
        """Fill the feature cache of ``splits``, every rank extracting its shard together."""
        for split in splits:
            self.inputs.split(split, self.trainer)

    def _select_weight_decay(self) -> None:
        """Fit every head at each decay of the grid and keep the decay, and its heads, whose
        best head scores highest on validation (``select_weight_decay``)."""
        x, labels = self.inputs.collect("train", self.trainer)
        val_x, val_labels = self.inputs.collect("val", self.trainer)

        def score(weight: torch.Tensor, bias: torch.Tensor) -> float:
            predictions = self.logits(val_x, weight, bias).argmax(-1)
            confusion = GridConfusion(len(self.keys), len(self.class_names)).to(self.device)
            confusion.update(predictions, val_labels)
            return float(getattr(grid_scores(confusion.matrix), self.hparams.select_metric).max())

        choice = select_weight_decay(
            lambda weight, bias: self.head_losses(x, labels, weight, bias),
            score,
            self.heads.weight,
            self.heads.bias,
            self.decay_grid,
            self.hparams.lbfgs_iterations,
        )
        self.decay_scores = choice.scores
        with torch.no_grad():
            self.heads.weight.copy_(choice.weight)
            self.heads.bias.copy_(choice.bias)
        self.weight_decay.fill_(choice.decay)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor | None:
        if self.solver == "lbfgs":
            return self._lbfgs_epoch(batch_idx)
        losses = self.head_losses(self.batch_features(batch, "train"), batch[1])
        self.epoch_loss += losses.detach().cpu()
        self.epoch_batches += 1
        loss = losses.sum()  # each head receives the gradient of its own loss
        if self.solver == "sgd":
            loss = loss + 0.5 * float(self.weight_decay) * self.heads.weight.square().sum()
        self.log("train/loss", losses.mean(), prog_bar=True)
        return loss

    def _lbfgs_epoch(self, batch_idx: int) -> None:
        """Full-batch L-BFGS once per epoch, on the first batch; the other batches do nothing."""
        if batch_idx:
            return None
        x, labels = self.inputs.collect("train", self.trainer)
        decay = float(self.weight_decay)

        def loss() -> torch.Tensor:
            return penalized(self.head_losses(x, labels), self.heads.weight, decay)

        lbfgs_step(self.optimizers(), loss, self.manual_backward)
        with torch.no_grad():
            self.epoch_loss = self.head_losses(x, labels).cpu()
        self.epoch_batches = 1
        self.log("train/loss", self.epoch_loss.mean())
        return None

    def on_train_epoch_end(self) -> None:
        loss = self.epoch_loss / max(1, self.epoch_batches)
        loss = self.trainer.strategy.reduce(loss.to(self.device), reduce_op="mean").cpu()
        # Relative for large losses, absolute near zero (separable data drives the loss to 0).
        change = (loss - self.previous_loss.cpu()).abs()
        self.converged.copy_(change < self.hparams.convergence_tol * (loss + 0.1))
        self.previous_loss.copy_(loss)
        # Reduced above, so equal on every rank; sync_dist only averages equal values.
        self.log("train/heads_converged", self.converged.float().mean(), sync_dist=True)
        self.epoch_loss = torch.zeros(len(self.keys))
        self.epoch_batches = 0

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        self.val_grid.update(self.logits(self.batch_features(batch, "val")).argmax(-1), batch[1])

    def on_validation_epoch_end(self) -> None:
        scores = grid_scores(self.val_grid.compute())
        self.val_grid.reset()
        self.val_acc.copy_(scores.acc)
        self.val_macro_f1.copy_(scores.macro_f1)
        best = self.best_index
        self.log("val/best_acc", scores.acc[best], sync_dist=True)
        self.log("val/best_macro_f1", scores.macro_f1[best], prog_bar=True, sync_dist=True)

    def validation_scores(self) -> GridScores:
        """The validation scores of the last epoch; they travel in the checkpoint."""
        return GridScores(self.val_acc, self.val_macro_f1)

    def on_train_end(self) -> None:
        """Fit the fusion head, then calibrate every head ``plankton classify`` may use and
        write both into the last checkpoint (``CalibratedClassifier``).

        The callbacks saved ``last.ckpt`` before this hook (at the end of the last epoch), so
        without the re-save a test of it would score a fusion head of zeros. Here rather than in
        ``on_fit_end``: the strategy is still set up (the training device, and the process group
        the collective ``save_checkpoint`` needs under DDP). Not earlier: the fusion picks its
        keys by the last validation, and fitting it every epoch would cost a full pass over the
        training features each time.
        """
        if len(self.fusion_keys):
            self._fit_fusion()
        super().on_train_end()

    def validation_logits(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The validation logits of the best key (what ``classify`` returns) and of the fusion."""
        x, labels = self.inputs.collect("val", self.trainer)
        logits = {"classify": self.logits(x)[self.best_index]}
        if len(self.fusion_keys):
            logits["fusion"] = self.fusion_logits(x)
        return logits, labels

    def on_fit_end(self) -> None:
        folder = self.output_dir()  # on every rank: finding the log folder is collective
        rank_zero_only(self._write_reports)(reports.write_fit_reports, folder)

    @torch.no_grad()
    def _fusion_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, k * width)``: normalized features of the top-k keys, concatenated."""
        return fusion_inputs(self.normalization(x), self.fusion_keys)

    def _fit_fusion(self) -> None:
        """A head on the concatenated top-k keys, by full-batch L-BFGS."""
        scores = getattr(self, f"val_{self.hparams.select_metric}")
        self.fusion_keys.copy_(top_keys(scores, len(self.fusion_keys)))
        x, labels = self.inputs.collect("train", self.trainer)
        inputs = self._fusion_inputs(x)
        weight, bias = fit_fusion(inputs, labels, len(self.class_names), float(self.weight_decay))
        self.fusion_weight.copy_(weight)
        self.fusion_bias.copy_(bias)

    def fusion_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._fusion_inputs(x) @ self.fusion_weight + self.fusion_bias

    # -- testing -------------------------------------------------------------------------------
    def on_test_start(self) -> None:
        super().on_test_start()
        self.features.eval()
        names = self.trainer.datamodule.eval_set_names
        if self.hparams.mode == "cached":
            self._extract(*names)
        heads = len(self.keys) + (1 if len(self.fusion_keys) else 0)
        self.test_grids = nn.ModuleList(
            GridConfusion(heads, len(self.class_names)) for _ in names
        ).to(self.device)

    def test_step(self, batch: tuple, batch_idx: int, dataloader_idx: int = 0) -> None:
        x = self.batch_features(batch, self.trainer.datamodule.eval_set_names[dataloader_idx])
        preds = self.logits(x).argmax(-1)
        if len(self.fusion_keys):
            preds = torch.cat([preds, self.fusion_logits(x).argmax(-1)[None]])
        self.test_grids[dataloader_idx].update(preds, batch[1])

    def on_test_epoch_end(self) -> None:
        results = {}
        best = self.best_index
        for name, grid in zip(self.trainer.datamodule.eval_set_names, self.test_grids, strict=True):
            # compute() already syncs across processes; sync_dist only averages equal values.
            scores = results[name] = grid_scores(grid.compute())
            heads = {"best": best} | ({"fusion": -1} if len(self.fusion_keys) else {})
            for head, index in heads.items():
                self.log(f"{name}/{head}_acc", scores.acc[index], sync_dist=True)
                self.log(f"{name}/{head}_macro_f1", scores.macro_f1[index], sync_dist=True)
            grid.reset()
        folder = self.output_dir()  # on every rank: finding the log folder is collective
        write = rank_zero_only(self._write_reports)
        write(reports.write_test_reports, folder, results, projection=self._projection)

    def _projection(self) -> reports.Projection | None:
        """Up to ``PROJECTOR_POINTS`` test images, with the best key's features."""
        dataset = self.trainer.datamodule.dataset("test")
        count = min(reports.PROJECTOR_POINTS, len(dataset))
        if count == 0:
            return None
        features, labels = self.inputs.collect("test", self.trainer)
        best = self.best_index
        width = self.normalization.valid[best].sum()
        images = torch.stack([dataset[i][0] for i in range(count)])
        return reports.Projection(features[best, :count, :width].cpu(), labels[:count], images)

    # -- classifying new images ----------------------------------------------------------------
    def classify(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(batch, classes)`` of the validation-selected key for new images.

        New images have no rows in a split, so their features come from the online path (never
        the feature cache) and go through the test-time normalisation. ``indices`` key the
        per-image diffusion noise; by default the images' positions in the batch.
        """
        if indices is None:
            indices = torch.arange(len(images))
        return self.logits(self.inputs.of_images(images, indices, self.device))[self.best_index]

    def predict_step(self, batch: tuple, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Calibrated class probabilities of the best key. A cached probe reads the split's
        feature cache (``test`` has been extracted once already); otherwise the batch's split
        indices key the noise, as in the cache, so an image gets the features it had in
        ``test``."""
        if self.hparams.mode == "cached":
            x = self.batch_features(batch, self.trainer.datamodule.predict_set)
            return self.probabilities(self.logits(x)[self.best_index])
        return self.probabilities(self.classify(batch[0], batch[2]))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """How to rebuild the feature source, so ``plankton classify`` can read the probe alone
        (plain values only: the checkpoint stays readable with ``weights_only=True``)."""
        super().on_save_checkpoint(checkpoint)
        if self.features.init_args is not None:
            checkpoint["feature_source"] = {
                "class_path": f"lightning_modules.{type(self.features).__name__}",
                "init_args": dict(self.features.init_args),
            }

    # -- outputs -------------------------------------------------------------------------------
    def output_dir(self) -> Path:
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _write_reports(
        self,
        write: Callable[..., None],
        folder: Path,
        tests: dict[str, GridScores] | None = None,
        **options: object,
    ) -> None:
        """``write`` the reports of the heads' scores (the last validation's, and ``tests``)."""
        results = reports.ProbeResults(
            keys=self.keys,
            class_names=self.class_names,
            best=self.best_index,
            converged=self.converged.tolist(),
            fusion_keys=self.fusion_keys.tolist(),
            select_metric=self.hparams.select_metric,
            weight_decay=float(self.weight_decay),
            decay_scores=self.decay_scores,
            validation=self.validation_scores(),
            tests=tests or {},
        )
        tensorboard = reports.tensorboard_writer(self.trainer.logger)
        write(folder, results, tensorboard, self.global_step, **options)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        heads = list(self.heads.parameters())
        if self.solver == "lbfgs":
            return lbfgs(heads, self.hparams.lbfgs_iterations)
        if self.solver == "sgd":
            return torch.optim.SGD(heads, lr=self.hparams.lr, momentum=0.9)
        return torch.optim.AdamW(heads, lr=self.hparams.lr, weight_decay=float(self.weight_decay))
