"""Serving many FanLoRA adapters on one backbone: the multi-tenant engine."""
