"""GGUF decode workbench: a small PyTorch inference engine for GGUF models, built to be looked inside."""

__version__ = "0.1.0"
