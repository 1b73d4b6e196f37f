"""Integrations with other libraries. Each submodule imports its library on demand:

- :mod:`sasoftmax.integrations.transformers`: switch a HuggingFace transformers model to SA-Softmax /
  SSMax attention (``convert``, ``from_pretrained``).
"""
