"""Students trained from the label store: models (``student.models``), losses (``student.losses``), the loader
that replays the stored views (``student.data``), the trainer (``student.trainer``), and the Ray Train entry
point (``student.train_ray``, the only module here that imports Ray)."""
