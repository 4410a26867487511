"""Exports of the encoders to other runtimes: ONNX (:mod:`.onnx`)."""
