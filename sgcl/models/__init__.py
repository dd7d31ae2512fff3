"""Backbones (timm by name), projection heads and export."""
