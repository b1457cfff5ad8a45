"""Compatibility modules that unmodified Triton model code imports by their Triton names.

``triton_python_backend_utils`` lives here. The python backend registers it in ``sys.modules``
under its bare name, and puts this directory on ``PYTHONPATH`` of the worker processes it
starts, so ``import triton_python_backend_utils as pb_utils`` works in both execution modes
(and in subprocesses a model starts on its own).
"""
