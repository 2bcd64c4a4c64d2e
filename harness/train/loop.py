"""Running a recipe: seeded, resumable training that leaves weights and a training record.

:func:`train` trains the zoo entry ``model_name`` by its recipe and writes,
in the weights folder's ``trained/`` subfolder (see
:func:`zoo.trained_weights_path`):

* ``<name>.checkpoint.pt`` after every epoch (model, optimizer, epoch,
  history), and within an epoch every ``checkpoint_seconds`` of training
  (with the batch reached and the epoch's random state): a killed run
  started again continues from its last checkpoint, and ends where an
  unbroken run does;
* at the end, ``<name>.pt`` (the state dict of the network) and
  ``<name>.json``, the training record: its sha256, the recipe, the epochs,
  the seed, clean (and, for certified training, certified) test accuracy,
  wall time, device, package versions and commit.

A model whose weights and record exist is not trained again. A non-finite
loss stops the run with an error naming the epoch and the batch. On a GPU
the forward and backward passes run in bfloat16 autocast.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import zoo

from ..attack.evaluate import clean_accuracy
from ..attack.pgd import PGDAttack
from ..data import load_dataset
from ..provenance import git_commit, package_versions, resolve_device
from .certified import worst_case_logits
from .recipes import Objective, OptimizerKind, Recipe, recipe as recipe_named

__all__ = ["TrainingDiverged", "TrainingStep", "certified_accuracy", "train"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and the batch."""


@dataclass(frozen=True)
class TrainingStep:
    """Where a training run is, after a batch."""

    epoch: int
    epochs: int
    batch: int
    batches: int
    loss: float
    accuracy: float


def _augment(images: torch.Tensor, recipe: Recipe, epoch: int, generator: torch.Generator) -> torch.Tensor:
    augmentation = recipe.augmentation
    batch = images.shape[0]
    if augmentation.translate:
        pad = augmentation.translate
        height, width = images.shape[-2:]
        padded = F.pad(images, (pad,) * 4, mode="reflect")
        shifts = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator).to(images.device)
        shifted = torch.empty_like(images)
        # One slice per shift (25 for 2 pixels), each taken by the images drawn for it.
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                chosen = torch.nonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx)).flatten()
                shifted[chosen] = padded[chosen, :, dy : dy + height, dx : dx + width]
        images = shifted
    if augmentation.flip:
        if augmentation.alternating_flip:
            if epoch % 2 == 1:
                images = images.flip(-1)
        else:
            flip = (torch.rand(batch, generator=generator) < 0.5).to(images.device).view(-1, 1, 1, 1)
            images = torch.where(flip, images.flip(-1), images)
    return images


def _prepared_training_set(images: torch.Tensor, recipe: Recipe, seed: int) -> torch.Tensor:
    """With alternating flips, a fixed random half of the training set starts flipped (so every epoch sees both halves)."""
    if not (recipe.augmentation.flip and recipe.augmentation.alternating_flip):
        return images
    generator = torch.Generator().manual_seed(seed + 7919)
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device).view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)


def _optimizer(module: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    settings = recipe.optimizer
    trainable = [(name, parameter) for name, parameter in module.named_parameters() if parameter.requires_grad]
    shifts = [p for name, p in trainable if settings.bias_lr_scale != 1.0 and "norm" in name and name.endswith("bias")]
    shift_ids = {id(p) for p in shifts}
    others = [p for _, p in trainable if id(p) not in shift_ids]
    groups = [{"params": others, "lr": settings.lr, "weight_decay": settings.weight_decay}]
    if shifts:
        scale = settings.bias_lr_scale
        groups.append({"params": shifts, "lr": settings.lr * scale, "weight_decay": settings.weight_decay / scale})
    for group in groups:
        group["initial_lr"] = group["lr"]  # the schedule scales it (kept in the optimizer's state across resumes)
    if settings.kind is OptimizerKind.ADAM:
        return torch.optim.Adam(groups, lr=settings.lr, betas=(settings.momentum, 0.999))
    return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov)


def _adversary(module: nn.Module, recipe: Recipe) -> PGDAttack:
    settings = recipe.adversarial
    # Seed 0, the attack's own default: one attempt per example starts from the clean image and draws nothing.
    return settings.attack.attack(module, settings.ball, seed=0)


def certified_accuracy(module: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, batch_size: int = 500) -> float:
    """Fraction of ``images`` whose prediction interval bound propagation certifies over the l_inf ball ``eps``."""
    module.eval()
    certified = 0
    with torch.no_grad():
        for chunk, chunk_labels in zip(images.split(batch_size), labels.split(batch_size)):
            certified += int((worst_case_logits(module, chunk, chunk_labels, eps).argmax(1) == chunk_labels).sum())
    return certified / images.shape[0]


def _save_atomically(payload: Any, path: Path) -> None:
    partial = path.with_name(f".{path.name}.partial")
    torch.save(payload, partial)
    os.replace(partial, path)


