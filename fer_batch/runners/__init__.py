"""Executors of the pipeline: ``local`` (in-process) and ``ray`` (the only module importing ray)."""
