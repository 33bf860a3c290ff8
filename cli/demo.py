"""The embedded default job (``secateur demo``): no cloud account, no download.

Trains the study's VGG-16-BN (narrowed) on scikit-learn's bundled digits
(8x8 images upscaled to 32x32x3) and writes the data as TFRecords; then
starts the gRPC service in-process on a free loopback port and submits the
job through the Python client, exactly as a CI stage would: a sweep over
pruned ratios with fine-tuning, measurement and publication of the largest
ratio within the accuracy budget.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from secateur.pruner.data import write_examples
from secateur.pruner.datasets import digits_images
from secateur.v1 import pruning_pb2 as pb


@dataclass(frozen=True)
class DemoConfig:
    workdir: str
    ratios: tuple[float, ...] = (0.3, 0.5, 0.7)
    width: float = 0.25
    pretrain_epochs: int = 6
    finetune_epochs: int = 4
    max_accuracy_drop: float = 0.02
    batch_size: int = 64


def _progress_callback(epochs: int, steps: int, report: Callable[[float, str], None]) -> Any:
    """A Keras callback telling ``report`` the fraction of training done, batch by batch."""
    from secateur.pruner._keras import keras

    class Progress(keras.callbacks.Callback):  # type: ignore[misc]
        epoch = 0

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.epoch = epoch

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            done = self.epoch * steps + batch + 1
            report(done / (epochs * steps), f"epoch {self.epoch + 1}/{epochs}")

    return Progress()


def prepare(
    cfg: DemoConfig,
    log: Callable[[str], None] = print,
    on_progress: Callable[[float, str], None] | None = None,
) -> tuple[str, str, str]:
    """Write train/eval TFRecords and a trained model; return their paths.

    ``on_progress`` hears the fraction of the pre-training done and the epoch.
    """
    from secateur.pruner._keras import keras
    from secateur.pruner.models import vgg16_bn

    os.makedirs(cfg.workdir, exist_ok=True)
    images, labels = digits_images()
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    split = int(0.8 * len(labels))
    train, evalf = (
        os.path.join(cfg.workdir, "train.tfrecord"),
        os.path.join(cfg.workdir, "eval.tfrecord"),
    )
    write_examples(train, images[:split], labels[:split])
    write_examples(evalf, images[split:], labels[split:])
    keras.utils.set_random_seed(0)
    model = vgg16_bn((32, 32, 3), 10, width=cfg.width, dense=128, name="digits_vgg16_bn")
    report = on_progress or (lambda _f, _m: None)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    log(
        f"training {model.name} ({model.count_params():,} params) on digits, "
        f"{cfg.pretrain_epochs} epochs"
    )
    model.fit(
        images[:split],
        labels[:split],
        epochs=cfg.pretrain_epochs,
        batch_size=cfg.batch_size,
        verbose=0,
        callbacks=[_progress_callback(cfg.pretrain_epochs, -(-split // cfg.batch_size), report)],
    )
    _, acc = model.evaluate(images[split:], labels[split:], verbose=0)
    log(f"original accuracy on held-out digits: {acc:.4f}")
    path = os.path.join(cfg.workdir, "digits_vgg16_bn.keras")
    model.save(path)
    return path, train, evalf


def run_demo(
    cfg: DemoConfig,
    on_update: Callable[[pb.Job], None] | None = None,
    log: Callable[[str], None] = print,
    on_pretrain: Callable[[float, str], None] | None = None,
) -> pb.Job:
    """Prepare the embedded default, serve in-process, prune through gRPC.

    ``on_pretrain`` hears the pre-training's progress (fraction, epoch),
    ``on_update`` every snapshot of the job.

    Returns:
        The finished job as the service reports it.
    """
    from secateur.client.client import PruningClient
    from secateur.server.api.service import BackgroundServer, ServerOptions

    model_path, train, evalf = prepare(cfg, log, on_pretrain)
    spec = pb.JobSpec(
        model_uri=model_path,
        output_uri=os.path.join(cfg.workdir, "served"),
        pruning=pb.PruningSpec(
            ratios=list(cfg.ratios), criterion=pb.CRITERION_BN_SCALE, scope=pb.SCOPE_GLOBAL
        ),
        training=pb.TrainingSpec(
            epochs=cfg.finetune_epochs,
            batch_size=cfg.batch_size,
            train_data=train,
            eval_data=evalf,
            measure_steps=5,
        ),
        max_accuracy_drop=cfg.max_accuracy_drop,
    )
    options = ServerOptions(
        state_dir=os.path.join(cfg.workdir, "state"), port=0, allowed_prefixes=(cfg.workdir,)
    )
    with BackgroundServer(options) as server:
        log(f"secateur service listening on {server.target}; submitting the job over gRPC")
        with PruningClient(server.target) as client:
            return client.prune(model_path, spec.output_uri, spec, wait=True, on_update=on_update)
