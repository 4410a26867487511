"""Training: one loop (:mod:`.loop`: distributed setup, schedule, accumulation, checkpoints and exact resume,
NaN guard, logging, progress) used by the CLIP trainer (:mod:`.clip`) and the detector trainer
(:mod:`cnclip_vision.detection.train`), each adding only its step and its data."""
