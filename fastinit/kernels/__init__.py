"""Triton kernels of fastinit, installed as ``fastinit.kernels``.

Importing this package imports ``triton``; ``fastinit`` itself never does so
unless a fill needs the ``triton`` engine.
"""
