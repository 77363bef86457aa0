"""Training: data, events (progress, cancel) and the training loops.

One API for the CLI and the napari Fine-tune widget: every loop takes a
``progress`` callback receiving :class:`~digital_stain.train.events.Progress`
and a ``stop`` :class:`threading.Event` checked every step.
"""

from digital_stain.train.events import Progress, TrainResult
from digital_stain.train.teacher import TeacherConfig, train_teacher

__all__ = ["Progress", "TeacherConfig", "TrainResult", "train_teacher"]
