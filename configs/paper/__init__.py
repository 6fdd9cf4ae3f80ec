"""Configs of the tangent-space paper at full scale: CLIP ViT-B/32, B/16, L/14 on the eight image tasks."""
