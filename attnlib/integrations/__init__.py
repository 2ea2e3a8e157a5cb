"""Adapters that put attnlib's variants into models written for other libraries.

* :mod:`attnlib.integrations.transformers` - a Hugging Face ``transformers`` attention backend
  (``attn_implementation="attnlib"``), installed with the ``attnlib[hf]`` extra.

Each adapter imports its framework only when it is imported itself, so ``import attnlib`` stays light.
"""
