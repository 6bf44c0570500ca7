"""Teachers: loading (timm names, checkpoints, URLs), preprocessing, ensembles, and training a teacher."""

from stillroom.pipelines.teachers._teachers import (
    INTERPOLATIONS,
    Preprocess,
    Teacher,
    as_feature_map,
    ensemble_log_probs,
    forward_capturing,
    load_teacher,
    read_class_map,
    save_checkpoint,
    weights_digest,
)
from stillroom.pipelines.teachers.train import TeacherTrainConfig, train_teacher

__all__ = [
    "INTERPOLATIONS",
    "Preprocess",
    "Teacher",
    "TeacherTrainConfig",
    "as_feature_map",
    "ensemble_log_probs",
    "forward_capturing",
    "load_teacher",
    "read_class_map",
    "save_checkpoint",
    "train_teacher",
    "weights_digest",
]
