"""ONNX export of trained GKT models, verified against PyTorch, optionally quantized to int8.

Needs the ``[export]`` extra (onnx, onnxruntime, onnxscript). Entry point: ``gkt-export``
(:mod:`export.cli`); the library entry is :func:`export.pipeline.run_export`.
"""
