"""Conversion of third-party weights into the ONNX files of the model pack (a build step).

See ``fer_batch.convert.build`` (``fer-batch models build``) for the registry of builders.
"""
