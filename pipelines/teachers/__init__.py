"""Teachers: loading (timm names, checkpoints, URLs), preprocessing, ensembles, and training a teacher."""

from stillroom.pipelines.teachers.ensemble import ensemble_log_probs
from stillroom.pipelines.teachers.loading import load_teacher, read_class_map, save_checkpoint, weights_digest
from stillroom.pipelines.teachers.preprocess import INTERPOLATIONS, Preprocess
from stillroom.pipelines.teachers.teacher import Teacher, as_feature_map, forward_capturing
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