def train(
    model_name: str,
    *,
    data_root: str | os.PathLike,
    weights_dir: str | os.PathLike | None = None,
    device: str = "auto",
    epochs: int | None = None,
    train_examples: int | None = None,
    download: bool = False,
    progress: bool = True,
    on_step: Callable[[TrainingStep], None] | None = None,
    checkpoint_seconds: float | None = 600.0,
) -> dict:
    """Train the zoo entry ``model_name`` by its recipe; returns the training record.

    Parameters
    ----------
    model_name : str
        A registered model with a recipe (``ModelSpec.recipe``).
    data_root : path
        Holds the data set's training and test splits.
    weights_dir : path, optional
        The weights folder (default as for :func:`zoo.model`).
    device : str
        ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    epochs : int, optional
        Train for this many epochs instead of the recipe's (recorded).
    train_examples : int, optional
        Use only the first this many training images instead of the
        recipe's number (recorded), for runs the data would make too long.
    progress : bool
        Show a bar (epoch, batch, loss, accuracy, ETA) on standard error.
    on_step : callable, optional
        Called with a :class:`TrainingStep` after every batch.
    checkpoint_seconds : float or None, default 600
        Also checkpoint within an epoch once this much training time has
        passed since the last checkpoint (0: after every batch; None: at the
        ends of epochs only). An epoch of Wasserstein adversarial training
        on the whole MNIST training set takes about an hour on a CPU.

    Raises
    ------
    ValueError
        The model has no recipe, or its recipe trains another architecture,
        or a checkpoint from a different recipe is in the way.
    TrainingDiverged
        A non-finite loss.
    """
    spec = zoo.model_spec(model_name)
    if spec.recipe is None:
        raise ValueError(f"model {model_name!r} has no recipe; models with recipes: {', '.join(_trainable())}")
    if checkpoint_seconds is not None and not (isinstance(checkpoint_seconds, (int, float)) and checkpoint_seconds >= 0):
        raise ValueError(f"checkpoint_seconds={checkpoint_seconds!r} is invalid: it must be a number >= 0, or None")
    recipe = recipe_named(spec.recipe)
    if epochs is not None:
        recipe = recipe.with_epochs(epochs)
    if recipe.architecture != spec.architecture or recipe.dataset is not spec.dataset:
        raise ValueError(
            f"recipe {recipe.name!r} trains {recipe.architecture} on {recipe.dataset.value}, but model {model_name!r} "
            f"is {spec.architecture} on {spec.dataset.value}"
        )
    weights_path = zoo.trained_weights_path(spec, weights_dir)
    record = zoo.training_record(spec, weights_dir)
    if weights_path.is_file() and record is not None:
        return record
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint_path = weights_path.with_suffix(".checkpoint.pt")
    target = resolve_device(device)
    commit = git_commit()  # the code that starts the run (a checkout may move on while it trains)
    settings = {"recipe": recipe.to_dict(), "train_examples": train_examples}

    images, labels = load_dataset(recipe.dataset.value, data_root, train=True, download=download)
    limit = train_examples if train_examples is not None else recipe.train_examples
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    test_images, test_labels = load_dataset(recipe.dataset.value, data_root, train=False, download=download)
    images, labels = images.to(target), labels.to(target)

    torch.manual_seed(recipe.seed)
    # Channels-last convolutions are faster on CPUs (oneDNN) and on GPUs alike.
    module = spec.build().to(target, memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    if recipe.init_from is not None:
        source = zoo.model_spec(recipe.init_from)
        if source.architecture != spec.architecture:
            raise ValueError(
                f"recipe {recipe.name!r} starts from {recipe.init_from!r} ({source.architecture}), which is not "
                f"{spec.architecture}"
            )
        started_from = zoo.model(recipe.init_from, weights_dir=weights_dir, device=target)
        module.net.load_state_dict(started_from.net.state_dict())
    if recipe.whitening:
        with torch.no_grad():
            module.net.init_whitening(module.preprocess(images[:5000]))
    optimizer = _optimizer(module, recipe)
    start_epoch, seconds, history, within = 0, 0.0, [], None
    if checkpoint_path.is_file():
        checkpoint = torch.load(checkpoint_path, map_location=target, weights_only=True)
        if checkpoint["settings"] != json.loads(json.dumps(settings)):
            raise ValueError(
                f"{checkpoint_path} was made by different settings ({checkpoint['settings']}), not {settings}; "
                "delete it to train from scratch"
            )
        module.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, seconds, history = checkpoint["epoch"], checkpoint["seconds"], checkpoint["history"]
        within = checkpoint.get("within")

    adversary = _adversary(module, recipe) if recipe.objective is Objective.WASSERSTEIN_ADVERSARIAL else None
    training_set = _prepared_training_set(images, recipe, recipe.seed)
    batches = math.ceil(training_set.shape[0] / recipe.batch_size)
    total_steps = recipe.epochs * batches
    autocast = target.type == "cuda"
    bar = tqdm(
        total=total_steps, initial=start_epoch * batches + (within["batch"] if within else 0), desc=model_name,
        unit="batch", disable=not progress, dynamic_ncols=True, mininterval=0.5,
    )

    def save_checkpoint(epoch: int, seconds: float, **extra) -> None:
        _save_atomically(
            {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "seconds": seconds,
             "history": history, "settings": settings, **extra},
            checkpoint_path,
        )

    try:
        for epoch in range(start_epoch, recipe.epochs):
            started = time.perf_counter()
            generator = torch.Generator().manual_seed(recipe.seed * 100_003 + epoch)
            order = torch.randperm(training_set.shape[0], generator=generator).to(target)
            module.train()
            loss_sum, correct, seen, first_batch = 0.0, 0, 0, 0
            if within is not None:
                # Where the checkpoint left the epoch: its batch, the augmentations' random state, the running means.
                generator.set_state(within["generator"])
                loss_sum, correct, seen, first_batch = within["loss_sum"], within["correct"], within["seen"], within["batch"]
                within = None
            last_checkpoint = started
            for batch in range(first_batch, batches):
                step = epoch * batches + batch
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * recipe.schedule.multiplier(step / total_steps, epoch)
                index = order[batch * recipe.batch_size : (batch + 1) * recipe.batch_size]
                x = _augment(training_set[index], recipe, epoch, generator)
                y = labels[index]
                if adversary is not None:
                    x = adversary.run(x, y).adversarial.detach()  # run() puts the model back in train mode
                with torch.autocast(target.type, dtype=torch.bfloat16, enabled=autocast):
                    logits = module(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
                    if recipe.objective is Objective.INTERVAL_CERTIFIED:
                        eps, clean_weight = recipe.certified.at(epoch + batch / batches)
                        if eps > 0:
                            worst = worst_case_logits(module, x, y, eps)
                            loss = clean_weight * loss + (1 - clean_weight) * F.cross_entropy(worst.float(), y)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"model {model_name!r}: the loss is {value} at epoch {epoch + 1} of {recipe.epochs}, batch "
                        f"{batch + 1} of {batches} (recipe {recipe.name!r}, learning rate "
                        f"{optimizer.param_groups[0]['lr']:.3g}); the checkpoint of epoch {epoch} is kept"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += value * y.shape[0]
                correct += int((logits.argmax(1) == y).sum())
                seen += y.shape[0]
                bar.set_postfix_str(f"epoch {epoch + 1}/{recipe.epochs}, loss {loss_sum / seen:.4f}, acc {correct / seen:.4f}", refresh=False)
                bar.update()
                if on_step is not None:
                    on_step(TrainingStep(epoch, recipe.epochs, batch, batches, loss_sum / seen, correct / seen))
                now = time.perf_counter()
                if checkpoint_seconds is not None and batch + 1 < batches and now - last_checkpoint >= checkpoint_seconds:
                    save_checkpoint(
                        epoch, seconds + now - started,
                        within={"batch": batch + 1, "generator": generator.get_state(), "loss_sum": loss_sum,
                                "correct": correct, "seen": seen},
                    )
                    last_checkpoint = now
            seconds += time.perf_counter() - started
            history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "train_accuracy": correct / seen, "seconds": seconds})
            save_checkpoint(epoch + 1, seconds)
    finally:
        bar.close()

    test_images, test_labels = test_images.to(target), test_labels.to(target)
    record = {
        "model": model_name,
        "architecture": spec.architecture,
        "recipe": recipe.to_dict(),
        "epochs": recipe.epochs,
        "train_examples": int(training_set.shape[0]),
        "seed": recipe.seed,
        "clean_accuracy": clean_accuracy(module, test_images, test_labels),
        "seconds": seconds,
        "device": str(target) if target.type == "cpu" else torch.cuda.get_device_name(target),
        "package_versions": package_versions(),
        "git_commit": commit,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "history": history,
    }
    if recipe.objective is Objective.INTERVAL_CERTIFIED:
        record["certified_linf_eps"] = recipe.certified.eps
        record["certified_accuracy"] = certified_accuracy(module, test_images, test_labels, recipe.certified.eps)
    _save_atomically(module.net.state_dict(), weights_path)
    record["sha256"] = zoo.sha256_of_file(weights_path)
    record_path = weights_path.with_suffix(".json")
    partial = record_path.with_name(f".{record_path.name}.partial")
    partial.write_text(json.dumps(record, indent=2, sort_keys=True))
    os.replace(partial, record_path)
    checkpoint_path.unlink(missing_ok=True)
    return record


def _trainable() -> list[str]:
    return [spec.name for spec in zoo.models() if spec.recipe is not None]
