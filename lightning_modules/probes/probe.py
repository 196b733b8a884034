"""``ProbeModule``: one linear head per key of a frozen feature source, all trained together.

Features of every key are zero-padded to a common width and stacked, so the whole grid of heads
is one batched matrix product ``(keys, batch, dim) @ (keys, dim, classes)``; the zero padding
adds nothing to the logits. The backbone stays frozen in eval mode. In ``cached`` mode features
are extracted once into the on-disk feature cache and every epoch costs only the heads; in
``online`` mode the backbone runs every step (and may see augmented images). Both round features
to float16, so they train on identical inputs.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from datamodules.cache import default_cache_dir
from datamodules.store import write_csv_atomic
from datamodules.views import View

from ..common.classification_metrics import CalibratedClassifier
from ..diffusion.module import diffusion_view
from .feature_cache import load_or_extract
from .features import FeatureKey, FeatureSource
from .grid_metrics import GridConfusion, GridScores, grid_scores
from .reports import write_heatmaps, write_test_reports

RESULT_COLUMNS = ["layer", "timestep", "split", "accuracy", "macro_f1", "converged", "best"]
# L-BFGS's weight decays, chosen on validation: the penalty is 0.5 * decay * ||W||^2 on the mean
# training loss, so scikit-learn's C is 1 / (decay * training images).
LBFGS_DECAY_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


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
            heads. None: ``LBFGS_DECAY_GRID`` for L-BFGS, else 1e-4.
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
        head: ``linear`` (a linear probe), or ``attention``: NOT linear, an attention-pooling
            head over one key's spatial tokens (features with ``pooling: tokens``): a learned
            query weighs the positions (softmax of their match with it), and a linear layer
            reads the weighted average (channels + channels x classes parameters, as diffssl's
            attention head). Trained by AdamW or SGD (the problem is not convex).
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
        self.solver = solver or ("lbfgs" if mode == "cached" and head == "linear" else "adamw")
        if self.solver == "lbfgs" and mode != "cached":
            raise ValueError("solver: lbfgs needs mode: cached (full-batch on stored features)")
        if self.solver == "lbfgs" and head != "linear":
            raise ValueError("head: attention is not a convex problem: use solver adamw or sgd")
        self.decay_grid = _decay_grid(weight_decay, self.solver)
        self.cache_dir = cache_dir
        self.automatic_optimization = self.solver != "lbfgs"
        self.features = features.requires_grad_(False)
        self.keys: list[FeatureKey] = list(features.keys)
        num_classes = len(self.class_names)
        features.bind_data(self.hparams.in_chans, self.hparams.image_size)
        dims = features.feature_dims()
        widths = torch.tensor([dims[key] for key in self.keys])
        width = int(widths.max())
        heads = len(self.keys)
        self.register_buffer("valid", torch.arange(width)[None, :] < widths[:, None])
        self.register_buffer("mean", torch.zeros(heads, width))
        self.register_buffer("std", torch.ones(heads, width))
        self.norm = (
            nn.BatchNorm1d(heads * width, affine=False) if standardize == "batchnorm" else None
        )
        # The attention head's linear layer reads the channels of one pooled token.
        head_width = self._attention_channels(features) if head == "attention" else width
        self.query = nn.Parameter(torch.zeros(1, head_width)) if head == "attention" else None
        self.weight = nn.Parameter(torch.zeros(heads, head_width, num_classes))
        self.bias = nn.Parameter(torch.zeros(heads, num_classes))
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
        self._cached: dict[str, torch.Tensor] = {}

    def _attention_channels(self, features: FeatureSource) -> int:
        if len(self.keys) != 1 or not hasattr(features, "token_channels"):
            raise ValueError(
                f"head: attention reads the spatial tokens of one (layer, timestep) key of "
                f"DiffusionFeatures with pooling: tokens; these features have {len(self.keys)} "
                "keys: give one layer and one timestep"
            )
        return features.token_channels()[self.keys[0]]

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

    def _stack(self, features: dict[FeatureKey, torch.Tensor]) -> torch.Tensor:
        """``(batch, keys, width)`` zero-padded, rounded to float16 like the cache."""
        batch = next(iter(features.values())).shape[0]
        out = torch.zeros(batch, len(self.keys), self.valid.shape[1], dtype=torch.float16)
        for i, key in enumerate(self.keys):
            out[:, i, : features[key].shape[1]] = features[key].to(torch.float16).cpu()
        return out

    def _split_features(self, split: str) -> torch.Tensor:
        """All features of ``split`` ``(N, keys, width)``, from the feature cache."""
        if split not in self._cached:
            dataset = self.trainer.datamodule.dataset(split)
            cache_dir = self.feature_cache_dir(self.trainer.datamodule)
            features = load_or_extract(
                self.features,
                dataset,
                cache_dir,
                self.hparams.extract_batch_size,
                self.device,
                progress=self.trainer.is_global_zero,
                strategy=self.trainer.strategy,
            )
            self._cached[split] = self._stack(features)
        return self._cached[split]

    def feature_cache_dir(self, datamodule: object) -> Path:
        """Where the features are cached: ``cache_dir``, else the data's cache folder."""
        return Path(self.cache_dir or getattr(datamodule, "cache_dir", None) or default_cache_dir())

    def batch_features(self, batch: tuple, split: str) -> torch.Tensor:
        """``(keys, batch, width)`` float32 features of a batch of ``split``."""
        images, _, indices = batch
        if self.hparams.mode == "cached":
            stacked = self._split_features(split)[indices.cpu()]
        else:
            stacked = self._stack(self.features(images, indices))
        return stacked.to(self.device, torch.float32).transpose(0, 1)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.standardize == "train":
            x = (x - self.mean[:, None]) / self.std[:, None]
        elif self.norm is not None:
            keys, batch, width = x.shape
            x = self.norm(x.transpose(0, 1).reshape(batch, -1)).reshape(batch, keys, width)
            x = x.transpose(0, 1)
        x = x * self.valid[:, None]
        if self.hparams.l2_normalize:
            x = F.normalize(x, dim=-1)
        return x

    def logits(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(keys, batch, classes)`` from raw features ``(keys, batch, width)``, by the heads'
        parameters or by ``weight`` and ``bias`` of their shapes."""
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        x = self._normalize(x)
        if self.query is not None:
            x = self._attention_pool(x)
        return torch.baddbmm(bias[:, None], x, weight)

    def _attention_pool(self, x: torch.Tensor) -> torch.Tensor:
        """``(1, batch, positions x channels)`` tokens to ``(1, batch, channels)``: their
        average weighted by a softmax over positions of each token's match with the query."""
        keys, batch, _ = x.shape
        channels = self.query.shape[1]
        tokens = x.reshape(keys, batch, -1, channels)
        weights = (tokens @ self.query[:, None, :, None] / channels**0.5).softmax(dim=2)
        return (weights * tokens).sum(dim=2)

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
        keys, batch, classes = logits.shape
        weight = self.class_weight if self.hparams.loss == "class_balanced" else None
        losses = F.cross_entropy(
            logits.reshape(-1, classes), labels.repeat(keys), weight=weight, reduction="none"
        ).reshape(keys, batch)
        if weight is not None:
            return losses.sum(1) / weight[labels].sum()
        return losses.mean(1)

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
            self._standardize_from_training_set()
        if len(self.decay_grid) > 1:
            self._select_weight_decay()

    def _extract(self, *splits: str) -> None:
        """Fill the feature cache of ``splits``, every rank extracting its shard together."""
        for split in splits:
            self._split_features(split)

    def _collect(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every feature ``(keys, N, width)`` and label of ``split``, in the evaluation view."""
        dataset = self.trainer.datamodule.dataset(split)
        labels = torch.as_tensor(dataset.labels, device=self.device)
        if self.hparams.mode == "cached":
            features = self._split_features(split)
            return features.to(self.device, torch.float32).transpose(0, 1), labels
        loader = dataset.loader(self.hparams.extract_batch_size, generator=torch.Generator())
        parts = [self.batch_features(batch, split) for batch in loader]
        return torch.cat(parts, dim=1), labels

    @torch.no_grad()
    def _standardize_from_training_set(self) -> None:
        x, _ = self._collect("train")
        mean = x.double().mean(dim=1)
        std = x.double().std(dim=1, correction=0)
        self.mean.copy_(mean * self.valid)
        self.std.copy_(torch.where(self.valid & (std > 1e-6), std, 1.0))

    def _select_weight_decay(self) -> None:
        """Fit every head at each decay of the grid, strongest first, each fit starting from the
        last one's solution (a regularisation path, so each converges in few iterations); keep
        the decay, and its heads, whose best head scores highest on validation."""
        x, labels = self._collect("train")
        val_x, val_labels = self._collect("val")
        weight, bias = self.weight.detach().clone(), self.bias.detach().clone()
        best = None
        for decay in sorted(self.decay_grid, reverse=True):
            weight, bias = self._lbfgs_fit(x, labels, decay, weight, bias)
            with torch.no_grad():
                predictions = self.logits(val_x, weight, bias).argmax(-1)
            confusion = GridConfusion(len(self.keys), len(self.class_names)).to(self.device)
            confusion.update(predictions, val_labels)
            scores = getattr(grid_scores(confusion.matrix), self.hparams.select_metric)
            self.decay_scores[decay] = float(scores.max())
            if best is None or self.decay_scores[decay] > self.decay_scores[best[0]]:
                best = (decay, weight, bias)
        decay, weight, bias = best
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(bias)
        self.weight_decay.fill_(decay)

    def _lbfgs_fit(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        decay: float,
        weight: torch.Tensor,
        bias: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every head fitted by full-batch L-BFGS from ``weight`` and ``bias``, on copies: the
        module's parameters stay out of DDP's gradient synchronisation, which every rank's
        identical full-batch problem does not need."""
        weight = weight.detach().clone().requires_grad_(True)
        bias = bias.detach().clone().requires_grad_(True)

        def loss() -> torch.Tensor:
            return self._lbfgs_loss(x, labels, decay, weight, bias)

        lbfgs_step(lbfgs([weight, bias], self.hparams.lbfgs_iterations), loss)
        return weight.detach(), bias.detach()

    def _lbfgs_loss(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        decay: float,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Every head's mean loss plus its penalty, summed: the heads are independent."""
        weight = self.weight if weight is None else weight
        losses = self.head_losses(x, labels, weight, bias)
        return losses.sum() + 0.5 * decay * weight.square().sum()

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor | None:
        if self.solver == "lbfgs":
            return self._lbfgs_epoch(batch_idx)
        losses = self.head_losses(self.batch_features(batch, "train"), batch[1])
        self.epoch_loss += losses.detach().cpu()
        self.epoch_batches += 1
        loss = losses.sum()  # each head receives the gradient of its own loss
        if self.solver == "sgd":
            loss = loss + 0.5 * float(self.weight_decay) * self.weight.square().sum()
        self.log("train/loss", losses.mean(), prog_bar=True)
        return loss

    def _lbfgs_epoch(self, batch_idx: int) -> None:
        """Full-batch L-BFGS once per epoch, on the first batch; the other batches do nothing."""
        if batch_idx:
            return None
        x, labels = self._collect("train")
        decay = float(self.weight_decay)
        lbfgs_step(
            self.optimizers(), lambda: self._lbfgs_loss(x, labels, decay), self.manual_backward
        )
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
        x, labels = self._collect("val")
        logits = {"classify": self.logits(x)[self.best_index]}
        if len(self.fusion_keys):
            logits["fusion"] = self.fusion_logits(x)
        return logits, labels

    def on_fit_end(self) -> None:
        folder = self.output_dir()  # on every rank: finding the log folder is collective
        self._write_results(folder, {"val": self.validation_scores()})
        if self.decay_scores:
            rank_zero_only(self._write_decay_grid)(folder)
        rank_zero_only(write_heatmaps)(self, folder)

    @torch.no_grad()
    def _fusion_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, k * width)``: normalized features of the top-k keys, concatenated."""
        return self._normalize(x)[self.fusion_keys].transpose(0, 1).flatten(1)

    def _fit_fusion(self) -> None:
        """A head on the concatenated top-k keys, by full-batch L-BFGS."""
        ranking = getattr(self, f"val_{self.hparams.select_metric}").argsort(descending=True)
        self.fusion_keys.copy_(ranking[: len(self.fusion_keys)])
        x, labels = self._collect("train")
        inputs = self._fusion_inputs(x)
        weight = torch.zeros_like(self.fusion_weight, requires_grad=True)
        bias = torch.zeros_like(self.fusion_bias, requires_grad=True)
        decay = float(self.weight_decay)

        def loss() -> torch.Tensor:
            penalty = 0.5 * decay * weight.square().sum()
            return F.cross_entropy(inputs @ weight + bias, labels) + penalty

        lbfgs_step(lbfgs([weight, bias], max_iter=200), loss)
        self.fusion_weight.copy_(weight.detach())
        self.fusion_bias.copy_(bias.detach())

    def fusion_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._fusion_inputs(x) @ self.fusion_weight + self.fusion_bias

    # -- testing -------------------------------------------------------------------------------
    def eval_set_names(self) -> list[str]:
        return self.trainer.datamodule.eval_set_names

    def on_test_start(self) -> None:
        super().on_test_start()
        self.features.eval()
        names = self.eval_set_names()
        if self.hparams.mode == "cached":
            self._extract(*names)
        heads = len(self.keys) + (1 if len(self.fusion_keys) else 0)
        self.test_grids = nn.ModuleList(
            GridConfusion(heads, len(self.class_names)) for _ in names
        ).to(self.device)

    def test_step(self, batch: tuple, batch_idx: int, dataloader_idx: int = 0) -> None:
        x = self.batch_features(batch, self.eval_set_names()[dataloader_idx])
        preds = self.logits(x).argmax(-1)
        if len(self.fusion_keys):
            preds = torch.cat([preds, self.fusion_logits(x).argmax(-1)[None]])
        self.test_grids[dataloader_idx].update(preds, batch[1])

    def on_test_epoch_end(self) -> None:
        results = {}
        best = self.best_index
        for name, grid in zip(self.eval_set_names(), self.test_grids, strict=True):
            # compute() already syncs across processes; sync_dist only averages equal values.
            scores = results[name] = grid_scores(grid.compute())
            heads = {"best": best} | ({"fusion": -1} if len(self.fusion_keys) else {})
            for head, index in heads.items():
                self.log(f"{name}/{head}_acc", scores.acc[index], sync_dist=True)
                self.log(f"{name}/{head}_macro_f1", scores.macro_f1[index], sync_dist=True)
            grid.reset()
        folder = self.output_dir()  # on every rank: finding the log folder is collective
        # The validation scores travel in the checkpoint: a test run's table has them too.
        self._write_results(folder, {"val": self.validation_scores()} | results)
        rank_zero_only(write_test_reports)(self, results, folder)

    # -- classifying new images ----------------------------------------------------------------
    def classify(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(batch, classes)`` of the validation-selected key for new images.

        New images have no rows in a split, so their features come from the online path (never
        the feature cache) and go through the test-time normalisation. ``indices`` key the
        per-image diffusion noise; by default the images' positions in the batch.
        """
        if indices is None:
            indices = torch.arange(len(images))
        stacked = self._stack(self.features(images, indices))
        return self.logits(stacked.to(self.device, torch.float32).transpose(0, 1))[self.best_index]

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

    @rank_zero_only
    def _write_results(self, folder: Path, results: dict[str, GridScores]) -> None:
        """Add or replace the rows of ``results``' splits in ``probe_results.csv``."""
        path = folder / "probe_results.csv"
        rows = []
        if path.exists():
            with open(path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if row["split"] not in results]
            rows = [[row[column] for column in RESULT_COLUMNS] for row in kept]
        best = self.best_index
        for split, scores in results.items():
            for i, (layer, timestep) in enumerate(self.keys):
                rows.append(
                    [
                        layer,
                        "" if timestep is None else timestep,
                        split,
                        f"{scores.acc[i].item():.6f}",
                        f"{scores.macro_f1[i].item():.6f}",
                        bool(self.converged[i]),
                        i == best,
                    ]
                )
            if len(scores.acc) > len(self.keys):
                fused = "+".join(f"{self.keys[i][0]}@{self.keys[i][1]}" for i in self.fusion_keys)
                rows.append(
                    [
                        f"fusion({fused})",
                        "",
                        split,
                        f"{scores.acc[-1].item():.6f}",
                        f"{scores.macro_f1[-1].item():.6f}",
                        "",
                        False,
                    ]
                )
        write_csv_atomic(path, RESULT_COLUMNS, rows)

    def _write_decay_grid(self, folder: Path) -> None:
        """The validation score of every weight decay tried, and the one kept."""
        chosen = float(self.weight_decay)
        rows = [[d, f"{s:.6f}", d == chosen] for d, s in sorted(self.decay_scores.items())]
        metric = f"val_best_{self.hparams.select_metric}"
        write_csv_atomic(folder / "weight_decay_grid.csv", ["weight_decay", metric, "chosen"], rows)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        heads = [self.weight, self.bias] + ([self.query] if self.query is not None else [])
        solver = self.solver
        if solver == "lbfgs":
            return lbfgs(heads, self.hparams.lbfgs_iterations)
        if solver == "sgd":
            return torch.optim.SGD(heads, lr=self.hparams.lr, momentum=0.9)
        return torch.optim.AdamW(heads, lr=self.hparams.lr, weight_decay=float(self.weight_decay))


def lbfgs(parameters: list[torch.Tensor], max_iter: int) -> torch.optim.LBFGS:
    """Full-batch L-BFGS with a strong-Wolfe line search (the solver of scikit-learn's logistic
    regression)."""
    return torch.optim.LBFGS(parameters, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")


def lbfgs_step(
    optimizer: torch.optim.Optimizer,
    loss: Callable[[], torch.Tensor],
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> None:
    """One L-BFGS step (up to its ``max_iter`` iterations) on ``loss()``; ``backward`` is
    Lightning's ``manual_backward`` for a module's own parameters."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss()
        backward(value)
        return value

    with torch.enable_grad():
        optimizer.step(closure)


def _decay_grid(weight_decay: float | list[float] | None, solver: str) -> list[float]:
    """The weight decays to try: one, or (L-BFGS only) a grid chosen from on validation."""
    if weight_decay is None:
        return list(LBFGS_DECAY_GRID) if solver == "lbfgs" else [1e-4]
    grid = (
        [float(d) for d in weight_decay]
        if isinstance(weight_decay, list | tuple)
        else [float(weight_decay)]
    )
    if not grid or any(d < 0 for d in grid):
        raise ValueError(
            f"weight_decay must be one decay >= 0 or a list of them, got {weight_decay}"
        )
    if len(grid) > 1 and solver != "lbfgs":
        raise ValueError(
            f"weight_decay: a grid of decays needs solver: lbfgs (got {solver}); "
            "give one decay for AdamW or SGD"
        )
    return grid
