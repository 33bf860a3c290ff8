"""Knowledge distillation from the original while fine-tuning (issue 12 §5).

The pruned model (student) learns from the labels and from the original's
(teacher's) soft outputs: ``loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T))
+ (1 - alpha) * CE(labels, s)`` (Hinton et al. 2015). Models that end in a
softmax give probabilities: their logits are recovered as log-probabilities
(equal to the logits up to a per-example constant, which softmax ignores).
The teacher runs inside the training step, under the student's strategy.
"""

from __future__ import annotations

from typing import Any

from secateur.pruner._keras import keras
from secateur.pruner.config import TrainConfig


def as_logits(outputs: Any, probabilities: bool) -> Any:
    """Logits of a model's outputs (log-probabilities when it ends in a softmax)."""
    import tensorflow as tf

    outputs = tf.cast(outputs, tf.float32)
    if not probabilities:
        return outputs
    return tf.math.log(tf.clip_by_value(outputs, 1e-12, 1.0))


def distillation_loss(
    labels: Any, student_logits: Any, teacher_logits: Any, alpha: float, temperature: float
) -> Any:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``, mean over the batch."""
    import tensorflow as tf

    labels = tf.reshape(tf.cast(labels, tf.int64), [-1])
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, student_logits)
    t = tf.nn.softmax(teacher_logits / temperature)
    log_t = tf.nn.log_softmax(teacher_logits / temperature)
    log_s = tf.nn.log_softmax(student_logits / temperature)
    kd = tf.reduce_sum(t * (log_t - log_s), axis=-1) * temperature**2
    return tf.reduce_mean(alpha * kd + (1.0 - alpha) * ce)


class Distiller(keras.Model):
    """Trains ``student`` (its layers, shared) against ``teacher`` and the labels.

    Calling it is calling the student; only the loss differs, so Keras's
    metrics, hooks and distribution work as for the student alone.
    """

    def __init__(
        self,
        student: Any,
        teacher: Any,
        alpha: float,
        temperature: float,
        student_probs: bool,
        teacher_probs: bool,
    ) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher
        self.teacher.trainable = False
        self.alpha, self.temperature = alpha, temperature
        self.student_probs, self.teacher_probs = student_probs, teacher_probs

    def call(self, inputs: Any, training: bool = False) -> Any:
        return self.student(inputs, training=training)

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool = True,
    ) -> Any:
        import tensorflow as tf

        teacher = tf.stop_gradient(self.teacher(x, training=False))
        loss = distillation_loss(
            y,
            as_logits(y_pred, self.student_probs),
            as_logits(teacher, self.teacher_probs),
            self.alpha,
            self.temperature,
        )
        extra = self.student.losses
        return loss + tf.add_n([tf.cast(v, loss.dtype) for v in extra]) if extra else loss


def distiller(
    student: Any, teacher: Any, config: TrainConfig, jit: bool, steps_per_execution: int
) -> Distiller:
    """A compiled Distiller of ``student`` (compiled, trained in place) and ``teacher``."""
    from secateur.pruner.losses import outputs_probabilities

    with student.distribute_strategy.scope():
        model = Distiller(
            student,
            teacher,
            config.distill_alpha,
            config.distill_temperature,
            outputs_probabilities(student),
            outputs_probabilities(teacher),
        )
        optimizer = student.optimizer
    model.compile(
        optimizer=optimizer,
        metrics=["accuracy"],
        jit_compile=jit,
        steps_per_execution=steps_per_execution,
    )
    return model


def make_teacher(model: Any, device: Any) -> Any:
    """A frozen copy of ``model`` under the device's strategy (the original stays as it is)."""
    import tensorflow as tf

    strategy = device.strategy if device.strategy is not None else tf.distribute.get_strategy()
    with strategy.scope():
        teacher = model.__class__.from_config(model.get_config())
        teacher.set_weights(model.get_weights())
    teacher.trainable = False
    return teacher
