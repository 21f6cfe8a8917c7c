"""axis-stream: fold fine-tuned checkpoints into one AXIS merged basis and adapt it on demand."""

__version__ = "0.1.0"
