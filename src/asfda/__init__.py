"""asfda: active source-free adaptation of pretrained 3D medical segmentation models."""

from __future__ import annotations

__version__ = "0.1.0"
