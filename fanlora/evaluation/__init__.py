"""Scoring a model on a task: :mod:`~fanlora.evaluation.evaluate` (multiple choice by log-likelihood or
generation, generated answers, gold-answer losses) and :mod:`~fanlora.evaluation.judge` (MT-Bench's LLM judge)."""
