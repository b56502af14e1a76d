"""Instruction corpora and tokenised training examples."""
